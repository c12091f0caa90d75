"""What FC's gateway vouches for, and when to believe it.

In FC every request reaches the instance through FC's gateway, which sets the `x-fc-*` request headers itself
(request id, the role's STS credentials, and `x-fc-control-path`: which kind of call this is) and accepts
none from clients (docs/fc-deploy.md §3.3: "clients may not send headers starting with x-fc-"). Outside FC
nothing stands between a client and the server, so the same headers are whatever the client chose: they are
never believed there.

`x-fc-control-path` names the call: `/initialize`, `/pre-freeze` and `/pre-stop` for FC's lifecycle hooks,
`/invoke` for InvokeFunction, `/http-invoke` for an HTTP trigger or custom domain request. A client that asks
for `GET /pre-stop` through the HTTP trigger therefore arrives with `x-fc-control-path: /http-invoke`.

Whether this process runs in FC is read from the environment FC sets in every instance (`FC_INSTANCE_ID`,
`FC_FUNCTION_NAME`; `FC_*` names are reserved, so no function configuration can set them).
"""
from __future__ import annotations

import logging
from typing import Mapping

log = logging.getLogger("sdfc.fc")

FC_PREFIX = "x-fc-"
CONTROL_PATH = "x-fc-control-path"
REQUEST_ID = "x-fc-request-id"
INSTANCE_MARKERS = ("FC_INSTANCE_ID", "FC_FUNCTION_NAME")
# The WSGI environ key through which an event replayed by /invoke (or the web function's handler) inherits
# its caller's request id. No client can set an environ key that does not start with HTTP_.
PARENT_REQUEST_ID = "sdfc.request_id"
# A custom container's address: FC forwards to the port in customContainerConfig (SDFC_PORT in the image), on
# every interface; 127.0.0.1 would give FunctionNotStarted.
CONTAINER_HOST = "0.0.0.0"
DEFAULT_CONTAINER_PORT = 9000


def container_bind(env: Mapping[str, str]) -> tuple[str, int]:
    return CONTAINER_HOST, int(env.get("SDFC_PORT") or DEFAULT_CONTAINER_PORT)


# A custom container tells FC that an invocation failed with this response header (async retries, then the
# onFailure destination apply).
FAILED_INVOCATION = {"x-fc-status": "404"}


def worth_retrying(status: int) -> bool:
    """Whether FC should count an event's answer as a failed invocation: a server-side failure or a full queue
    may pass on another try; a 4xx (bad credentials, a request that fails validation, an unknown task) fails the
    same way every time, and each retry would wake a GPU instance for nothing."""
    return status >= 500 or status == 429


def invocation_outcome_headers(status: int) -> dict[str, str]:
    """The headers an event's answer with `status` carries for FC (every container function's one policy)."""
    if worth_retrying(status):
        return dict(FAILED_INVOCATION)
    if status >= 400:
        log.warning("event answered %d: not retried (a client error fails the same way every time)", status)
    return {}


def running_in_fc(env: Mapping[str, str]) -> bool:
    return all(env.get(name) for name in INSTANCE_MARKERS)


def trusted_headers(headers: Mapping[str, str], in_fc: bool) -> dict[str, str]:
    """The request's `x-fc-*` headers (lower-case names) when FC's gateway set them; none outside FC."""
    if not in_fc:
        return {}
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(FC_PREFIX)}


def request_id(headers: Mapping[str, str], in_fc: bool) -> str | None:
    return trusted_headers(headers, in_fc).get(REQUEST_ID) or None


def is_platform_call(headers: Mapping[str, str], in_fc: bool, control_path: str) -> bool:
    """True only for FC's own call of the hook `control_path` (e.g. `/pre-stop`)."""
    return trusted_headers(headers, in_fc).get(CONTROL_PATH) == control_path
