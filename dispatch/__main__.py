"""Command line: `dispatch serve` and `dispatch migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dispatch.errors import ConfigError, DispatchError
from dispatch.logs import configure_logging
from dispatch.settings import Settings, load_settings

log = logging.getLogger("dispatch")


def _serve(settings: Settings) -> None:
    from dispatch.service import Service

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
    sub.add_parser("serve", help="run the broker: API, ops port and background loops")
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
            _serve(settings)
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
