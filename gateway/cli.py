"""The ``gateway`` command: ``serve``, ``check-config`` and ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import Config, ConfigError, load_config
from gateway.keyring import build_keyring
from gateway.logs import configure_logging

__all__ = ["main"]

CONFIG_ENV = "NOPS_GATEWAY_CONFIG"

_log = logging.getLogger("gateway.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    path = _config_path(args.config)
    try:
        config = load_config(path)
        # Reads every tenant key's secret, so a missing one is named here.
        build_keyring(config)
    except ConfigError as exc:
        print(f"config error: {exc.key}: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        source = str(path) if path else "built-in defaults"
        print(f"config ok: {source} (version {config.version}, {len(config.routes)} routes)")
        return 0
    return _serve(config, host=args.host, port=args.port, workers=args.workers, path=path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="NOPS policy-as-code gateway")
    parser.add_argument("--version", action="version", version=f"nops-gateway {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help=f"TOML config file (or ${CONFIG_ENV})")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers",
        type=int,
        help="override server.workers: processes serving the port (SO_REUSEPORT)",
    )
    check = commands.add_parser("check-config", help="validate a config file offline")
    check.add_argument("config", type=Path, nargs="?", help="TOML config file")
    return parser


def _config_path(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def _serve(
    config: Config,
    *,
    host: str | None,
    port: int | None,
    workers: int | None,
    path: Path | None,
) -> int:
    # Imported here so that check-config (and a supervisor) stays light.
    from gateway.workers import (
        check_shareable,
        current_worker,
        die_with_parent,
        supervise,
        worker_config,
    )

    configure_logging(config.logging.level)
    bind_host = host or config.server.host
    bind_port = port or config.server.port
    count = config.server.workers if workers is None else workers
    worker = current_worker()
    try:
        check_shareable(config, count)
    except ConfigError as exc:
        print(f"config error: {exc.key}: {exc.message}", file=sys.stderr)
        return 2
    if worker is None and count > 1:
        argv = [sys.executable, "-m", "gateway", "serve", "--host", bind_host]
        argv += ["--port", str(bind_port), "--workers", "1"]
        if path is not None:
            argv += ["--config", str(path)]
        return supervise(config, workers=count, host=bind_host, port=bind_port, worker_argv=argv)
    from gateway.app import create_app
    from gateway.server import serve

    if worker is not None:
        die_with_parent(int(os.environ.get("NOPS_GATEWAY_PARENT", os.getppid())))
        config = worker_config(config, worker)
    _log.info(
        "starting",
        extra={"version": __version__, "host": bind_host, "port": bind_port, "worker": worker},
    )
    loop = _new_loop()
    try:
        loop.run_until_complete(
            serve(
                create_app(config),
                host=bind_host,
                port=bind_port,
                shutdown_timeout=config.server.shutdown_timeout_s,
                reuse_port=worker is not None,
            )
        )
    except Exception:  # noqa: BLE001 - a start-up failure becomes one log line and exit 1
        _log.exception("gateway failed")
        return 1
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    _log.info("stopped")
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
