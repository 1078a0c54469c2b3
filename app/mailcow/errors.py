"""How a mailcow call fails: one exception class per kind of answer (`kind` is the metrics label).

What the worker does about each is decided in one place, `app.worker.failures`.
"""

from __future__ import annotations


class MailcowError(Exception):
    """Base of every mailcow failure; `kind` is the metrics label, `msg_key` mailcow's message key."""

    kind: str = "error"

    def __init__(
        self,
        message: str,
        *,
        msg_key: str | None = None,
        target: str = "default",
        op: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.msg_key = msg_key
        self.target = target
        self.op = op
        self.status = status
        # HTTP attempts the call made: an answer to the last one says nothing of what an earlier one,
        # whose answer was lost, may still do (a timed-out add can commit later).
        self.attempts = 1

    @property
    def retried(self) -> bool:
        """An earlier attempt of this call may have reached mailcow ("entry exists" after a retried add
        is most likely our own row)."""
        return self.attempts > 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, msg_key={self.msg_key!r}, target={self.target!r})"


class MailcowAuthError(MailcowError):
    """401 (unknown/inactive key, IP not allowed) or 403 (read-only key); never retried."""

    kind = "auth"


class MailcowRejected(MailcowError):
    """mailcow refused the request with a `danger`/`error` entry; nothing was changed by it."""

    kind = "rejected"

    def __init__(
        self,
        message: str,
        *,
        msg_key: str | None = None,
        args: tuple[str, ...] = (),
        raw_msg_key: str | None = None,
        target: str = "default",
        op: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message, msg_key=msg_key, target=target, op=op, status=status)
        self.msg_args = args
        self.raw_msg_key = raw_msg_key if raw_msg_key is not None else msg_key


class MailcowEmptyResponse(MailcowError):
    """HTTP 200 with an empty body: a server-side DB error; the statement was not applied."""

    kind = "empty_response"


class MailcowProtocolError(MailcowError):
    """An answer this client does not understand (404/405/400, redirects, unexpected shapes)."""

    kind = "protocol"


class MailcowUnavailable(MailcowError):
    """Connection failures, timeouts and 5xx, after the retries were used up."""

    kind = "unavailable"
