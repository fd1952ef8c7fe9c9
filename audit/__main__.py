"""``audit``: verify a chain offline, export its checkpoints.

    audit verify FILE [--public-key PEM]... [--checkpoints EXPORT] [--json]
    audit verify --dsn DSN --chain ID [--public-key PEM]... [--checkpoints EXPORT] [--json]
    audit checkpoints FILE | --dsn DSN --chain ID [-o OUT]
    audit schema            (the PostgreSQL tables, for a DBA to create)

Exit status of ``verify``: 0 intact, 1 damaged, 2 usage or read error.
The DSN may also come from ``$NOPS_AUDIT_DSN`` (keeps a password off the
command line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.checkpoint import (
    DEFAULT_KEY_NAME,
    SigningKeyError,
    key_id,
    load_public_key,
    public_key_path,
)
from audit.stores.file import checkpoints_path
from audit.verify import Report, load_checkpoint_documents, verify_file, verify_postgres

__all__ = ["main"]

DSN_ENV: Final = "NOPS_AUDIT_DSN"
EXIT_INTACT: Final = 0
EXIT_DAMAGED: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "schema":
            from audit.stores.postgres import SCHEMA

            print(SCHEMA.strip())
            return EXIT_INTACT
        return _export(args)
    except UsageError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit", description="Verify NOPS audit chains offline; export checkpoints."
    )
    commands = parser.add_subparsers(dest="command")
    verify = commands.add_parser("verify", help="check a chain and its signed checkpoints")
    _source_arguments(verify)
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="trusted Ed25519 public key (repeat for rotated keys); "
        f"default for a file: {public_key_path(Path(DEFAULT_KEY_NAME)).name} beside it",
    )
    verify.add_argument(
        "--checkpoints",
        type=Path,
        metavar="EXPORT",
        help="checkpoints exported earlier and kept elsewhere (detects a cut tail)",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    export = commands.add_parser("checkpoints", help="export the signed checkpoints as JSON")
    _source_arguments(export)
    export.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    commands.add_parser("schema", help="print the SQL that creates the PostgreSQL tables")
    return parser


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", type=Path, help="a JSONL audit log")
    parser.add_argument("--dsn", help=f"PostgreSQL DSN (or ${DSN_ENV})")
    parser.add_argument("--chain", help="chain id (required with --dsn)")


def _source(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    dsn = args.dsn or (os.environ.get(DSN_ENV) if args.file is None else None)
    if (args.file is None) == (dsn is None):
        raise UsageError("give either a FILE or --dsn (and --chain)")
    if dsn is not None and not args.chain:
        raise UsageError("--chain is required with --dsn")
    if args.file is not None and not args.file.is_file():
        raise UsageError(f"{args.file}: no such file")
    return args.file, dsn


def _keys(args: argparse.Namespace, file: Path | None) -> tuple[dict[str, Ed25519PublicKey], str]:
    paths: list[Path] = list(args.public_key)
    source = "given"
    if not paths and file is not None:
        beside = file.parent / public_key_path(Path(DEFAULT_KEY_NAME)).name
        if beside.is_file():
            paths = [beside]
            source = "beside the log"
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = load_public_key(path)
        except SigningKeyError as exc:
            raise UsageError(str(exc)) from None
        keys[key_id(key)] = key
    return keys, source


def _verify(args: argparse.Namespace) -> int:
    file, dsn = _source(args)
    keys, key_source = _keys(args, file)
    exported = _read_checkpoints(args.checkpoints) if args.checkpoints else None
    try:
        if file is not None:
            report = verify_file(file, keys=keys, exported=exported, chain_id=args.chain)
        else:
            assert dsn is not None  # noqa: S101 - _source guarantees one of the two
            report = asyncio.run(verify_postgres(dsn, args.chain, keys=keys, exported=exported))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the log: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - asyncpg errors: unreachable or refused
        raise UsageError(f"cannot read the log: {type(exc).__name__}: {exc}") from None
    if report.checkpoints_read and not keys:
        raise UsageError("the chain has signed checkpoints: give the public key (--public-key)")
    if key_source == "beside the log" and report.checkpoints:
        report.notes.append(
            "the public key was read from beside the log; pass --public-key with an "
            "independently kept copy for a check an intruder cannot redo"
        )
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_report(report)
    return EXIT_INTACT if report.intact else EXIT_DAMAGED


def _print_report(report: Report) -> None:
    print(f"chain        {report.chain_id}")
    print(f"records      {report.records} read, intact through seq {report.last_seq}")
    if report.head_hash:
        print(f"head         {report.head_hash}")
    print(
        f"checkpoints  {report.checkpoints} verified"
        + (f", last at seq {report.last_checkpoint_seq}" if report.checkpoints else "")
    )
    for note in report.notes:
        print(f"note         {note}")
    first = report.first
    if first is None:
        print("INTACT")
        return
    print(f"DAMAGED      {first.kind} at seq {first.seq}: {first.detail}")
    for other in report.damage:
        if other is not first:
            print(f"also         {other.kind} at seq {other.seq}: {other.detail}")


def _read_checkpoints(path: Path) -> list[dict[str, Any]]:
    try:
        return load_checkpoint_documents(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read checkpoints {path}: {exc}") from None


def _export(args: argparse.Namespace) -> int:
    file, dsn = _source(args)
    if file is not None:
        stored = checkpoints_path(file)
        documents = _read_checkpoints(stored) if stored.exists() else []
    else:
        assert dsn is not None  # noqa: S101 - _source guarantees one of the two
        try:
            documents = asyncio.run(_pg_checkpoints(dsn, args.chain))
        except Exception as exc:  # noqa: BLE001 - asyncpg errors: unreachable or refused
            raise UsageError(f"cannot read checkpoints: {type(exc).__name__}: {exc}") from None
    data = orjson.dumps(documents, option=orjson.OPT_INDENT_2) + b"\n"
    if args.output:
        args.output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return EXIT_INTACT


async def _pg_checkpoints(dsn: str, chain_id: str) -> list[dict[str, Any]]:
    import asyncpg

    from audit.stores.postgres import iter_checkpoints

    conn = await asyncpg.connect(dsn)
    try:
        return [orjson.loads(text) for text in await iter_checkpoints(conn, chain_id)]
    finally:
        await conn.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
