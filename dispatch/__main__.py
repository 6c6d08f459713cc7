"""Command line: `dispatch serve` and `dispatch migrate` (the server), and the client's commands
`task`, `agent`, `worker` and `top` (dispatch/sdk/cli.py)."""

from __future__ import annotations

import argparse
import sys

from dispatch import __version__
from dispatch.sdk import cli

SERVER_EXTRA = (
    "dispatch: {command} needs the server's dependencies, which this install lacks ({missing}):"
    " pip install 'dispatch-broker[server]'"
)


def _serve(settings: object, config: str | None) -> None:
    import asyncio

    from dispatch import preflight, supervisor
    from dispatch.service import Service
    from dispatch.settings import Settings
    from dispatch.tracing import check_installed

    assert isinstance(settings, Settings)
    workers = supervisor.worker_count(settings)
    if not settings.server.reuse_port:  # else a worker of serve --workers: checked already
        preflight.check_ports(settings)
        preflight.check_pool_mode(settings.database)
        check_installed(settings.tracing)
        if settings.database.url:
            preflight.check_database(settings.database.url)
        if settings.database.listen_url:
            preflight.check_database(settings.database.listen_url, "database.listen_url")
    if workers > 1:
        if supervisor.run(settings, config) != 0:
            raise SystemExit(1)
        return

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.run(Service(settings).run())


def _migrate(settings: object) -> None:
    from dispatch.migrate import migrate
    from dispatch.preflight import check_database, session_url
    from dispatch.service import resolve_database_url
    from dispatch.settings import Settings

    assert isinstance(settings, Settings)
    if settings.database.url:
        check_database(settings.database.url)
    if settings.database.listen_url:
        check_database(settings.database.listen_url, "database.listen_url")
    applied = migrate(session_url(settings.database, resolve_database_url(settings)))
    print(f"applied {len(applied)} migration(s): {applied}" if applied else "schema is up to date")


def _server(args: argparse.Namespace) -> int:
    """serve and migrate: they load the settings and need the server extra."""
    try:
        import msgspec

        from dispatch.errors import ConfigError, DispatchError
        from dispatch.logs import configure_logging
        from dispatch.settings import load_settings
    except ImportError as exc:
        print(SERVER_EXTRA.format(command=args.command, missing=exc.name), file=sys.stderr)
        return 2
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
    except ImportError as exc:
        print(SERVER_EXTRA.format(command=args.command, missing=exc.name), file=sys.stderr)
        return 2
    except DispatchError as exc:
        print(f"dispatch: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dispatch {__version__}")
    # Global options work before the command and after it (`dispatch serve --config FILE`).
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="YAML configuration file (else $DISPATCH_CONFIG)",
                        default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML configuration file (else $DISPATCH_CONFIG)")
    cli.add_client_options(parser, leaf=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[config],
                           help="run the broker: API, ops port and background loops")
    serve.add_argument(
        "--workers", type=int, metavar="N",
        help="processes, each a full replica sharing the API port (default: server.workers, "
             "0 = one per CPU)",
    )
    sub.add_parser("migrate", parents=[config], help="apply pending database migrations and exit")
    cli.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("serve", "migrate"):
        return _server(args)
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
