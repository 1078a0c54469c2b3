"""`python -m app serve | worker | migrate | openapi | dev | audit verify | audit checkpoint | audit public-key`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from app.core.config import CoreSettings, Settings
from app.core.logs import configure_logging

AnySettings = TypeVar("AnySettings", bound=CoreSettings)

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


def load_settings(command: str, factory: Callable[[], AnySettings]) -> AnySettings | None:
    """Settings from the environment, or None after saying on stderr what is wrong (never a traceback).

    `serve` and `worker` read them all (production refuses to start without OIDC); the database tools
    read only `CoreSettings`, so they run with nothing but TLSO_DATABASE_URL."""
    from app.audit.signing import trusted_keys

    try:
        settings = factory()
        trusted_keys(settings)  # the audit keys parse (read from their files, if given)
    except ValidationError as exc:
        reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        print(f"{command}: invalid settings: {reasons}", file=sys.stderr)
        return None
    except (ValueError, OSError) as exc:
        print(f"{command}: invalid settings: {exc}", file=sys.stderr)
        return None
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.core.db import make_engine
    from app.core.migrations import current_and_head, upgrade

    settings = load_settings("migrate", CoreSettings)
    if settings is None:
        return 2
    engine = make_engine(settings.database_url)
    upgrade(engine, args.revision)
    current, head = current_and_head(engine)
    print(f"database at revision {current} (head {head})")
    engine.dispose()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = load_settings("serve", Settings)
    if settings is None:
        return 2
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
    from app.core.db import make_engine
    from app.core.metrics import serve_worker_metrics
    from app.core.migrations import current_and_head
    from app.worker.loop import run_worker

    settings = load_settings("worker", Settings)
    if settings is None:
        return 2
    from app.notify.sinks import SinkConfigError, sinks_from

    try:
        sinks_from(settings)  # a sink that cannot work stops the start, not every later pass
    except SinkConfigError as exc:
        print(f"worker: invalid settings: {exc}", file=sys.stderr)
        return 2
    if settings.env == "production" and not settings.audit_signing_key_text:
        print(
            "worker: TLSO_AUDIT_SIGNING_KEY_FILE (or TLSO_AUDIT_SIGNING_KEY) must be set outside dev mode: "
            "the worker signs the audit trail's checkpoints (create one: openssl genpkey -algorithm ed25519)",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level, settings.log_json)
    engine = make_engine(settings.database_url)
    try:
        current, head = current_and_head(engine)
    except Exception as exc:  # the supervisor restarts us; say why in one line
        print(f"worker: database unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if current != head:
        print(f"worker: database is at {current}, this code needs {head}: run `python -m app migrate`", file=sys.stderr)
        return 2
    if not _hold_sqlite_worker_lock(settings.database_url):
        return 2
    if settings.worker_metrics_port:
        from app.gauges import database_gauges

        serve_worker_metrics(engine, database_gauges, settings.worker_metrics_port, settings.worker_metrics_host)
    run_worker(engine, settings)
    engine.dispose()
    return 0


_WORKER_LOCKS: list[Any] = []  # open lock files, held for the life of the process


def _hold_sqlite_worker_lock(database_url: str) -> bool:
    """SQLite runs exactly one worker (no SKIP LOCKED): a second one against the same file refuses to start."""
    import fcntl

    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return True
    path = Path(url.database).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(f"{path}.worker-lock", "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        print(f"worker: another worker already runs against {path}; SQLite supports exactly one", file=sys.stderr)
        return False
    _WORKER_LOCKS.append(handle)
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dev_settings(host: str, port: int) -> Settings:
    from app.core.devidp import DEV_AUDIENCE, DEV_ROLE_MAP

    database_url = os.environ.get("TLSO_DATABASE_URL", f"sqlite:///{ROOT / 'var' / 'dev.db'}")
    signing: dict[str, Any] = {}  # a key given in the environment wins
    if not {"TLSO_AUDIT_SIGNING_KEY", "TLSO_AUDIT_SIGNING_KEY_FILE"} & set(os.environ):
        signing["audit_signing_key_file"] = _dev_signing_key(database_url)
    return Settings(
        env="dev",
        database_url=database_url,
        **signing,
        oidc_issuer=f"http://{host}:{port}/dev",
        public_base_url=os.environ.get("TLSO_PUBLIC_BASE_URL", f"http://{host}:{port}"),
        oidc_audience=DEV_AUDIENCE,
        oidc_roles_claim="roles",
        oidc_role_map=DEV_ROLE_MAP,
        oidc_algorithms=["ES256"],
        log_json=False,
        justification_min_length=int(os.environ.get("TLSO_JUSTIFICATION_MIN_LENGTH", "10")),
    )


def _dev_signing_key(database_url: str) -> Path:
    """Dev mode signs audit checkpoints with a key kept beside its database, made on the first start."""
    from sqlalchemy.engine import make_url

    from app.audit.signing import generate_private_pem

    path = Path(f"{make_url(database_url).database or ROOT / 'var' / 'dev.db'}.audit-key.pem")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(generate_private_pem())
    return path


def _dev_refusal(environ: Mapping[str, str]) -> str | None:
    """Dev mode mints tokens for anyone on this host: it must never run against production data.
    Only its own SQLite file is allowed; a real mailcow (TLSO_MAILCOW_URL) may be tried, with a warning."""
    env = environ.get("TLSO_ENV", "dev")
    if env != "dev":
        return f"TLSO_ENV={env} (dev mode needs TLSO_ENV unset or dev)"
    url = environ.get("TLSO_DATABASE_URL")
    if url and not url.startswith("sqlite:"):
        return "TLSO_DATABASE_URL is not a SQLite file (dev mode never touches a shared database)"
    return None


def cmd_dev(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host):
        print(
            f"refusing to start dev mode on {args.host}: dev tokens are unauthenticated; bind to loopback",
            file=sys.stderr,
        )
        return 2
    refusal = _dev_refusal(os.environ)
    if refusal:
        print(f"refusing to start dev mode: {refusal}", file=sys.stderr)
        return 2
    import uvicorn

    from app.core.db import make_engine
    from app.core.devidp import DevIdentityProvider
    from app.core.migrations import upgrade
    from app.main import create_app

    settings = dev_settings(args.host, args.port)
    standin = None if settings.mailcow_url else _standin_module()
    if not settings.mailcow_url and standin is None:
        print(
            "dev mode needs a mailcow: the stand-in (devtools/mailcow_standin.py, a test double) ships only with "
            "the source checkout and is not importable here. Run `make dev` (or `python -m app dev`) in the "
            "checkout's root, or set TLSO_MAILCOW_URL and TLSO_MAILCOW_API_KEY to use a real mailcow.",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level, as_json=False)
    if not _hold_sqlite_worker_lock(settings.database_url):
        return 2
    stop_standin = None
    if standin is not None:
        settings, stop_standin = _start_dev_standin(standin, settings, args.host)
    else:
        print(
            f"WARNING: dev mode will change the TLS policy map of the real mailcow at {settings.mailcow_url}; "
            "anyone on this host can get an admin token from /dev/token",
            file=sys.stderr,
        )
    settings = _dev_worker_timing(settings, standin=stop_standin is not None)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    app = create_app(settings, engine=engine, dev_idp=DevIdentityProvider(settings.oidc_issuer))
    stop_worker = _start_dev_worker(engine, settings)
    base = f"http://{args.host}:{args.port}"
    mailcow = (
        f"mailcow stand-in (a test double) at {settings.mailcow_url}, rows: {settings.mailcow_url}/__standin__/rows"
        if stop_standin
        else f"mailcow at {settings.mailcow_url}"
    )
    print(
        f"tlsoverride dev mode: {base}/docs  (database {settings.database_url})\n"
        f"  worker: in this process, polling every {settings.worker_poll_seconds}s; {mailcow}\n"
        f"  log in from {base}/docs: Authorize → oidc opens the dev login page (any user, any roles)\n"
        f"  get a token:  curl -s -X POST {base}/dev/token -H 'content-type: application/json' "
        f'-d \'{{"sub":"alice","roles":["requester"]}}\'',
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    finally:
        stop_worker()
        if stop_standin is not None:
            stop_standin()
    return 0


def _standin_module() -> ModuleType | None:
    """The mailcow stand-in, imported from the source checkout (it never ships in the package); None
    where it is not importable (an installed wheel, or a directory other than the checkout's root)."""
    import importlib

    try:
        return importlib.import_module("devtools.mailcow_standin")
    except ModuleNotFoundError as exc:
        if exc.name not in ("devtools", "devtools.mailcow_standin"):
            raise  # the stand-in is there, but something it needs is not: say so as it is
        return None


def _start_dev_standin(standin: ModuleType, settings: Settings, host: str) -> tuple[Settings, Callable[[], None]]:
    """Serve the mailcow stand-in on a free loopback port (a thread of this process), with a fresh key."""
    import secrets

    from app.core.threaded_server import ThreadedServer

    key = "-".join(secrets.token_hex(3).upper() for _ in range(5))
    server = ThreadedServer(standin.create_standin_app([standin.StandinKey(key)]), host, lifespan="off")
    server.start()
    return settings.model_copy(update={"mailcow_url": server.url, "mailcow_api_key": SecretStr(key)}), server.stop


def _dev_worker_timing(settings: Settings, *, standin: bool) -> Settings:
    """Dev mode reacts within a second; values given in the environment win."""
    wanted: dict[str, Any] = {
        "worker_poll_seconds": 0.5,
        "reconcile_interval_seconds": 30.0,
        "removal_grace_seconds": 60.0,
        "retry_initial_seconds": 1.0,
        "retry_max_seconds": 30.0,
        "worker_lease_seconds": 30.0,
    }
    if standin:
        # The stand-in forgets its rows when dev mode restarts; re-apply them instead of only alerting.
        wanted["drift_action"] = "reapply"
    return settings.model_copy(update={k: v for k, v in wanted.items() if f"TLSO_{k.upper()}" not in os.environ})


def _start_dev_worker(engine: Any, settings: Settings) -> Callable[[], None]:
    """The worker as a thread with its own event loop; the returned function stops it."""
    import asyncio
    import threading

    from app.worker.loop import serve

    started = threading.Event()
    control: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        control["stop"] = lambda: loop.call_soon_threadsafe(stop.set)
        started.set()
        await serve(engine, settings, stop)

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="worker", daemon=True)
    thread.start()
    started.wait(10)

    def stop_worker() -> None:
        if "stop" in control:
            control["stop"]()
        thread.join(10)

    return stop_worker


def _database(command: str, settings: CoreSettings) -> Any:
    """An engine on a reachable database at the migration head, or None (said on stderr)."""
    from app.core.db import make_engine
    from app.core.migrations import current_and_head

    engine = make_engine(settings.database_url)
    try:
        current, head = current_and_head(engine)
    except Exception as exc:  # say why in one line, whatever the driver raised
        print(f"{command}: database unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if current != head:
        print(
            f"{command}: database is at {current}, this code needs {head}: run `python -m app migrate`", file=sys.stderr
        )
        return None
    return engine


def _text_or_file(value: str) -> str:
    """A command-line value given inline, or the name of a file that holds it."""
    try:
        is_file = "\n" not in value and Path(value).is_file()
    except OSError:  # e.g. a JSON document longer than a file name may be
        is_file = False
    return Path(value).read_text(encoding="utf-8") if is_file else value


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from app.audit.export import decoded_lines, parse_export
    from app.audit.service import verify_chain, verify_events
    from app.audit.signing import load_public_keys, parse_checkpoints, trusted_keys

    settings = load_settings("audit verify", CoreSettings)
    if settings is None:
        return 2
    try:
        given = [key for value in args.public_key for key in load_public_keys(_text_or_file(value))]
        keys = {key.key_id: key for key in given} if given else trusted_keys(settings)
    except (OSError, ValueError) as exc:
        print(f"audit verify: --public-key: {exc}", file=sys.stderr)
        return 2
    try:
        published = [cp for value in args.checkpoint for cp in parse_checkpoints(_text_or_file(value))]
    except (OSError, ValueError) as exc:
        print(f"audit verify: --checkpoint: {exc}", file=sys.stderr)
        return 2
    if args.file:
        fmt = args.format or ("csv" if args.file.endswith(".csv") else "jsonl")
        try:
            with open(args.file, "rb") as handle:
                result = verify_events(parse_export(decoded_lines(handle), fmt), keys, published)
        except OSError as exc:
            print(f"audit verify: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        from app.core.db import reading

        engine = _database("audit verify", settings)
        if engine is None:
            return 2
        with reading(engine) as session:
            result = verify_chain(session, keys, published)
        engine.dispose()
    print(result.model_dump_json())
    return 0 if result.valid else 1


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from app.audit.checkpoints import latest_checkpoint, publish, write_checkpoint
    from app.audit.signing import signer_from

    settings = load_settings("audit checkpoint", CoreSettings)
    if settings is None:
        return 2
    signer = signer_from(settings)
    if signer is None:
        print("audit checkpoint: no signing key: set TLSO_AUDIT_SIGNING_KEY_FILE", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    engine = _database("audit checkpoint", settings)
    if engine is None:
        return 2
    checkpoint = write_checkpoint(engine, signer)
    if checkpoint is None:  # nothing new since the last one: publish that one again
        checkpoint = latest_checkpoint(engine)
        if checkpoint is None:
            print("audit checkpoint: the trail is empty; there is nothing to sign", file=sys.stderr)
            return 0
        publish(checkpoint)
    engine.dispose()
    print(checkpoint.model_dump_json())
    return 0


def cmd_audit_public_key(args: argparse.Namespace) -> int:
    from app.audit.signing import trusted_keys

    settings = load_settings("audit public-key", CoreSettings)
    if settings is None:
        return 2
    keys = trusted_keys(settings)
    if not keys:
        print(
            "audit public-key: no key configured (TLSO_AUDIT_SIGNING_KEY_FILE, TLSO_AUDIT_PUBLIC_KEYS)", file=sys.stderr
        )
        return 2
    print(json.dumps({"keys": [key.describe() for key in keys.values()]}))
    return 0


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
    verify.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a trusted public key (base64, PEM or the JSON of `audit public-key`) or a file holding it; "
        "repeatable; default: the configured keys",
    )
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="a checkpoint published in the log or to a webhook (JSON, or a file of JSON lines); repeatable: "
        "the trail must reach it with the hash it signed",
    )
    verify.set_defaults(func=cmd_audit_verify)
    checkpoint = audit_commands.add_parser("checkpoint", help="sign the chain head now and publish it")
    checkpoint.set_defaults(func=cmd_audit_checkpoint)
    public_key = audit_commands.add_parser("public-key", help="print the public keys that verify checkpoints")
    public_key.set_defaults(func=cmd_audit_public_key)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
