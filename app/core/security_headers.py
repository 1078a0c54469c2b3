"""Security headers on every answer, errors and 404s included, as a pure ASGI middleware.

Every answer gets `X-Content-Type-Options: nosniff`. API answers get `Cache-Control: no-store` (they carry
who may do what to which mail route; no proxy or browser cache should keep them) and a Content-Security-Policy
that allows nothing, since none of them is a page. The Swagger UI assets under `/static/` may be cached.
Pages (`/docs`) get their own policy: see `page_policy`.

The headers are built once; per answer the middleware only picks a list by path and appends it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Headers = list[tuple[bytes, bytes]]

# A JSON answer opened in a browser tab runs nothing and cannot be framed.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
STATIC_PREFIX = "/static/"

_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def page_policy(html: bytes, *, connect_to: Iterable[str] = ()) -> str:
    """A Content-Security-Policy for one page rendered once: its own inline scripts by hash (no
    'unsafe-inline'), scripts, styles and images from this origin only (images also as `data:` URIs, which
    Swagger UI's stylesheet uses), fetches to this origin and `connect_to` (the identity provider's token
    endpoint, for the Swagger UI login), and never inside a frame."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    connect = " ".join(["'self'", *sorted(set(connect_to))])
    return (
        "default-src 'none'; "
        f"script-src 'self' {hashes}; "
        "style-src 'self'; "
        "img-src 'self' data:; "
        f"connect-src {connect}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _encode(headers: Mapping[str, str]) -> Headers:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class SecurityHeaders:
    """Adds the headers of the answer's kind (page, static asset, API) unless the answer set them itself."""

    def __init__(self, app: ASGIApp, *, pages: Mapping[str, str] | None = None) -> None:
        self.app = app
        common = {"X-Content-Type-Options": "nosniff"}
        self.static = _encode(common)
        self.api = _encode({**common, "Cache-Control": "no-store", "Content-Security-Policy": API_POLICY})
        # X-Frame-Options for browsers that predate CSP's frame-ancestors.
        self.pages = {
            path: _encode(
                {**common, "Cache-Control": "no-store", "Content-Security-Policy": policy, "X-Frame-Options": "DENY"}
            )
            for path, policy in (pages or {}).items()
        }

    def _headers_for(self, path: str) -> Headers:
        page = self.pages.get(path)
        if page is not None:
            return page
        return self.static if path.startswith(STATIC_PREFIX) else self.api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self._headers_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [header for header in extra if header[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
