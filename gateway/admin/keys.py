"""Make a new admin API key: ``python -m gateway.admin.keys --role OPERATOR [--id ID]``.

Prints the bearer token once (give it to the operator; it is not stored) and
the ``[[admin.keys]]`` table for the config file, which holds only its hash.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

from gateway.admin.auth import hash_secret
from gateway.admin.rbac import ROLES

__all__ = ["main", "new_key"]


def new_key(key_id: str) -> tuple[str, str]:
    """A fresh (bearer token, configured hash) pair for ``key_id``."""
    secret = secrets.token_urlsafe(32)
    return f"{key_id}.{secret}", hash_secret(secret)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.admin.keys")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--id", default=None, help="key id (default: <role>-<random>)")
    args = parser.parse_args(argv)
    key_id = args.id or f"{args.role.lower().replace('_', '-')}-{secrets.token_hex(4)}"
    token, digest = new_key(key_id)
    print(f"# Bearer token (shown once): Authorization: Bearer {token}", file=sys.stderr)
    print(f'[[admin.keys]]\nid = "{key_id}"\nrole = "{args.role}"\nhash = "{digest}"')
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
