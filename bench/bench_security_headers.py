"""Benchmark: what the security-headers middleware adds to one answer.

An ASGI app that answers at once, called directly, with and without `SecurityHeaders` around it; the
difference per answer is the middleware's whole cost (choosing the header list by path, appending it).

    .venv/bin/python bench/bench_security_headers.py [--answers 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from app.core.security_headers import SecurityHeaders


async def answer(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


async def discard(message: Any) -> None:
    return None


async def nothing() -> dict[str, Any]:
    return {"type": "http.request"}


async def per_answer(app: Any, answers: int, path: str) -> float:
    scope = {"type": "http", "path": path, "method": "GET"}
    started = time.perf_counter()
    for _ in range(answers):
        await app(scope, nothing, discard)
    return (time.perf_counter() - started) / answers * 1e6


async def main(answers: int) -> None:
    wrapped = SecurityHeaders(answer, pages={"/docs": "default-src 'none'"})
    for path in ("/v1/overrides", "/docs", "/static/swagger-ui/swagger-ui.css"):
        bare = min([await per_answer(answer, answers, path) for _ in range(3)])
        with_headers = min([await per_answer(wrapped, answers, path) for _ in range(3)])
        cost = with_headers - bare
        print(f"{path:36} bare {bare:6.2f} µs   with headers {with_headers:6.2f} µs   cost {cost:5.2f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=200_000)
    asyncio.run(main(parser.parse_args().answers))
