"""Per-agent API keys, stored hashed.

A client presents ``Authorization: ApiKey <id>.<secret>``. The gateway keeps
only ``sha256:<hex>`` of the secret (API keys are random, high-entropy
secrets, so a fast hash is enough; it is not a password store) and compares
digests in constant time. The ``id`` names the key in config and logs; the
secret is never logged or echoed.

Generate a key and its config entry::

    python -m gateway.apikeys new agent-7

or hash a secret you already have (read from stdin, one trailing newline
dropped; the secret is the part after the first ``.``)::

    printf '%s' "$SECRET" | python -m gateway.apikeys hash
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from typing import Final

from gateway.config import ApiKeyConfig

__all__ = ["SCHEME", "ApiKeyRejected", "ApiKeyStore", "hash_secret", "main"]

#: The ``Authorization`` scheme (RFC 9110 §11.4) for API keys.
SCHEME: Final = "ApiKey"
_CREDENTIAL: Final = re.compile(r"([A-Za-z0-9_-]{1,64})\.([\x21-\x7e]{1,512})")
# Compared against when the id is unknown, so a miss costs the same as a hit.
_DUMMY_DIGEST: Final = hashlib.sha256(b"nops-gateway unknown api key").digest()


class ApiKeyRejected(Exception):
    """The API key is not accepted; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, *, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


def hash_secret(secret: str) -> str:
    """The stored form of an API key secret: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    """The configured keys, by id."""

    def __init__(self, keys: Iterable[ApiKeyConfig]) -> None:
        self._keys = {
            key.id: (key, bytes.fromhex(key.hash.removeprefix("sha256:"))) for key in keys
        }

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, credential: str) -> ApiKeyConfig:
        """The key ``<id>.<secret>`` names if its secret matches, else :class:`ApiKeyRejected`."""
        match = _CREDENTIAL.fullmatch(credential)
        if match is None:
            raise ApiKeyRejected("api_key_malformed")
        key_id, secret = match.groups()
        known = self._keys.get(key_id)
        digest = hashlib.sha256(secret.encode()).digest()
        # SECURITY: constant-time, and an unknown id is compared too.
        matches = hmac.compare_digest(digest, known[1] if known else _DUMMY_DIGEST)
        if known is None or not matches:
            raise ApiKeyRejected("api_key_invalid", key_id=key_id if known else None)
        return known[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["hash"]:
        secret = sys.stdin.read().removesuffix("\n").removesuffix("\r")
        if not secret:
            print("error: no secret on stdin", file=sys.stderr)
            return 2
        print(hash_secret(secret))
        return 0
    if len(args) == 2 and args[0] == "new" and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args[1]):
        key_id, secret = args[1], secrets.token_urlsafe(32)
        print(f"# give the agent:  Authorization: {SCHEME} {key_id}.{secret}")
        print("[[api_keys]]")
        print(f'id = "{key_id}"')
        print('tenant = "<tenant>"')
        print(f'hash = "{hash_secret(secret)}"')
        return 0
    print(
        "usage: python -m gateway.apikeys hash   (secret on stdin)\n"
        "       python -m gateway.apikeys new <id>",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
