"""``python -m bus serve``: run the bus service.

    python -m bus serve --port 8082 --redis-url redis://127.0.0.1:6379/0

Every :class:`~bus.config.BusConfig` field is a flag (``--max-stream-len``)
and an environment variable (``NOPS_BUS__MAX_STREAM_LEN``); flags win.
SIGTERM or SIGINT stop it gracefully: in-flight requests (long-polls
included) get ``--shutdown-timeout`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from bus.config import BusConfig, BusConfigError, config_from_env
from bus.logs import configure_logging, redact_url

__all__ = ["main"]

_log = logging.getLogger("bus")
_TYPES = {"int": int, "float": float, "str": str}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bus", description="NOPS event bus service")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the bus HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8082)
    serve.add_argument("--shutdown-timeout", type=float, default=10.0)
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT: several bus processes share the port (they hold no state)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    for field in dataclasses.fields(BusConfig):
        serve.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_TYPES.get(str(field.type), str),
            help=f"default {field.default}",
        )
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BusConfig)}
    try:
        config = config_from_env(**overrides)
    except BusConfigError as exc:
        print(f"config error: {exc.key}: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    # Imported late so that --help stays light.
    from bus.app import create_app

    _log.info(
        "starting",
        extra={"host": args.host, "port": args.port, "redis": redact_url(config.redis_url)},
    )
    web.run_app(
        create_app(config),
        host=args.host,
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        reuse_port=args.reuse_port or None,
        print=None,
        access_log=None,
        loop=_new_loop(),
    )
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


if __name__ == "__main__":
    sys.exit(main())
