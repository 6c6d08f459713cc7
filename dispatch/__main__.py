"""Command line: `dispatch serve` and `dispatch migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec

from dispatch.errors import ConfigError, DispatchError
from dispatch.logs import configure_logging
from dispatch.settings import Settings, load_settings

log = logging.getLogger("dispatch")


def _serve(settings: Settings, config: str | None) -> None:
    from dispatch import workers
    from dispatch.service import Service

    if workers.worker_count(settings) > 1:
        workers.run(settings, config)
        return

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.run(Service(settings).run())


def _migrate(settings: Settings) -> None:
    from dispatch.migrate import migrate
    from dispatch.service import resolve_database_url

    applied = migrate(resolve_database_url(settings))
    print(f"applied {len(applied)} migration(s): {applied}" if applied else "schema is up to date")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatch", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (else $DISPATCH_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker: API, ops port and background loops")
    serve.add_argument(
        "--workers", type=int, metavar="N",
        help="processes, each a full replica sharing the API port (default: server.workers, "
             "0 = one per CPU)",
    )
    sub.add_parser("migrate", help="apply pending database migrations and exit")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dispatch: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.logging)
    try:
        if args.command == "serve":
            if args.workers is not None:
                if not 0 <= args.workers <= 64:
                    print("dispatch: --workers must be between 0 and 64", file=sys.stderr)
                    return 2
                settings = msgspec.structs.replace(
                    settings,
                    server=msgspec.structs.replace(settings.server, workers=args.workers),
                )
            _serve(settings, args.config)
        else:
            _migrate(settings)
    except DispatchError as exc:
        print(f"dispatch: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
