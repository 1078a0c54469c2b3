"""What a request must be to be taken: a known target, a destination Postfix looks up, parameters it
accepts at the chosen level (`postfix.py`), a justification that says something, a duration within
bounds. Each refusal names its field."""

from __future__ import annotations

from datetime import timedelta

from app.core.config import Settings
from app.core.errors import InvalidInput
from app.core.text import visible_length
from app.overrides.postfix import PolicyInputError, normalise_destination, normalise_parameters
from app.overrides.schemas import OverrideCreate


def validate_request(body: OverrideCreate, settings: Settings) -> tuple[str, str, str, timedelta]:
    """Target, destination, parameters and duration as they will be stored; or a field-level error."""
    target = body.target or settings.default_target
    if target not in settings.target_names():
        raise InvalidInput.on("body.target", f"unknown target {target!r}; known: {', '.join(settings.target_names())}")
    try:
        destination = normalise_destination(
            body.destination,
            allow_subdomains=settings.mailcow_supports_subdomain_dest,
            field="body.destination",
        )
        parameters = normalise_parameters(body.parameters, body.policy, field="body.parameters")
    except PolicyInputError as exc:
        raise InvalidInput.on(exc.field, f"{exc.field.removeprefix('body.')} {exc.message}") from exc
    _require_comment_length(body.justification, "body.justification", settings.justification_min_length)
    return target, destination, parameters, _bounded_duration(body.duration, settings)


def _bounded_duration(requested: timedelta | None, settings: Settings) -> timedelta:
    # `is None`, not `or`: a zero duration is an error, not a request for the default.
    duration = settings.default_duration if requested is None else requested
    require_whole_seconds(duration)
    if duration > settings.max_duration:
        raise InvalidInput.on("body.duration", f"must not exceed the maximum of {settings.max_duration}")
    return duration


def require_whole_seconds(duration: timedelta) -> None:
    # Stored in seconds: `PT0.5S` would become 0 (no override, or a phantom extension).
    if duration < timedelta(seconds=1) or duration.microseconds:
        raise InvalidInput.on("body.duration", "must be a positive whole number of seconds (e.g. PT12H, P3D)")


def _require_comment_length(value: str, field: str, minimum: int) -> str:
    text = value.strip()
    if visible_length(text) < minimum:
        raise InvalidInput.on(field, f"must be at least {minimum} visible characters: say why mail needs this")
    return text
