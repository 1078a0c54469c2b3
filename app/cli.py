"""`python -m app serve | worker | migrate | openapi | dev | audit verify`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from app.core.config import Settings, get_settings
from app.core.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
OPENAPI_FILE = ROOT / "openapi" / "openapi.json"


class _CanonicalSettings(Settings):
    """Settings that ignore the environment: the checked-in OpenAPI must not depend on who generated it."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def canonical_openapi() -> dict[str, Any]:
    from app.main import create_app

    settings = _CanonicalSettings(
        env="test",
        database_url="sqlite://",
        oidc_issuer="https://idp.example.com",
        oidc_audience="tlsoverride",
    )
    return create_app(settings).openapi()


def render_openapi() -> str:
    return json.dumps(canonical_openapi(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def cmd_openapi(args: argparse.Namespace) -> int:
    rendered = render_openapi()
    if args.check:
        current = OPENAPI_FILE.read_text(encoding="utf-8") if OPENAPI_FILE.exists() else ""
        if current != rendered:
            print(f"{OPENAPI_FILE} is stale: run `python -m app openapi`", file=sys.stderr)
            return 1
        print(f"{OPENAPI_FILE} is up to date")
        return 0
    OPENAPI_FILE.parent.mkdir(parents=True, exist_ok=True)
    OPENAPI_FILE.write_text(rendered, encoding="utf-8")
    print(f"wrote {OPENAPI_FILE}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.core.db import make_engine
    from app.core.migrations import current_and_head, upgrade

    settings = get_settings()
    engine = make_engine(settings.database_url)
    upgrade(engine, args.revision)
    current, head = current_and_head(engine)
    print(f"database at revision {current} (head {head})")
    engine.dispose()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        proxy_headers=True,
        log_config=None,
        server_header=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    print("the worker is not built yet (issue 3)", file=sys.stderr)
    return 2


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dev_settings(host: str, port: int) -> Settings:
    from app.core.devidp import DEV_AUDIENCE, DEV_ROLE_MAP

    return Settings(
        env="dev",
        database_url=os.environ.get("TLSO_DATABASE_URL", f"sqlite:///{ROOT / 'var' / 'dev.db'}"),
        oidc_issuer=f"http://{host}:{port}/dev",
        oidc_audience=DEV_AUDIENCE,
        oidc_roles_claim="roles",
        oidc_role_map=DEV_ROLE_MAP,
        oidc_algorithms=["ES256"],
        log_json=False,
        justification_min_length=int(os.environ.get("TLSO_JUSTIFICATION_MIN_LENGTH", "10")),
    )


def cmd_dev(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host):
        print(
            f"refusing to start dev mode on {args.host}: dev tokens are unauthenticated; bind to loopback",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("TLSO_ENV", "dev") == "production":
        print("refusing to start dev mode with TLSO_ENV=production", file=sys.stderr)
        return 2
    import uvicorn

    from app.core.db import make_engine
    from app.core.devidp import DevIdentityProvider
    from app.core.migrations import upgrade
    from app.main import create_app

    settings = dev_settings(args.host, args.port)
    configure_logging(settings.log_level, as_json=False)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    app = create_app(settings, engine=engine, dev_idp=DevIdentityProvider(settings.oidc_issuer))
    base = f"http://{args.host}:{args.port}"
    print(
        f"tlsoverride dev mode: {base}/docs  (database {settings.database_url})\n"
        f"  get a token:  curl -s -X POST {base}/dev/token -H 'content-type: application/json' "
        f'-d \'{{"sub":"alice","roles":["requester"]}}\'',
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from app.audit.service import parse_export, verify_chain, verify_events

    if args.file:
        fmt = args.format or ("csv" if args.file.endswith(".csv") else "jsonl")
        with open(args.file, encoding="utf-8", newline="") as handle:
            result = verify_events(parse_export(handle, fmt))
    else:
        from sqlmodel import Session

        from app.core.db import make_engine

        engine = make_engine(get_settings().database_url)
        with Session(engine) as session:
            result = verify_chain(session)
    print(result.model_dump_json())
    return 0 if result.valid else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="tlsoverride")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API server (production)")
    serve.add_argument("--host", default=os.environ.get("TLSO_HOST", "0.0.0.0"))  # noqa: S104 (a server's job)
    serve.add_argument("--port", type=int, default=int(os.environ.get("TLSO_PORT", "8000")))
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run the worker")
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=cmd_migrate)

    openapi = commands.add_parser("openapi", help="write openapi/openapi.json (or --check it)")
    openapi.add_argument("--check", action="store_true")
    openapi.set_defaults(func=cmd_openapi)

    dev = commands.add_parser("dev", help="everything on SQLite with a dev identity provider (loopback only)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)

    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="verify the hash chain (database, or an export file)")
    verify.add_argument("--file", help="a JSON Lines or CSV export to verify offline")
    verify.add_argument("--format", choices=["jsonl", "csv"])
    verify.set_defaults(func=cmd_audit_verify)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
