"""An ASGI app under a real uvicorn in a thread of this process: dev mode serves the mailcow stand-in
so, and the tests serve the API, the stand-in and webhook receivers so."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Literal

import uvicorn


class ThreadedServer:
    """`start()` binds (port 0: a free one, kept for later starts), `stop()` shuts down; starting
    again reuses the port and the app keeps its state, so a test can take a server away for a while."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, *, lifespan: Literal["auto", "off"] = "auto"
    ) -> None:
        self.app, self.host, self.port, self.lifespan = app, host, port, lifespan
        self._running: tuple[uvicorn.Server, threading.Thread, socket.socket] | None = None

    @property
    def url(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{netloc}:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            log_config=None,
            lifespan=self.lifespan,
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                server.should_exit = True
                sock.close()
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        self._running = (server, thread, sock)

    def stop(self) -> None:
        if self._running is None:
            return
        server, thread, sock = self._running
        server.should_exit = True
        thread.join(10)
        sock.close()
        self._running = None

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
