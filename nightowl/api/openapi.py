"""The OpenAPI schema says what this server enforces: the limits and the label set its settings
configure (the request models in nightowl.schemas document the fixed rules). Only the schema
changes: the server's own checks and messages stay where they are (nightowl.day.logger)."""

from typing import Any

from fastapi import FastAPI

from nightowl.schemas import NO_NUL, NOT_BLANK_NO_NUL
from nightowl.settings import Settings

# What an idempotency key may not hold (the server wants str.isprintable(); a regex can name the controls).
_KEY_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"


def enforced_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """app.openapi for create_app: FastAPI's schema, with the configured limits and labels filled in."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    limits = settings.limits
    key = {"minLength": 1, "maxLength": limits.max_idempotency_key_chars, "pattern": _KEY_PATTERN}
    post_fields = {
        "text": {"minLength": 1, "maxLength": limits.max_text_chars, "pattern": NOT_BLANK_NO_NUL},
        "aspect": {"maxLength": limits.max_aspect_chars, "pattern": NO_NUL},
        "context": {"maxLength": limits.max_text_chars, "pattern": NO_NUL},
        "idempotency_key": key,
    }
    post_bodies = schema["paths"]["/v1/users/{user_id}/posts"]["post"]["requestBody"]["content"].values()
    for body in post_bodies:
        _constrain(body["schema"], post_fields)
    _constrain(
        schema["components"]["schemas"]["FeedbackIn"],
        {
            "label": {"enum": list(settings.labels)},
            "reason": {"maxLength": limits.max_reason_chars, "pattern": NO_NUL},
            "idempotency_key": key,
        },
    )
    app.openapi_schema = schema
    return schema


def _constrain(model: dict[str, Any], fields: dict[str, dict[str, Any]]) -> None:
    for name, rules in fields.items():
        prop = model["properties"][name]
        # an optional field is anyOf [string, null]: the rules belong to the string
        target = next((s for s in prop.get("anyOf", []) if s.get("type") == "string"), prop)
        target.update(rules)
