"""mailcow's tls-policy-map API: the client (every quirk handled there) and a test double (`standin`)."""

from app.mailcow.client import (
    MailcowAuthError,
    MailcowClient,
    MailcowEmptyResponse,
    MailcowError,
    MailcowProtocolError,
    MailcowRejected,
    MailcowUnavailable,
    PolicyRow,
)

__all__ = [
    "MailcowAuthError",
    "MailcowClient",
    "MailcowEmptyResponse",
    "MailcowError",
    "MailcowProtocolError",
    "MailcowRejected",
    "MailcowUnavailable",
    "PolicyRow",
]
