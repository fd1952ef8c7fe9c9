"""``python -m registry``: serve the registry, or run its migrations.

::

    python -m registry serve --port 8083 --dsn postgresql://...
    python -m registry migrate up [N]      # apply N pending migrations (default: all)
    python -m registry migrate down N      # roll back the last N
    python -m registry migrate status

The DSN comes from ``--dsn`` or ``NOPS_REGISTRY_DSN``, or from a file (a
mounted container secret) named by ``--dsn-file`` or ``NOPS_REGISTRY_DSN_FILE``;
naming both is an error. The admin key (for
``GET /admin/agents``) is read from the environment variable named by
``--admin-key-env`` or the file named by ``--admin-key-file``; only its
SHA-256 is kept. Logs are one JSON object per line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
from aiohttp import web

from registry.app import create_app
from registry.migrate import MigrationError, applied_versions, load_migrations
from registry.migrate import migrate_down as _down
from registry.migrate import migrate_up as _up
from registry.settings import RegistrySettings, admin_key_digest
from registry.status import StatusPolicy
from secretfile import SecretFileError, read_secret_file

__all__ = ["main"]

DSN_ENV: Final = "NOPS_REGISTRY_DSN"
DSN_FILE_ENV: Final = "NOPS_REGISTRY_DSN_FILE"
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__  # SECURITY: no stack trace
        return orjson.dumps(entry, default=str).decode()


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", default=os.environ.get(DSN_ENV, ""), help=f"or ${DSN_ENV}")
    common.add_argument(
        "--dsn-file",
        default=os.environ.get(DSN_FILE_ENV, ""),
        help=f"file holding the DSN, or ${DSN_FILE_ENV}",
    )
    common.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    parser = argparse.ArgumentParser(prog="python -m registry", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8083)
    serve.add_argument("--stale-after", type=float, default=15.0, help="seconds (default 15)")
    serve.add_argument("--zombie-after", type=float, default=60.0, help="seconds (default 60)")
    serve.add_argument("--sweep-interval", type=float, default=1.0, help="seconds (default 1)")
    serve.add_argument("--bus-url", default="", help="bus service base URL; empty: log events")
    serve.add_argument("--topic", default="agents", help="bus topic for agent events")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--admin-key-env", default="", help="env var holding the admin key")
    keys.add_argument("--admin-key-file", type=Path, help="file holding the admin key")
    serve.add_argument("--no-migrate", action="store_true", help="do not migrate at start")

    migrate = commands.add_parser(
        "migrate", parents=[common], help="apply or roll back schema migrations"
    )
    migrate.add_argument("direction", choices=("up", "down", "status"))
    migrate.add_argument("steps", nargs="?", type=int, help="how many (up: default all)")
    return parser


def _admin_digest(args: argparse.Namespace) -> str:
    if args.admin_key_env:
        key = os.environ.get(args.admin_key_env, "")
        if not key:
            raise ValueError(f"--admin-key-env: ${args.admin_key_env} is not set")
        return admin_key_digest(key)
    if args.admin_key_file is not None:
        return admin_key_digest(args.admin_key_file.read_text().rstrip("\n"))
    return ""


def _serve(args: argparse.Namespace) -> int:
    settings = RegistrySettings(
        dsn=args.dsn,
        status=StatusPolicy(stale_after_s=args.stale_after, zombie_after_s=args.zombie_after),
        sweep_interval_s=args.sweep_interval,
        bus_url=args.bus_url,
        topic=args.topic,
        admin_key_sha256=_admin_digest(args),
        migrate=not args.no_migrate,
    )
    logging.getLogger("registry").info(
        "serving", extra={"host": args.host, "port": args.port, "bus": bool(args.bus_url)}
    )
    web.run_app(
        create_app(settings, clock=time.time),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(args.dsn, timeout=10)
    try:
        if args.direction == "up":
            done = await _up(conn, args.steps)
            print(f"applied: {done or 'nothing to apply'}")
        elif args.direction == "down":
            if args.steps is None:
                print("migrate down needs the number of migrations to roll back", file=sys.stderr)
                return 2
            done = await _down(conn, args.steps)
            print(f"rolled back: {done or 'nothing to roll back'}")
        else:
            applied = await applied_versions(conn)
            known = [m.version for m in load_migrations()]
            pending = [v for v in known if v not in applied]
            print(f"applied: {applied}  pending: {pending}")
    finally:
        await conn.close()
    return 0


def _read_dsn_file(path: str) -> str:
    """The DSN held in ``path``; errors name the file, never its content."""
    try:
        return read_secret_file(path)
    except SecretFileError as exc:
        if exc.empty:
            raise ValueError(f"the DSN file {path} is empty") from None
        raise ValueError(f"cannot read the DSN file {path}: {exc.reason}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.dsn and args.dsn_file:
        print("registry: give the DSN or a DSN file, not both", file=sys.stderr)
        return 2
    if args.dsn_file:
        try:
            args.dsn = _read_dsn_file(args.dsn_file)
        except ValueError as exc:
            print(f"registry: {exc}", file=sys.stderr)
            return 2
    if not args.dsn:
        print(f"registry: no database: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        return asyncio.run(_migrate(args))
    except (ValueError, OSError, MigrationError, asyncpg.PostgresError) as exc:
        # SECURITY: the message names the problem, never the DSN (it may hold a password).
        print(f"registry: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
