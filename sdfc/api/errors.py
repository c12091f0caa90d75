"""A1111's error shapes: `{error, detail, body, errors}` for its own errors, FastAPI's for validation."""
from __future__ import annotations

from flask import Response, json


class ApiError(Exception):
    """An error answered in A1111's shape; `error` is the class name A1111 would report."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException", errors: str = ""):
        super().__init__(detail)
        self.status, self.detail, self.error, self.errors = status, detail, error, errors


class ValidationFailed(Exception):
    """Request validation errors, answered as FastAPI's 422 `{"detail": [...]}`."""

    def __init__(self, details: list[dict]):
        super().__init__(details)
        self.details = details


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def a1111_error(status: int, error: str, detail: str = "", errors: str = "",
                headers: dict | None = None) -> Response:
    return json_response({"error": error, "detail": detail, "body": "", "errors": errors}, status, headers)
