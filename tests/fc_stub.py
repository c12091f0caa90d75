"""A loopback stand-in for FC's InvokeFunction API, for the real FC SDKs to talk to.

It follows the documented protocol (docs/fc-deploy.md §3.3, §3.4, §8):
- FC 3.0: `POST /2023-03-30/functions/{functionName}/invocations` (alibabacloud-fc20230330), ACS3-HMAC-SHA256
  `Authorization`, `x-acs-action: InvokeFunction`, `x-acs-version: 2023-03-30`.
- FC 2.0: `POST /2016-08-15/services/{service}/functions/{function}/invocations` (aliyun-fc2), `FC <id>:<sig>`
  `Authorization` and a `date` header; and FC 2.0's OpenAPI, `POST /2021-04-06/services/{service}/functions/
  {function}/invocations` (alibabacloud-fc-open20210406), ACS3-HMAC-SHA256 with `x-acs-version: 2021-04-06`,
  errors as `{"errorCode", "errorMessage"}` (FC 2.0's error table).
- `x-fc-invocation-type: Async` → 202 with `x-fc-request-id`, the handler runs later, failed runs retried like
  FC's `maxAsyncRetryAttempts`; otherwise sync → 200 with the handler's result, or 200 with
  `x-fc-error-type: UnhandledInvocationError` when it raised.
- Bodies over 128 KB (async) or 32 MB (sync) → 400 InvalidArgument, as FC.
Signatures are not verified, but the auth headers must be present and name the expected AccessKey ID (and
carry the security token when one is expected), so tests see which credentials the caller used.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Callable

ASYNC_LIMIT = 128 * 1024
SYNC_LIMIT = 32 * 1024 * 1024
FC3_PATH = re.compile(r"^/2023-03-30/functions/(?P<function>[^/]+)/invocations$")
FC2_PATH = re.compile(r"^/2016-08-15/services/(?P<service>[^/]+)/functions/(?P<function>[^/]+)/invocations$")
FC2_OPEN_PATH = re.compile(r"^/2021-04-06/services/(?P<service>[^/]+)/functions/(?P<function>[^/]+)/invocations$")
ACS_VERSIONS = {"fc3": "2023-03-30", "fc2-open": "2021-04-06"}


@dataclass
class Invocation:
    api: str               # "fc3", "fc2" or "fc2-open"
    function: str          # "name" (fc3) or "service/name" (fc2, fc2-open)
    mode: str              # "Async" or "Sync"
    headers: dict
    body: bytes
    status: int
    request_id: str
    attempts: int = 0
    outcome: str = "pending"  # for async: "ok", "failed" (after all retries)
    error: str | None = None


@dataclass
class FcStub:
    functions: dict[str, Callable]          # {"fn": handler} for fc3, {"service/fn": handler} for fc2(-open)
    access_key_id: str = "stub-ak"
    security_token: str | None = None     # when set, requests must carry it
    async_limit: int = ASYNC_LIMIT
    max_async_retries: int = 3            # FC's default maxAsyncRetryAttempts
    retry_delay_s: float = 0.05
    invocations: list = field(default_factory=list)

    def start(self) -> "FcStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                stub._handle(self)

            def do_GET(self):
                stub._reply(self, "fc3", 404, {"Code": "NotFound", "Message": "only InvokeFunction is stubbed"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._async: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._async_worker, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._async.put(None)

    # What tests look at --------------------------------------------------------------------------------------
    def accepted(self, mode: str = "Async") -> list[Invocation]:
        return [i for i in self.invocations if i.mode == mode and i.status in (200, 202)]

    def wait_async_done(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i.outcome != "pending" for i in self.accepted("Async")) and self._async.empty():
                return True
            time.sleep(0.02)
        return False

    # Protocol ------------------------------------------------------------------------------------------------
    def _reply(self, http, api: str, status: int, payload, request_id: str | None = None,
               headers: dict | None = None) -> None:
        request_id = request_id or uuid.uuid4().hex
        if status >= 400 and isinstance(payload, dict):
            if api == "fc2":
                payload = {"ErrorCode": payload.get("Code"), "ErrorMessage": payload.get("Message")}
            elif api == "fc2-open":
                payload = {"errorCode": payload.get("Code"), "errorMessage": payload.get("Message")}
            else:
                payload = {**payload, "RequestId": request_id}
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        http.send_response(status)
        http.send_header("x-fc-request-id", request_id)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            http.send_header(k, v)
        http.end_headers()
        http.wfile.write(body)

    def _auth_problem(self, api: str, headers: dict) -> str | None:
        auth = headers.get("authorization", "")
        if api in ACS_VERSIONS:
            version = ACS_VERSIONS[api]
            if headers.get("x-acs-action") != "InvokeFunction" or headers.get("x-acs-version") != version:
                return f"x-acs-action InvokeFunction and x-acs-version {version} required"
            if not auth.startswith("ACS3-HMAC-SHA256 ") or f"Credential={self.access_key_id}," not in auth:
                return f"ACS3-HMAC-SHA256 authorization for {self.access_key_id} required, got {auth[:60]!r}"
            if "x-acs-date" not in headers:
                return "x-acs-date required"
            token = headers.get("x-acs-security-token")
        else:
            if not auth.startswith(f"FC {self.access_key_id}:") or "date" not in headers:
                return f"FC authorization for {self.access_key_id} and a date header required, got {auth[:60]!r}"
            token = headers.get("x-fc-security-token")
        if self.security_token is not None and token != self.security_token:
            return "security token missing or wrong"
        return None

    def _handle(self, http) -> None:
        path = http.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in http.headers.items()}
        body = http.rfile.read(int(headers.get("content-length") or 0))
        request_id = uuid.uuid4().hex
        if m := FC3_PATH.match(path):
            api, function = "fc3", m["function"]
        elif m := FC2_PATH.match(path):
            api, function = "fc2", f"{m['service']}/{m['function']}"
        elif m := FC2_OPEN_PATH.match(path):
            api, function = "fc2-open", f"{m['service']}/{m['function']}"
        else:
            return self._reply(http, "fc3", 404, {"Code": "NotFound", "Message": f"no route {path}"}, request_id)
        mode = "Async" if headers.get("x-fc-invocation-type", "").lower() == "async" else "Sync"
        inv = Invocation(api, function, mode, headers, body, 0, request_id)
        self.invocations.append(inv)
        if problem := self._auth_problem(api, headers):
            inv.status = 403
            return self._reply(http, api, 403, {"Code": "InvalidAccessKeyId", "Message": problem}, request_id)
        if function not in self.functions:
            inv.status = 404
            return self._reply(http, api, 404, {"Code": "FunctionNotFound", "Message": function}, request_id)
        limit = self.async_limit if mode == "Async" else SYNC_LIMIT
        if len(body) > limit:
            inv.status = 400
            return self._reply(http, api, 400, {"Code": "InvalidArgument", "Message":
                                                f"{mode} invocation body of {len(body)} bytes exceeds {limit}"},
                               request_id)
        if mode == "Async":
            inv.status = 202
            self._async.put(inv)
            return self._reply(http, api, 202, b"", request_id)
        inv.status = 200
        try:
            result = self._run(inv)
        except Exception as exc:  # noqa: BLE001 - FC reports it in a header, status stays 200
            return self._reply(http, api, 200, {"errorMessage": str(exc), "errorType": type(exc).__name__},
                               request_id, {"x-fc-error-type": "UnhandledInvocationError"})
        payload = result if isinstance(result, bytes) else str(result if result is not None else "").encode()
        return self._reply(http, api, 200, payload, request_id)

    def _run(self, inv: Invocation):
        inv.attempts += 1
        context = SimpleNamespace(request_id=inv.request_id, region="cn-hangzhou", account_id="1234567890",
                                  function=SimpleNamespace(name=inv.function.split("/")[-1]),
                                  credentials=SimpleNamespace(access_key_id=self.access_key_id,
                                                              access_key_secret="stub-secret",
                                                              security_token=self.security_token))
        return self.functions[inv.function](inv.body, context)

    def _async_worker(self) -> None:
        while (inv := self._async.get()) is not None:
            for attempt in range(1 + self.max_async_retries):
                try:
                    self._run(inv)
                    inv.outcome = "ok"
                    break
                except Exception as exc:  # noqa: BLE001 - retried, as FC does
                    inv.error = f"{type(exc).__name__}: {exc}"
                    time.sleep(self.retry_delay_s * (2 ** attempt))
            else:
                inv.outcome = "failed"
