"""The device's on-disk partial download of one bundle, resumable across restarts.

Owns: ``<dir>/<sha256>.part`` (a sparse file preallocated to exactly the signed length, never
larger), ``<dir>/<sha256>.bitmap`` (which blocks are durably written, replaced atomically) and
the final ``<dir>/<sha256>.bundle`` that only ``finish`` creates, after the whole file's SHA-256
matched the signed one. Does not own the protocol decisions (``edge_agent.wire.transfer``), the
transport, or installing the bundle (the model store verifies and installs the final file).

Crash safety, by ordering: a block is written with ``pwrite``; every ``persist_every`` blocks
(and on ``close``/``finish``) the part file is fsynced *before* the bitmap is replaced with
``write_atomic``. The persisted bitmap therefore never marks a block whose bytes are not durable;
a crash loses at most the marks of the last few blocks, which are simply requested again. A
bitmap without its part file, or naming another transfer, is ignored (start over), and the
final file is only ever produced by an atomic rename of a verified part file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from types import TracebackType

from edge_agent.common.durable import fsync_dir, write_atomic
from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    LengthMismatchError,
    TransferIncompleteError,
)
from edge_agent.strict_json import loads as strict_loads
from edge_agent.wire.transfer import SCHEMA_VERSION, BlockData, BlockPlan
from edge_agent.wire.transfer_progress import Progress

__all__ = ["DEFAULT_PERSIST_EVERY", "PartialDownload"]

DEFAULT_PERSIST_EVERY = 16
_HASH_CHUNK = 1 << 20
_BITMAP_MAGIC = b"EFBM"

log = logging.getLogger(__name__)


def _encode_bitmap(plan: BlockPlan, progress: Progress) -> bytes:
    header = json.dumps(
        {"schema_version": SCHEMA_VERSION, "transfer_id": plan.transfer_id},
        separators=(",", ":"),
        sort_keys=True,
    ).encode("ascii")
    return _BITMAP_MAGIC + len(header).to_bytes(2, "big") + header + progress.to_bytes()


def _decode_bitmap(plan: BlockPlan, data: bytes) -> Progress:
    if data[:4] != _BITMAP_MAGIC or len(data) < 6:
        raise ContractError("not a bitmap file")
    header_len = int.from_bytes(data[4:6], "big")
    header = strict_loads(data[6 : 6 + header_len], max_bytes=header_len, what="bitmap header")
    expected = {"schema_version": SCHEMA_VERSION, "transfer_id": plan.transfer_id}
    if header != expected:
        raise ContractError(f"bitmap is for another transfer: {header!r}")
    return Progress(plan, data[6 + header_len :])


class PartialDownload:
    """One bundle being downloaded block by block into ``directory``.

    Constructing it on a directory that holds an earlier partial download of the same plan
    resumes it: ``progress`` starts from the persisted bitmap (see ``resumed_blocks``).
    Usable as a context manager (``close`` on exit). Not thread-safe; one writer per directory.

    Args:
        directory: where the part, bitmap and final files live (created if missing).
        plan: the transfer, built from the signed assignment.
        persist_every: persist the bitmap after this many newly written blocks.

    Raises:
        OSError: the directory or part file cannot be created or sized.
        ContractError: ``persist_every`` is not a positive integer.
    """

    def __init__(
        self, directory: Path, plan: BlockPlan, *, persist_every: int = DEFAULT_PERSIST_EVERY
    ) -> None:
        if type(persist_every) is not int or persist_every < 1:
            raise ContractError(f"persist_every must be a positive integer: {persist_every!r}")
        self.directory = Path(directory)
        self.plan = plan
        self.persist_every = persist_every
        self.part_path = self.directory / f"{plan.sha256}.part"
        self.bitmap_path = self.directory / f"{plan.sha256}.bitmap"
        self.final_path = self.directory / f"{plan.sha256}.bundle"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._unpersisted = 0
        self._fd: int | None = None
        self.progress = self._open()
        self.resumed_blocks = self.progress.received

    def _open(self) -> Progress:
        existed = self.part_path.exists()
        if not existed:
            # Marks without their part file describe bytes that are gone: drop them durably
            # before a new part file exists, so they can never be paired with it.
            self._drop_bitmap()
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            progress = Progress(self.plan)
            if existed and size == self.plan.length:
                progress = self._load_bitmap()
            elif existed:
                # A part file of another size is not ours to trust: start over.
                log.warning(
                    "partial %s has %d bytes, expected %d: restarting",
                    self.part_path,
                    size,
                    self.plan.length,
                )
                self._drop_bitmap()
                os.ftruncate(fd, 0)
            # Sparse preallocation to exactly the signed length; never larger.
            os.ftruncate(fd, self.plan.length)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if progress.received:
            log.info(
                "resuming %s: %d/%d blocks",
                self.plan.sha256[:12],
                progress.received,
                self.plan.n_blocks,
            )
        return progress

    def _drop_bitmap(self) -> None:
        if self.bitmap_path.exists():
            self.bitmap_path.unlink()
            fsync_dir(self.directory)

    def _load_bitmap(self) -> Progress:
        try:
            data = self.bitmap_path.read_bytes()
        except FileNotFoundError:
            return Progress(self.plan)
        try:
            return _decode_bitmap(self.plan, data)
        except ContractError as exc:
            log.warning("ignoring bitmap %s: %s", self.bitmap_path, exc)
            return Progress(self.plan)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ContractError(f"partial download {self.part_path} is closed")
        return self._fd

    def write_block(self, index: int, payload: bytes) -> bool:
        """Write one block at its offset; return False for a duplicate (nothing written).

        Raises:
            LengthMismatchError: ``index`` is beyond the last block or ``payload`` is not the
                block's exact length (nothing is written).
            ContractError: the download is closed.
            OSError: the write, fsync or bitmap persist failed.
        """
        fd = self._require_fd()
        if not self.progress.check(index, len(payload)):
            return False
        start, _ = self.plan.block_range(index)
        view = memoryview(payload)
        offset = start
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        self.progress.mark(index)
        self._unpersisted += 1
        if self._unpersisted >= self.persist_every:
            self.checkpoint()
        return True

    def accept(self, block: BlockData) -> bool:
        """Check a received message against this transfer and write it.

        Raises:
            TransferMismatchError: the block belongs to another transfer.
            LengthMismatchError: out of range or of the wrong length.
            ContractError: the download is closed.
            OSError: the write failed.
        """
        block.check(self.plan)
        return self.write_block(block.index, block.payload)

    def checkpoint(self) -> None:
        """Make every written block durable, then persist the bitmap that marks them.

        Raises:
            ContractError: the download is closed.
            OSError: fsync or the atomic bitmap write failed.
        """
        fd = self._require_fd()
        os.fsync(fd)  # data first: the bitmap must never mark bytes that are not on disk
        write_atomic(self.bitmap_path, _encode_bitmap(self.plan, self.progress), mode=0o600)
        self._unpersisted = 0

    def close(self) -> None:
        """Persist progress and release the file; a later ``PartialDownload`` resumes.

        Raises:
            OSError: the final checkpoint failed (the file is closed anyway).
        """
        if self._fd is None:
            return
        try:
            if self._unpersisted:
                self.checkpoint()
        finally:
            os.close(self._fd)
            self._fd = None

    def finish(self) -> Path:
        """Verify the complete file against the signed digest and move it to ``final_path``.

        Returns:
            The verified bundle's path.

        Raises:
            TransferIncompleteError: blocks are still missing (nothing changes).
            LengthMismatchError: the part file is not exactly the signed length (discarded).
            DigestMismatchError: the SHA-256 differs from the signed one; the part file and
                bitmap are discarded so nothing partial or wrong is left behind.
            ContractError: the download is closed.
            OSError: reading, renaming or syncing failed.
        """
        fd = self._require_fd()
        if not self.progress.complete:
            raise TransferIncompleteError(
                f"{self.plan.n_blocks - self.progress.received} blocks still missing"
            )
        os.fsync(fd)
        size = os.fstat(fd).st_size
        if size != self.plan.length:
            self.abandon()
            raise LengthMismatchError(f"part file has {size} bytes, signed {self.plan.length}")
        digest = hashlib.sha256()
        offset = 0
        while offset < self.plan.length:
            chunk = os.pread(fd, min(_HASH_CHUNK, self.plan.length - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        if offset != self.plan.length or not hmac.compare_digest(
            digest.hexdigest(), self.plan.sha256
        ):
            self.abandon()
            raise DigestMismatchError(
                f"downloaded bundle hashes to {digest.hexdigest()}, signed {self.plan.sha256}"
            )
        os.close(fd)
        self._fd = None
        # Bitmap first: a crash after this leaves a part file without marks (re-download),
        # never marks that outlive their part file.
        self.bitmap_path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.part_path.replace(self.final_path)
        fsync_dir(self.directory)
        log.info("transfer %s complete: %s", self.plan.transfer_id, self.final_path)
        return self.final_path

    def abandon(self) -> None:
        """Discard the partial download (part file and bitmap).

        Raises:
            OSError: unlinking or syncing the directory failed.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.bitmap_path.unlink(missing_ok=True)
        self.part_path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def __enter__(self) -> PartialDownload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
