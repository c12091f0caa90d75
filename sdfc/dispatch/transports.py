"""How an encoded record event reaches the writer: in-process (local) or FC's asynchronous InvokeFunction,
through FC 3.0's SDK (alibabacloud-fc20230330) or either FC 2.0 SDK (aliyun-fc2, alibabacloud-fc-open20210406).

A transport delivers one body or raises: `DeliveryRejected` when this body can never be accepted (set aside),
anything else when it may work later (retried with backoff).
"""
from __future__ import annotations

import logging
from typing import Callable
from urllib.parse import urlsplit

from .credentials import CredentialSource, Credentials

log = logging.getLogger("sdfc.dispatch")

ASYNC_BODY_LIMIT = 128 * 1024  # FC's cap on asynchronous invocation bodies (docs/fc-deploy.md §3.4)


class DeliveryRejected(ValueError):
    """The writer side refused this body for good (e.g. FC's InvalidArgument for a body over the cap)."""


# FC's answers that no retry can change: a malformed or oversized body (FC's error-code table).
_REJECTED_FOR_GOOD = ("InvalidArgument", "PayloadTooLarge", "EntityTooLarge")


def _reject_for_good(status: int | None, code: str | None, message: str | None) -> None:
    if status in (400, 413) and code in _REJECTED_FOR_GOOD:
        raise DeliveryRejected(f"FC refused the event: {code}: {message}")


def _openapi_error(exc) -> tuple[str | None, str | None]:
    """(code, message) of an OpenAPI SDK error. FC 3.0 answers {Code, Message}, which the SDK parses; FC 2.0's
    OpenAPI answers {errorCode, errorMessage}, which it leaves in `data`."""
    data = exc.data if isinstance(exc.data, dict) else {}
    code = exc.code if exc.code not in (None, "", "None") else None  # the SDK formats a missing Code as "None"
    return (code or data.get("errorCode") or data.get("ErrorCode"),
            data.get("errorMessage") or data.get("ErrorMessage") or exc.message)


class NoCredentials(RuntimeError):
    """No credentials yet: FC passes them with each request, so the next request may bring them."""


class LocalTransport:
    """Calls the writer's handler in this process: the same code FC runs in the records function."""
    max_event_bytes = None

    def __init__(self, handler: Callable[[bytes], object]):
        self.handler = handler

    def deliver(self, body: bytes) -> None:
        self.handler(body)


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """`https://host[:port]` or a bare host → (scheme, host[:port])."""
    if "://" not in endpoint:
        return "https", endpoint.strip("/")
    parts = urlsplit(endpoint)
    return parts.scheme, parts.netloc


class _FcTransport:
    max_event_bytes = ASYNC_BODY_LIMIT

    def __init__(self, endpoint: str, credentials: CredentialSource, timeout_s: float = 10.0,
                 max_event_bytes: int = ASYNC_BODY_LIMIT):
        self.scheme, self.host = _split_endpoint(endpoint)
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.max_event_bytes = max_event_bytes
        self._client = None
        self._client_for: Credentials | None = None

    def _credentials(self) -> Credentials:
        creds = self.credentials.current()
        if creds is None:
            raise NoCredentials("no Alibaba Cloud credentials: neither x-fc-access-key-* request headers nor "
                                "ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET in the environment")
        return creds

    def _openapi_config(self, creds: Credentials):
        """The Alibaba Cloud OpenAPI SDKs' client configuration (FC 3.0's and FC 2.0's OpenAPI SDK share it)."""
        from alibabacloud_tea_openapi import models as openapi_models
        return openapi_models.Config(access_key_id=creds.access_key_id, access_key_secret=creds.access_key_secret,
                                     security_token=creds.security_token, endpoint=self.host, protocol=self.scheme,
                                     connect_timeout=int(self.timeout_s * 1000),
                                     read_timeout=int(self.timeout_s * 1000))

    def client(self):
        """One SDK client, rebuilt only when the credentials change (STS tokens rotate)."""
        creds = self._credentials()
        if self._client is None or creds != self._client_for:
            self._client, self._client_for = self._make_client(creds), creds
        return self._client


class Fc3Transport(_FcTransport):
    """FC 3.0: alibabacloud-fc20230330 `InvokeFunction` with `x-fc-invocation-type: Async`."""

    def __init__(self, function_name: str, endpoint: str, credentials: CredentialSource,
                 qualifier: str | None = None, **kwargs):
        super().__init__(endpoint, credentials, **kwargs)
        self.function_name, self.qualifier = function_name, qualifier

    def _make_client(self, creds: Credentials):
        from alibabacloud_fc20230330.client import Client
        return Client(self._openapi_config(creds))

    def deliver(self, body: bytes, async_task_id: str | None = None) -> None:
        """`async_task_id`: FC's asynchronous task id (x-fc-async-task-id), so that FC's console and API can
        name, query and stop the invocation by the caller's own id."""
        from alibabacloud_fc20230330 import models
        from alibabacloud_tea_openapi.exceptions import ClientException
        from darabonba.runtime import RuntimeOptions
        client = self.client()
        try:
            response = client.invoke_function_with_options(
                self.function_name, models.InvokeFunctionRequest(body=body, qualifier=self.qualifier),
                models.InvokeFunctionHeaders(x_fc_invocation_type="Async", x_fc_async_task_id=async_task_id),
                RuntimeOptions(autoretry=False))
        except ClientException as exc:
            _reject_for_good(exc.status_code, *_openapi_error(exc))
            raise
        if response.status_code != 202:
            raise RuntimeError(f"FC answered {response.status_code} to an asynchronous invocation, expected 202")


class Fc2Transport(_FcTransport):
    """FC 2.0 (service + function): aliyun-fc2 `invoke_function` with `x-fc-invocation-type: Async`."""

    def __init__(self, service_name: str, function_name: str, endpoint: str, credentials: CredentialSource,
                 qualifier: str | None = None, **kwargs):
        super().__init__(endpoint, credentials, **kwargs)
        self.service_name, self.function_name, self.qualifier = service_name, function_name, qualifier

    def _make_client(self, creds: Credentials):
        import fc2
        return fc2.Client(endpoint=f"{self.scheme}://{self.host}", accessKeyID=creds.access_key_id,
                          accessKeySecret=creds.access_key_secret, securityToken=creds.security_token or "",
                          Timeout=self.timeout_s)

    def deliver(self, body: bytes) -> None:
        from fc2.fc_exceptions import FcError
        client = self.client()
        try:
            client.invoke_function(self.service_name, self.function_name, payload=body,
                                   headers={"x-fc-invocation-type": "Async"}, qualifier=self.qualifier)
        except FcError as exc:
            _reject_for_good(exc.status_code, exc.err_code, exc.message)
            raise


class Fc2OpenTransport(Fc2Transport):
    """The same FC 2.0 service + function through FC 2.0's OpenAPI SDK: alibabacloud-fc-open20210406
    `InvokeFunction` with `x-fc-invocation-type: Async` (the SDK the FC 2.0 console's examples use)."""

    def _make_client(self, creds: Credentials):
        from alibabacloud_fc_open20210406.client import Client
        return Client(self._openapi_config(creds))

    def deliver(self, body: bytes) -> None:
        from alibabacloud_fc_open20210406 import models
        from alibabacloud_tea_openapi.exceptions import ClientException
        from alibabacloud_tea_util.models import RuntimeOptions
        client = self.client()
        try:
            response = client.invoke_function_with_options(
                self.service_name, self.function_name,
                models.InvokeFunctionRequest(body=body, qualifier=self.qualifier),
                models.InvokeFunctionHeaders(x_fc_invocation_type="Async"), RuntimeOptions(autoretry=False))
        except ClientException as exc:
            _reject_for_good(exc.status_code, *_openapi_error(exc))
            raise
        if response.status_code != 202:
            raise RuntimeError(f"FC answered {response.status_code} to an asynchronous invocation, expected 202")
