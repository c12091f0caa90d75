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
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlencode

from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException
from werkzeug.test import EnvironBuilder, run_wsgi_app

from . import gateway

# Response bodies of these types travel as text; everything else (PNG, fonts) as base64.
METHOD_PATTERN = re.compile(r"[A-Za-z]{1,16}")
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
    if path.startswith("//"):
        raise EventError("rawPath must be a path, not //host/...")  # a URL parser would read a host there
    path, _, raw_query = path.partition("?")  # a query in rawPath is a query, beside queryParameters
    headers = event.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise EventError("headers must be an object")
    # x-fc-* come from FC itself, never from an event's author: drop them (the caller sets the trusted ones).
    headers = {str(k).lower(): str(v) for k, v in headers.items() if not str(k).lower().startswith("x-fc-")}
    if "host" not in headers and context.get("domainName"):
        headers["host"] = str(context["domainName"])  # so that URLs the app builds name the public host
    body = _body(event, headers)
    method = http.get("method") or event.get("method") or ("POST" if body else "GET")
    if not isinstance(method, str) or not METHOD_PATTERN.fullmatch(method):
        raise EventError("requestContext.http.method must be an HTTP method such as POST")
    query = "&".join(q for q in (raw_query, _query(event.get("queryParameters"))) if q)
    return HttpCall(method=method.upper(), path=path, query=query, headers=headers, body=body,
                    source_ip=str(http.get("sourceIp") or ""))


def _is_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return any(content_type.startswith(t) for t in TEXT_TYPES) or "+json" in content_type


def environ_for(call: HttpCall, fc_headers: Mapping[str, str] | None = None,
                request_id: str | None = None) -> dict:
    """The WSGI environ of `call`, built once: routing checks and the run see the very same one.

    `fc_headers` are the trusted `x-fc-*` headers of the real invocation (role credentials): the app sees them
    as an HTTP request would. `request_id` (default: FC's, from `fc_headers`) is inherited through an environ
    key no client can set, so the replayed request's log line carries the invocation's id."""
    headers = dict(call.headers)
    headers.update({k.lower(): v for k, v in (fc_headers or {}).items() if v})
    request_id = request_id or headers.get(gateway.REQUEST_ID)
    environ_base = {"REMOTE_ADDR": call.source_ip or "127.0.0.1"}
    if request_id:
        environ_base[gateway.PARENT_REQUEST_ID] = request_id
    try:
        builder = EnvironBuilder(path=call.path, method=call.method, query_string=call.query, headers=headers,
                                 data=call.body, base_url=f"https://{headers.get('host', 'localhost')}",
                                 environ_base=environ_base)
        try:
            return builder.get_environ()
        finally:
            builder.close()
    except (ValueError, TypeError, UnicodeError) as exc:  # e.g. a host header that is no host
        raise EventError(f"the event is not a valid HTTP request: {exc}") from None


def endpoint_for(app, environ: dict) -> str | None:
    """The endpoint the app would dispatch `environ` to, resolved by the app's own URL map the way Flask
    routes (percent-decoding, merged slashes, ...); None when nothing matches or the map would redirect."""
    try:
        endpoint, _ = app.url_map.bind_to_environ(environ).match()
    except (HTTPException, RoutingException):
        return None
    return endpoint


def run(app, call: HttpCall, fc_headers: Mapping[str, str] | None = None, request_id: str | None = None) -> dict:
    """Run `call` through the WSGI app; FC's response shape back (see `environ_for`)."""
    return run_environ(app, environ_for(call, fc_headers, request_id))


def run_environ(app, environ: dict) -> dict:
    app_iter, status, response_headers = run_wsgi_app(app, environ, buffered=True)
    try:
        body = b"".join(app_iter)
    finally:
        if hasattr(app_iter, "close"):
            app_iter.close()
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
