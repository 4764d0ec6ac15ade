"""The evaluation set store: set files by digest in the server's state directory, and their
registrations in the registry.

``EvalSetStore.add(model, data, source=..., note=...)`` reads the offered bytes strictly
(``fleet_server.evalsets.data``), writes the set's canonical bytes atomically to
``<directory>/<sha256>.npz`` (like the bundle library stores bundles) and registers it for the
model with its provenance. ``load(sha256)`` reads a stored file back and checks its digest.
Source and note are operator-supplied text: printable, length-capped, refused otherwise.

Owns: the files and the provenance checks. Does not own the rows' queries
(``fleet_server.registry.evalsets``) nor running models on the sets
(``fleet_server.evalsets.offline``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from edge_agent.common.durable import write_atomic
from fleet_server.errors import EvalSetError, EvalSetRejectedError
from fleet_server.evalsets.data import (
    DEFAULT_MAX_EVALSET_BYTES,
    EvalSetData,
    canonical_bytes,
    digest,
    parse_eval_set,
)
from fleet_server.registry import evalsets as rows
from fleet_server.registry.evalsets import EvalSetRecord
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.evalsets import MAX_NOTE, MAX_SOURCE

__all__ = ["EVALSET_SUFFIX", "EvalSetStore", "check_text"]

log = logging.getLogger(__name__)
EVALSET_SUFFIX: Final = ".npz"
_MODEL_LEN: Final = 128


def _utcnow() -> datetime:
    return datetime.now(UTC)


def check_text(
    value: str, what: str, limit: int, *, required: bool = False, strip: bool = True
) -> str:
    """``value`` (stripped unless ``strip`` is False), if printable and at most ``limit`` long.

    Raises:
        EvalSetRejectedError: ``bad_text``: unprintable (control, escape, bidi-override or
            unpaired surrogate characters), too long, or empty when ``required``.
    """
    text = (value.strip() if strip else value) if isinstance(value, str) else None
    if text is None or len(text) > limit or not text.isprintable() or (required and not text):
        raise EvalSetRejectedError(
            f"{what} must be printable text of {'1' if required else '0'}-{limit} characters",
            reason="bad_text",
        )
    if any(0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 for c in text):
        raise EvalSetRejectedError(f"{what} holds bidirectional controls", reason="bad_text")
    return text


class EvalSetStore:
    """Evaluation set files named ``<sha256>.npz`` in ``directory``, registered in ``registry``."""

    def __init__(
        self,
        directory: Path,
        registry: Registry,
        *,
        clock: Callable[[], datetime] = _utcnow,
        max_bytes: int = DEFAULT_MAX_EVALSET_BYTES,
    ) -> None:
        """Use ``directory`` (created on first ``add``)."""
        self._dir = Path(directory)
        self._registry = registry
        self._clock = clock
        self._max_bytes = max_bytes

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def max_bytes(self) -> int:
        """The largest set file accepted."""
        return self._max_bytes

    def path_of(self, sha256: str) -> Path:
        """The file a set with this digest is (or would be) stored at."""
        return self._dir / f"{sha256}{EVALSET_SUFFIX}"

    def add(
        self, model: str, data: bytes, *, source: str, note: str = ""
    ) -> tuple[EvalSetRecord, bool]:
        """Register the set file ``data`` for ``model``; the registration and whether it is new.

        Raises:
            EvalSetRejectedError: a malformed file (see ``parse_eval_set``) or provenance text
                that is unprintable or too long (``bad_text``).
            EvalSetError: the directory cannot be written.
            RegistryUnavailableError: the database failed.
        """
        model = check_text(model, "the model name", _MODEL_LEN, required=True, strip=False)
        source = check_text(source, "the source", MAX_SOURCE, required=True)
        note = check_text(note, "the note", MAX_NOTE)
        parsed = parse_eval_set(data, max_bytes=self._max_bytes)
        canonical = canonical_bytes(parsed)
        sha256 = digest(canonical)
        path = self.path_of(sha256)
        try:
            if not path.is_file():
                self._dir.mkdir(parents=True, exist_ok=True)
                write_atomic(path, canonical)
        except OSError as exc:
            log.error("cannot store evaluation set %s: %s", path, exc)
            raise EvalSetError(f"cannot store evaluation set {sha256}: {exc.strerror}") from exc
        record = EvalSetRecord(
            model=model,
            sha256=sha256,
            length=len(canonical),
            samples=parsed.samples,
            classes=parsed.classes,
            sample_shape=parsed.sample_shape,
            source=source,
            note=note,
            registered_at=self._clock(),
        )
        return rows.add_eval_set(self._registry, record)

    def listing(self, model: str | None = None) -> list[EvalSetRecord]:
        """Registrations (of ``model``, or all), newest first. Raises: RegistryUnavailableError."""
        return rows.list_eval_sets(self._registry, model)

    def show(self, sha256: str) -> list[EvalSetRecord]:
        """Every registration of one file.

        Raises:
            UnknownEvalSetError: no set with this digest is registered.
            RegistryUnavailableError: the database failed.
        """
        return rows.eval_set_registrations(self._registry, sha256)

    def latest(self, model: str) -> EvalSetRecord | None:
        """The set ``model``'s offline comparison uses (the newest).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return rows.latest_eval_set(self._registry, model)

    def load(self, sha256: str) -> EvalSetData:
        """The arrays of a stored set, its digest checked.

        Raises:
            EvalSetError: the file is missing, unreadable or does not match its digest.
        """
        path = self.path_of(sha256)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EvalSetError(
                f"evaluation set {sha256[:12]} cannot be read: {exc.strerror}"
            ) from exc
        if digest(data) != sha256:
            raise EvalSetError(f"evaluation set file {sha256[:12]} does not match its digest")
        try:
            return parse_eval_set(data, max_bytes=max(self._max_bytes, len(data)))
        except EvalSetRejectedError as exc:
            raise EvalSetError(f"stored evaluation set {sha256[:12]} is unusable: {exc}") from exc
