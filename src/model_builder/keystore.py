"""The offline key store: create a root and its roles, rotate and revoke keys, sign targets.

Layout of a key store directory::

    root.json                 the newest root version (what new devices are provisioned with)
    roots/<N>.root.json       every root version; devices walk this chain to rotate
    keys/<label>.pem          private keys (PKCS#8 PEM, encrypted when a passphrase is given)
    keys/<label>.pub.json     {"label", "keyid", "roles", "key"} for each key
    keys/revoked/             private keys of revoked keys, kept for audit, never used again

Roles follow ``edge_agent.trust.root``: ``root`` and ``targets`` keys are offline (this store),
``timestamp``/``snapshot`` belong to the fleet server's online key, which may be generated here
for a single-machine setup or imported as a public key only.

Owns: key files and root versions on disk. The verification rules themselves live in
``edge_agent.trust`` and are what this module's output is checked against.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.metadata import Metadata, Role, Root, Targets

from edge_agent.common import durable
from edge_agent.errors import BundleVerificationError
from edge_agent.trust import ROLES, TrustedRoot
from model_builder.errors import KeyStoreError

ONLINE_ROLES = ("timestamp", "snapshot")


@dataclass(frozen=True)
class KeyInfo:
    """A key's label, id, roles and whether its private half is in this store."""

    label: str
    keyid: str
    roles: tuple[str, ...]
    has_private: bool


class KeyStore:
    """A directory of offline keys and root versions. Create with ``init``, load with ``open``."""

    def __init__(self, path: Path, passphrase: bytes | None = None) -> None:
        self.path = Path(path)
        self._passphrase = passphrase

    # ----------------------------------------------------------------- creation and loading
    @classmethod
    def init(
        cls,
        path: Path,
        *,
        now: datetime,
        root_keys: int = 1,
        root_threshold: int = 1,
        targets_keys: int = 1,
        targets_threshold: int = 1,
        online_keys: int = 1,
        expires_days: int = 365,
        passphrase: bytes | None = None,
    ) -> KeyStore:
        """Create a new key store with fresh Ed25519 keys and a self-signed root v1.

        Raises:
            KeyStoreError: the directory already holds a key store, or thresholds exceed keys.
        """
        for n, t, role in (
            (root_keys, root_threshold, "root"),
            (targets_keys, targets_threshold, "targets"),
        ):
            if not 1 <= t <= n:
                raise KeyStoreError(f"{role}: threshold {t} needs 1..{n} keys")
        if online_keys < 1:
            raise KeyStoreError("at least one online key is needed")
        store = cls(path, passphrase)
        if store.root_path.exists():
            raise KeyStoreError(f"{path} already holds a key store")
        (store.path / "keys").mkdir(parents=True, exist_ok=True)
        (store.path / "roots").mkdir(exist_ok=True)
        root = Root(
            version=1,
            expires=now + timedelta(days=expires_days),
            keys={},
            roles={r: Role([], 1) for r in ROLES},
            consistent_snapshot=False,
        )
        signers: list[CryptoSigner] = []
        for i in range(root_keys):
            s = store._generate(f"root-{i + 1}", ("root",))
            root.add_key(s.public_key, "root")
            signers.append(s)
        for i in range(targets_keys):
            root.add_key(store._generate(f"targets-{i + 1}", ("targets",)).public_key, "targets")
        for i in range(online_keys):
            key = store._generate(f"online-{i + 1}", ONLINE_ROLES).public_key
            for role in ONLINE_ROLES:
                root.add_key(key, role)
        root.roles["root"].threshold = root_threshold
        root.roles["targets"].threshold = targets_threshold
        md = Metadata(root)
        for s in signers:
            md.sign(s, append=True)
        store._save_root(md)
        return store

    @classmethod
    def open(cls, path: Path, passphrase: bytes | None = None) -> KeyStore:
        """Open an existing key store.

        Raises:
            KeyStoreError: no root.json in ``path``.
        """
        store = cls(path, passphrase)
        if not store.root_path.is_file():
            raise KeyStoreError(f"{path} is not a key store (no root.json); run `keys init`")
        return store

    @property
    def root_path(self) -> Path:
        return self.path / "root.json"

    def root_bytes(self) -> bytes:
        return self.root_path.read_bytes()

    def root_chain(self) -> list[bytes]:
        """Every root version in order, starting at v1."""
        files = sorted(
            (self.path / "roots").glob("*.root.json"), key=lambda p: int(p.name.split(".")[0])
        )
        return [p.read_bytes() for p in files]

    def trusted_root(self) -> TrustedRoot:
        """The newest root, verified by walking the whole chain from v1."""
        chain = self.root_chain()
        return TrustedRoot.from_chain(chain[0], chain[1:])

    def list_keys(self) -> list[KeyInfo]:
        """Every key recorded in this store (revoked ones excluded)."""
        out = []
        for pub in sorted((self.path / "keys").glob("*.pub.json")):
            info = json.loads(pub.read_text())
            label = str(info["label"])
            out.append(
                KeyInfo(
                    label,
                    str(info["keyid"]),
                    tuple(info["roles"]),
                    (self.path / "keys" / f"{label}.pem").is_file(),
                )
            )
        return out

    # ----------------------------------------------------------------------- signing
    def signer(self, label: str) -> CryptoSigner:
        """Load the private key ``label``.

        Raises:
            KeyStoreError: missing, revoked, or the passphrase is wrong.
        """
        pem = self.path / "keys" / f"{label}.pem"
        if not pem.is_file():
            raise KeyStoreError(f"no private key {label!r} in {self.path / 'keys'}")
        try:
            priv = serialization.load_pem_private_key(pem.read_bytes(), self._passphrase)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(
                f"cannot load key {label!r}: wrong or missing passphrase? ({exc})"
            ) from exc
        return CryptoSigner(priv)

    def signers_for(self, role: str, labels: Sequence[str] | None = None) -> list[CryptoSigner]:
        """Signers for ``role`` in the current root: the named ones, or every available one.

        Raises:
            KeyStoreError: a named key is not authorised for ``role`` or none is available.
        """
        root = self.trusted_root()
        allowed = set(root.keyids(role))
        infos = {k.label: k for k in self.list_keys()}
        chosen = (
            list(labels)
            if labels
            else [k.label for k in infos.values() if k.keyid in allowed and k.has_private]
        )
        signers = []
        for label in chosen:
            info = infos.get(label)
            if info is None or info.keyid not in allowed:
                raise KeyStoreError(f"key {label!r} is not a current {role} key")
            signers.append(self.signer(label))
        if not signers:
            raise KeyStoreError(f"no private {role} key available in {self.path}")
        return signers

    def sign_targets(self, targets: Targets, labels: Sequence[str] | None = None) -> bytes:
        """Sign targets metadata with the named (or all available) targets keys."""
        md = Metadata(targets)
        for s in self.signers_for("targets", labels):
            md.sign(s, append=True)
        return bytes(md.to_bytes())

    # ---------------------------------------------------------------------- rotation
    def rotate(
        self,
        role: str,
        *,
        now: datetime,
        add: int = 0,
        add_public: Iterable[Path] = (),
        remove: Iterable[str] = (),
        threshold: int | None = None,
        expires_days: int = 365,
    ) -> int:
        """Write root v+1 with ``role``'s keys changed; returns the new version.

        ``remove`` takes key ids or labels (``targets-1``): revoking a stolen builder key is
        ``rotate("targets", remove=["targets-1"], add=1)``. A removed key that no role lists
        any more is retired to ``keys/revoked/``.

        The new root is signed by every root key this store holds from the old and the new
        root, which must reach both thresholds (checked by verifying the new root exactly as a
        device would).

        Raises:
            KeyStoreError: unknown role or key, threshold out of range, or too few root keys.
        """
        if role not in ROLES:
            raise KeyStoreError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        labels = {k.label: k.keyid for k in self.list_keys()}
        removals = [labels.get(r, r) for r in remove]  # a label or a key id
        imports = [_load_public_key(p) for p in add_public]

        def change(new: Root) -> None:
            for keyid in removals:
                if keyid not in new.roles[role].keyids:
                    raise KeyStoreError(f"key {keyid} is not a {role} key")
                new.revoke_key(keyid, role)
            for _ in range(add):
                roles = ONLINE_ROLES if role in ONLINE_ROLES else (role,)
                generated = self._generate(self._free_label(role), roles).public_key
                for r in roles:
                    new.add_key(generated, r)
            for imported in imports:
                new.add_key(imported, role)
                self._record(f"{role}-imported-{imported.keyid[:8]}", imported, (role,))
            if threshold is not None:
                new.roles[role].threshold = threshold

        version = self._publish(change, now=now, expires_days=expires_days)
        root = self.trusted_root()
        for keyid in removals:  # a key no role lists any more is retired, like `revoke`
            if not any(keyid in root.keyids(r) for r in ROLES):
                self._retire(keyid)
        return version

    def revoke(self, keyid: str, *, now: datetime, expires_days: int = 365) -> int:
        """Remove ``keyid`` from every role in a new root version and retire its private key.

        Raises:
            KeyStoreError: the key is not in the current root, or removing it breaks a threshold.
        """
        root = Metadata[Root].from_bytes(self.root_bytes()).signed
        roles = [r for r in ROLES if keyid in root.roles[r].keyids]
        if not roles:
            raise KeyStoreError(f"key {keyid} is not in root v{root.version}")

        def change(new: Root) -> None:
            for role in roles:
                new.revoke_key(keyid, role)

        version = self._publish(change, now=now, expires_days=expires_days)
        self._retire(keyid)
        return version

    def _retire(self, keyid: str) -> None:
        """Move a key no role lists any more to ``keys/revoked/`` (kept for audit, never used)."""
        for info in self.list_keys():
            if info.keyid == keyid:
                revoked = self.path / "keys" / "revoked"
                revoked.mkdir(exist_ok=True)
                for suffix in (".pem", ".pub.json"):
                    src = self.path / "keys" / f"{info.label}{suffix}"
                    if src.exists():
                        src.replace(revoked / src.name)

    # --------------------------------------------------------------------- internals
    def _publish(self, change: Callable[[Root], None], *, now: datetime, expires_days: int) -> int:
        """Apply ``change`` to a copy of the current root and save it as the next version.

        The new root is signed by every root key this store holds from the old and the new
        root, and is verified exactly as a device would before it is saved.
        """
        old: Root = Metadata[Root].from_bytes(self.root_bytes()).signed
        new: Root = Metadata[Root].from_bytes(self.root_bytes()).signed
        new.version = old.version + 1
        new.expires = now + timedelta(days=expires_days)
        change(new)
        for role in ROLES:
            n = len(new.roles[role].keyids)
            if n < 1 or not 1 <= new.roles[role].threshold <= n:
                raise KeyStoreError(
                    f"{role} would have {n} key(s) for threshold {new.roles[role].threshold}"
                )
        md = Metadata(new)
        signing_ids = set(old.roles["root"].keyids) | set(new.roles["root"].keyids)
        for info in self.list_keys():
            if info.keyid in signing_ids and info.has_private:
                md.sign(self.signer(info.label), append=True)
        data = bytes(md.to_bytes())
        try:
            self.trusted_root().update(data)
        except BundleVerificationError as exc:
            raise KeyStoreError(f"the keys here cannot sign root v{new.version}: {exc}") from exc
        self._save_root(md)
        return int(new.version)

    def _free_label(self, prefix: str) -> str:
        keys_dir = self.path / "keys"
        n = 1
        while (keys_dir / f"{prefix}-{n}.pub.json").exists() or (
            keys_dir / "revoked" / f"{prefix}-{n}.pub.json"
        ).exists():
            n += 1
        return f"{prefix}-{n}"

    def _generate(self, label: str, roles: tuple[str, ...]) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self._passphrase)
            if self._passphrase
            else serialization.NoEncryption()
        )
        pem = signer._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )
        durable.write_atomic(self.path / "keys" / f"{label}.pem", pem, 0o600)
        self._record(label, signer.public_key, roles)
        return signer

    def _record(self, label: str, key: Key, roles: tuple[str, ...]) -> None:
        info = {"label": label, "keyid": key.keyid, "roles": list(roles), "key": key.to_dict()}
        durable.write_atomic(
            self.path / "keys" / f"{label}.pub.json", json.dumps(info, indent=2).encode()
        )

    def _save_root(self, md: Metadata[Root]) -> None:
        data = bytes(md.to_bytes())
        durable.write_atomic(self.path / "roots" / f"{md.signed.version}.root.json", data)
        durable.write_atomic(self.root_path, data)


def _load_public_key(path: Path) -> Key:
    """A public key from a ``*.pub.json`` written by a key store or a PEM public key file.

    Raises:
        KeyStoreError: unreadable or unsupported key.
    """
    raw = Path(path).read_bytes()
    try:
        if raw.lstrip().startswith(b"{"):
            info: dict[str, Any] = json.loads(raw)
            return SSlibKey.from_dict(str(info["keyid"]), dict(info["key"]))
        return SSlibKey.from_crypto(serialization.load_pem_public_key(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyStoreError(f"cannot read public key {path}: {exc}") from exc


def utcnow() -> datetime:
    """The wall clock, for the CLI boundary only; the core always takes ``now`` as a value."""
    return datetime.now(UTC)
