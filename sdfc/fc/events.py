"""FC 3.0's HTTP event ⇄ one WSGI call of a Flask app.

A built-in runtime's HTTP trigger hands the handler a JSON event (docs/fc-deploy.md §3.2) instead of a
socket, and expects `{statusCode, headers, isBase64Encoded, body}` back. sd-api's `POST /invoke` takes the
same event shape, so that an InvokeFunction caller (an async job, an event source) reaches the same routes,
auth and validation as an HTTP client.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlencode

from werkzeug.test import EnvironBuilder, run_wsgi_app

# Response bodies of these types travel as text; everything else (PNG, fonts) as base64.
TEXT_TYPES = ("text/", "application/json", "application/javascript", "application/xml", "image/svg+xml")


class EventError(ValueError):
    """The event is not an HTTP event we can replay; the message says which field is wrong."""


@dataclass
class HttpCall:
    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    source_ip: str = ""


def _body(data: Mapping[str, Any], headers: dict[str, str]) -> bytes:
    body = data.get("body")
    if body is None:
        return b""
    if isinstance(body, (dict, list)):  # a convenience for hand-written events: JSON inline
        headers.setdefault("content-type", "application/json")
        return json.dumps(body).encode()
    if not isinstance(body, str):
        raise EventError("body must be a string, or a JSON object or array")
    if data.get("isBase64Encoded"):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("isBase64Encoded is true but body is not base64") from None
    return body.encode()


def _query(params: Any) -> str:
    if not params:
        return ""
    if not isinstance(params, Mapping):
        raise EventError("queryParameters must be an object")
    pairs = [(k, item) for k, v in params.items() for item in (v if isinstance(v, list) else [v])]
    return urlencode(pairs)


def call_from_event(event: bytes | str | Mapping) -> HttpCall:
    """Parse FC 3.0's HTTP event (`rawPath`, `headers`, `queryParameters`, `body`, `isBase64Encoded`,
    `requestContext.http.method`); `path` and `method` at the top level are accepted too."""
    if isinstance(event, (bytes, bytearray, str)):
        try:
            event = json.loads(event or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventError(f"the event is not JSON: {exc}") from None
    if not isinstance(event, Mapping):
        raise EventError("the event must be a JSON object with at least rawPath")
    context = event.get("requestContext") or {}
    http = context.get("http") or {}
    path = event.get("rawPath") or event.get("path") or http.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise EventError("rawPath must be an absolute path such as /sdapi/v1/txt2img")
    headers = event.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise EventError("headers must be an object")
    # x-fc-* come from FC itself, never from an event's author: drop them (the caller sets the trusted ones).
    headers = {str(k).lower(): str(v) for k, v in headers.items() if not str(k).lower().startswith("x-fc-")}
    if "host" not in headers and context.get("domainName"):
        headers["host"] = str(context["domainName"])  # so that URLs the app builds name the public host
    body = _body(event, headers)
    method = (http.get("method") or event.get("method") or ("POST" if body else "GET")).upper()
    return HttpCall(method=method, path=path, query=_query(event.get("queryParameters")), headers=headers,
                    body=body, source_ip=str(http.get("sourceIp") or ""))


def _is_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return any(content_type.startswith(t) for t in TEXT_TYPES) or "+json" in content_type


def run(app, call: HttpCall, fc_headers: Mapping[str, str] | None = None) -> dict:
    """Run `call` through the WSGI app; FC's response shape back. `fc_headers` are the trusted `x-fc-*`
    headers of the real invocation (request id, role credentials): the app sees them as an HTTP request would,
    so its log line carries FC's request id."""
    headers = dict(call.headers)
    headers.update({k.lower(): v for k, v in (fc_headers or {}).items() if v})
    builder = EnvironBuilder(path=call.path, method=call.method, query_string=call.query, headers=headers,
                             data=call.body, base_url=f"https://{headers.get('host', 'localhost')}",
                             environ_base={"REMOTE_ADDR": call.source_ip or "127.0.0.1"})
    try:
        app_iter, status, response_headers = run_wsgi_app(app, builder.get_environ(), buffered=True)
        body = b"".join(app_iter)
        if hasattr(app_iter, "close"):
            app_iter.close()
    finally:
        builder.close()
    flat: dict[str, str] = {}
    for key, value in response_headers.items():
        # FC's event response holds one value per header: repeated headers are joined, as HTTP allows.
        flat[key] = f"{flat[key]}, {value}" if key in flat else value
    text = _is_text(response_headers.get("Content-Type", ""))
    return {
        "statusCode": int(status.split(" ", 1)[0]),
        "headers": flat,
        "isBase64Encoded": not text,
        "body": body.decode("utf-8", "replace") if text else base64.b64encode(body).decode("ascii"),
    }
