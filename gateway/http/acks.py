"""Signed ack URLs (contract §8, §10).

Every delivery's payload carries ``<public_url>/v1/acks/<message_id>?sig=<hex>`` where
``sig`` is HMAC-SHA256(secret, message_id). A device that holds the URL may ack that one
delivery without an account (a phone that got an FCM push has no broker credentials);
the signature binds the URL to its message_id, so it cannot be replayed for another
delivery. The secret lives in ``ack_secret_file`` (default ``<data_dir>/ack_secret``),
created 0600 with 32 random bytes when missing, and is never logged or printed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from gateway.config import Config

SECRET_BYTES = 32


def secret_path(cfg: Config) -> Path:
    assert cfg.http is not None
    return cfg.http.ack_secret_file or (cfg.data_dir / "ack_secret")


def load_or_create_secret(path: Path) -> bytes:
    """The HMAC key: the file's bytes (stripped), or a new random key written 0600."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(SECRET_BYTES).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return load_or_create_secret(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return key
    if len(data) < 16:
        raise ValueError(f"{path}: an ack secret needs at least 16 bytes")
    return data


class AckSigner:
    """Builds and checks signed ack URLs; the one place that knows the secret."""

    def __init__(self, secret: bytes, base_url: str):
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    @classmethod
    def from_config(cls, cfg: Config) -> "AckSigner":
        assert cfg.http is not None
        return cls(load_or_create_secret(secret_path(cfg)), cfg.http.base_url())

    def __repr__(self) -> str:  # the secret must not reach a log or a traceback
        return f"AckSigner(base_url={self.base_url!r})"

    def sign(self, message_id: str) -> str:
        return hmac.new(self._secret, message_id.encode(), hashlib.sha256).hexdigest()

    def url(self, message_id: str) -> str:
        return f"{self.base_url}/v1/acks/{message_id}?sig={self.sign(message_id)}"

    def verify(self, message_id: str, sig: str) -> bool:
        """Constant-time check of ``sig`` (hex, either case) for ``message_id``."""
        try:
            given = sig.lower().encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(self.sign(message_id).encode("ascii"), given)


def load_signer(cfg: Config) -> tuple[AckSigner, str | None]:
    """The signer of ``[http]`` and, if its secret cannot be used, why (the API then
    refuses to start with that line; the signer returned meanwhile signs with a dummy key
    that no URL is ever checked against)."""
    assert cfg.http is not None
    try:
        return AckSigner.from_config(cfg), None
    except (OSError, ValueError) as exc:
        return (AckSigner(b"unused" * 4, cfg.http.base_url()),
                f"http.ack_secret_file: cannot use {secret_path(cfg)}: {exc}")


__all__ = ["AckSigner", "load_or_create_secret", "load_signer", "secret_path"]
