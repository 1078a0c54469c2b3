"""The OpenAPI document's `webhooks` section: what a JSON sink receives and how to verify it."""

from __future__ import annotations

from fastapi import FastAPI

from app.notify.events import WebhookEvent

HEADERS = [
    {
        "name": "webhook-id",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "msg_17_3f9a0c2e41b7d6e58a90"},
        "description": "The same for every attempt of one event to one sink: deduplicate on it.",
    },
    {
        "name": "webhook-timestamp",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "1765000000"},
        "description": "Unix time of this attempt (refuse ones more than 5 minutes away).",
    },
    {
        "name": "webhook-signature",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="},
        "description": "`v1,<base64 HMAC-SHA256 of id.timestamp.body>` per configured secret, space-separated.",
    },
]


def document_webhooks(app: FastAPI) -> None:
    @app.webhooks.post(
        "tlsoverride-event",
        summary="An audit event, with the override as it was at that event",
        openapi_extra={"parameters": HEADERS},
        responses={
            "2XX": {"description": "Taken."},
            "4XX": {"description": "Refused: retried with backoff (no pause), then a dead letter."},
            "5XX": {"description": "Unavailable: retried, and the sink pauses for one backoff step."},
        },
    )
    def tlsoverride_event(body: WebhookEvent) -> None:
        """Sent to every `json` sink of `TLSO_NOTIFY_WEBHOOKS` for each event its `events` patterns match
        (default `override.*`, `recipient.*`, `audit.checkpoint`), signed as Standard Webhooks specify.
        Answer 2xx to take it. Any other answer is retried with backoff (the same `webhook-id` and body);
        5xx, 408, 429 and network errors also pause the sink for one backoff step. After
        `TLSO_NOTIFY_MAX_ATTEMPTS` the event is a dead letter (`GET /v1/notifications?state=failed`)."""
