"""A1111's error shapes: `{error, detail, body, errors}` for its own errors, FastAPI's for validation."""
from __future__ import annotations

from flask import Response, json


class ApiError(Exception):
    """An error answered in A1111's shape; `error` is the class name A1111 would report."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException", errors: str = "",
                 headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.error, self.errors = status, detail, error, errors
        self.headers = headers  # e.g. Retry-After on a 503


class ValidationFailed(Exception):
    """Request validation errors, answered as FastAPI's 422 `{"detail": [...]}`."""

    def __init__(self, details: list[dict]):
        super().__init__(details)
        self.details = details


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    try:  # strict JSON: never NaN/Infinity, never a lone surrogate (inputs are validated; this is the net)
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        body = json.dumps(json_safe(payload), ensure_ascii=True, allow_nan=False)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def json_safe(value):
    """`value` with non-finite floats as null (what JavaScript's JSON.stringify writes)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def error_body(error: str, detail: str = "", errors: str = "") -> dict:
    """A1111's error body, for answers stored before they are sent (a task's result)."""
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def a1111_error(status: int, error: str, detail: str = "", errors: str = "",
                headers: dict | None = None) -> Response:
    return json_response(error_body(error, detail, errors), status, headers)
