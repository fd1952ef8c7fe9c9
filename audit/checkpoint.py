"""Signed checkpoints: Ed25519 signatures over the chain's head.

A checkpoint states "chain C had head hash H at sequence S, at time T", and
links to the previous checkpoint. It is signed over
``DOMAIN + JCS(body)`` where the body is every member but ``hash`` and
``signature``; ``hash`` is ``sha256`` of the same bytes and is what the next
checkpoint's ``prev_checkpoint_hash`` names. Exported off the machine, the
latest checkpoint proves how long the log was: cutting records off the tail
cannot be hidden from it.

Keys: a PEM (PKCS#8) Ed25519 private key from ``signing_key_file``, or one
generated on first start into the data directory (mode 0600), with the public
key written beside it for verifiers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.record import canonical, rfc3339

__all__ = [
    "CHECKPOINT_DOMAIN",
    "DEFAULT_KEY_NAME",
    "GENESIS_CHECKPOINT",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "Signer",
    "SigningKeyError",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "public_key_path",
]

CHECKPOINT_DOMAIN: Final = b"nops-audit-checkpoint-v1\x00"
#: ``prev_checkpoint_hash`` of a chain's first checkpoint.
GENESIS_CHECKPOINT: Final = "0" * 64
DEFAULT_KEY_NAME: Final = "audit-signing-key.pem"

_BODY_FIELDS: Final = (
    "chain_id",
    "seq",
    "head_hash",
    "time",
    "prev_checkpoint_hash",
    "key_id",
)


class CheckpointError(ValueError):
    """A checkpoint document is malformed."""


class SigningKeyError(Exception):
    """A signing or public key cannot be loaded or created."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A stable identifier of a public key: the first 32 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain_id: str
    seq: int
    head_hash: str
    time: str
    prev_checkpoint_hash: str
    key_id: str
    hash: str
    signature: str

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _BODY_FIELDS}

    def to_document(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash, "signature": self.signature}

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Checkpoint:
        try:
            checkpoint = cls(
                **{name: document[name] for name in (*_BODY_FIELDS, "hash", "signature")}
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"not a checkpoint: {exc}") from None
        if set(document) - {*_BODY_FIELDS, "hash", "signature"}:
            raise CheckpointError("a checkpoint has unknown members")
        if not isinstance(checkpoint.seq, int) or isinstance(checkpoint.seq, bool):
            raise CheckpointError("seq must be an integer")
        return checkpoint

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.body())

    def problem(self, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
        """Why this checkpoint is not authentic under ``keys`` (by key id), or None."""
        if self.hash != hashlib.sha256(self.signed_bytes()).hexdigest():
            return "its hash does not match its contents"
        key = keys.get(self.key_id)
        if key is None:
            return f"it is signed by key {self.key_id}, which is not a trusted key"
        try:
            key.verify(_b64decode(self.signature), self.signed_bytes())
        except (InvalidSignature, ValueError, TypeError, binascii.Error):
            return "its signature does not verify"
        return None


def signed_bytes(body: Mapping[str, Any]) -> bytes:
    return CHECKPOINT_DOMAIN + canonical(body)


class Signer:
    """Signs checkpoints with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(
        self, *, chain_id: str, seq: int, head_hash: str, time: str, prev_checkpoint_hash: str
    ) -> Checkpoint:
        body = {
            "chain_id": chain_id,
            "seq": seq,
            "head_hash": head_hash,
            "time": time,
            "prev_checkpoint_hash": prev_checkpoint_hash,
            "key_id": self.key_id,
        }
        data = signed_bytes(body)
        return Checkpoint(
            chain_id=chain_id,
            seq=seq,
            head_hash=head_hash,
            time=time,
            prev_checkpoint_hash=prev_checkpoint_hash,
            key_id=self.key_id,
            hash=hashlib.sha256(data).hexdigest(),
            signature=_b64encode(self._key.sign(data)),
        )


class Checkpointer:
    """Decides when a checkpoint is due (every N records or T seconds) and makes it."""

    def __init__(
        self,
        signer: Signer,
        *,
        chain_id: str,
        every: int,
        interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.signer = signer
        self.chain_id = chain_id
        self.every = every
        self.interval_s = interval_s
        self._clock = clock
        self.last: Checkpoint | None = None
        self._last_at = clock()

    def resume(self, last: Checkpoint | None) -> None:
        """Continue after the last stored checkpoint."""
        self.last = last
        self._last_at = self._clock()

    @property
    def last_seq(self) -> int:
        return 0 if self.last is None else self.last.seq

    def due(self, head_seq: int) -> bool:
        if head_seq <= self.last_seq:
            return False
        if head_seq - self.last_seq >= self.every:
            return True
        return self._clock() - self._last_at >= self.interval_s

    def seconds_until_due(self) -> float:
        return max(0.0, self.interval_s - (self._clock() - self._last_at))

    def make(self, head_seq: int, head_hash: str) -> Checkpoint:
        now = self._clock()
        checkpoint = self.signer.sign(
            chain_id=self.chain_id,
            seq=head_seq,
            head_hash=head_hash,
            time=rfc3339(now),
            prev_checkpoint_hash=GENESIS_CHECKPOINT if self.last is None else self.last.hash,
        )
        return checkpoint

    def postpone(self) -> None:
        """Try again one interval from now (the store could not take a checkpoint)."""
        self._last_at = self._clock()

    def committed(self, checkpoint: Checkpoint) -> None:
        self.last = checkpoint
        self._last_at = self._clock()


def public_key_path(private_key_path: Path) -> Path:
    """Where the public half of ``private_key_path`` is written: ``<name>.pub.pem``."""
    name = private_key_path.name.removesuffix(".pem")
    return private_key_path.with_name(f"{name}.pub.pem")


def load_or_create_signing_key(configured: str, data_dir: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The configured key, or the data directory's (created with 0600 on first start).

    Returns the key and where its public half was written.
    """
    if configured:
        path = Path(configured)
        key = _load_private_key(path)
        public_path = data_dir / public_key_path(Path(DEFAULT_KEY_NAME)).name
    else:
        path = data_dir / DEFAULT_KEY_NAME
        if not path.exists():
            _create_private_key(path)
        key = _load_private_key(path)
        public_path = public_key_path(path)
    _write_public_key(key.public_key(), public_path)
    return key, public_path


def _create_private_key(path: Path) -> None:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # SECURITY: created 0600 in one step (O_EXCL), never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return  # another process created it first; load that one
    except OSError as exc:
        raise SigningKeyError(f"cannot create signing key {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    # SECURITY: like ssh, refuse a private key that others can read.
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(
            f"signing key {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def _write_public_key(public_key: Ed25519PublicKey, path: Path) -> None:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with contextlib.suppress(OSError):
        if path.read_bytes() == pem:
            return
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        raise SigningKeyError(f"cannot write public key {path}: {exc.strerror or exc}") from None


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("signature must be a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
