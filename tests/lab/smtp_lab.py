"""The lab's SMTP listeners (aiosmtpd), one process, one event loop.

Run as a script by tests/lab/lab.py: `python smtp_lab.py CONFIG.json`. Each listener serves its own
certificate chain over STARTTLS (or offers no STARTTLS), may greet late, may drip its greeting line by
line, may pick its certificate by SNI, may speak only TLS 1.0/1.1, and discards all mail.
Writes `ready` next to the config once every listener is bound; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys
import warnings
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: discarded by the tlsoverride lab"


DRIP_LINES = 600


class LabSMTP(SMTP):
    """aiosmtpd with an optional delay before the 220 greeting (the slow bench hosts), or a greeting
    dripped as continuation lines (a server that holds a client without ever timing out a read)."""

    def __init__(self, *args: Any, banner_delay: float = 0.0, drip_interval: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._banner_delay = banner_delay
        self._drip_interval = drip_interval
        self._greeted = False

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            if self._banner_delay:
                await asyncio.sleep(self._banner_delay)
            for _ in range(DRIP_LINES if self._drip_interval else 0):
                if self.transport is None or self.transport.is_closing():
                    return
                await super().push("220-tlsoverride lab: still greeting")
                await asyncio.sleep(self._drip_interval)
        await super().push(status)


def _tls_context(listener: dict[str, Any]) -> ssl.SSLContext | None:
    if not listener["starttls"]:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(listener["cert"], listener["key"])
    if listener.get("legacy"):
        # An old MTA: TLS 1.0 and 1.1 only. OpenSSL 3 needs security level 0 for their SHA-1 signatures.
        context.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    if "default_cert" not in listener:
        return context
    # Like a multi-domain server: its own certificate only for SNI = its name, a default one otherwise.
    default = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    default.load_cert_chain(listener["default_cert"], listener["default_key"])
    host = listener["host"].lower()

    def pick(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        sock.context = context if name and name.lower().rstrip(".") == host else default

    default.sni_callback = pick
    return default


async def serve(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    loop = asyncio.get_running_loop()
    handler = DiscardHandler()
    servers = []
    for listener in config["listeners"]:
        context = _tls_context(listener)

        def factory(listener: dict[str, Any] = listener, context: ssl.SSLContext | None = context) -> SMTP:
            return LabSMTP(
                handler,
                hostname=listener["host"],
                ident="tlsoverride-lab",
                tls_context=context,
                require_starttls=False,
                banner_delay=float(listener.get("banner_delay", 0.0)),
                drip_interval=float(listener.get("drip_interval", 0.0)),
            )

        servers.append(await loop.create_server(factory, host=listener["address"], port=config["port"]))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    config_path.with_name("ready").write_text(str(len(servers)))
    await stop.wait()
    for server in servers:
        server.close()
    await asyncio.gather(*(server.wait_closed() for server in servers), return_exceptions=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
