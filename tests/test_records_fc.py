"""The FC path end to end: `sdfc serve` with SDFC_DISPATCH=fc3 / fc2 invokes the records function through the
real FC SDKs (alibabacloud-fc20230330, aliyun-fc2) against a loopback stub of FC's InvokeFunction API, which
runs the real entrypoint functions/records/index.py writing to MariaDB."""
from __future__ import annotations

import base64
import importlib.util
import json
import time
from pathlib import Path

import pytest
import requests

from sdfc.dispatch.credentials import CredentialSource
from sdfc.dispatch.transports import DeliveryRejected, Fc2OpenTransport, Fc2Transport, Fc3Transport
from sdfc.records import fc_handler, open_store

from . import mariadb
from .fc_stub import FcStub
from .live_server import PASSWORD, USER, start_server

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(width=64, height=64, steps=2)
ROLE_HEADERS = {"x-fc-access-key-id": "AK-FROM-HEADERS", "x-fc-access-key-secret": "secret-h",
                "x-fc-security-token": "sts-token-h"}


def env_credentials(key_id="AK-ENV", token="sts-token-e") -> CredentialSource:
    return CredentialSource(env={"ALIBABA_CLOUD_ACCESS_KEY_ID": key_id, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "s",
                                 "ALIBABA_CLOUD_SECURITY_TOKEN": token})


# The stub itself, driven by the real SDKs -----------------------------------------------------------------
@pytest.fixture
def echo_stub():
    seen = []

    def handler(event, context):
        seen.append((event, context.request_id))
        if event == b"boom":
            raise RuntimeError("handler failed")
        return b"echo:" + event

    stub = FcStub({"writer": handler, "svc/writer": handler}, access_key_id="AK-ENV",
                  security_token="sts-token-e", max_async_retries=1, retry_delay_s=0.01).start()
    stub.seen = seen
    yield stub
    stub.stop()


def test_fc3_sdk_async_and_sync_against_the_stub(echo_stub):
    from alibabacloud_fc20230330 import models
    from alibabacloud_tea_openapi.exceptions import ClientException
    from darabonba.runtime import RuntimeOptions

    transport = Fc3Transport("writer", echo_stub.url, env_credentials())
    transport.deliver(b'{"hello": 1}')
    inv = echo_stub.invocations[-1]
    assert (inv.api, inv.mode, inv.status) == ("fc3", "Async", 202)
    assert inv.headers["x-fc-invocation-type"] == "Async" and inv.headers["x-acs-security-token"] == "sts-token-e"
    assert echo_stub.wait_async_done(5) and echo_stub.seen[-1][0] == b'{"hello": 1}'

    client = transport.client()
    response = client.invoke_function_with_options("writer", models.InvokeFunctionRequest(body=b"hi"),
                                                   models.InvokeFunctionHeaders(x_fc_invocation_type="Sync"),
                                                   RuntimeOptions())
    assert response.status_code == 200 and response.body.read() == b"echo:hi"
    assert response.headers["x-fc-request-id"]
    failed = client.invoke_function_with_options("writer", models.InvokeFunctionRequest(body=b"boom"),
                                                 models.InvokeFunctionHeaders(), RuntimeOptions())
    assert failed.status_code == 200 and failed.headers["x-fc-error-type"] == "UnhandledInvocationError"

    with pytest.raises(DeliveryRejected, match="InvalidArgument"):
        transport.deliver(b"x" * (128 * 1024 + 1))
    transport.deliver(b"x" * (128 * 1024))  # exactly the cap is accepted
    with pytest.raises(ClientException, match="InvalidAccessKeyId"):
        Fc3Transport("writer", echo_stub.url, env_credentials(key_id="AK-OTHER")).deliver(b"{}")
    with pytest.raises(ClientException, match="FunctionNotFound"):
        Fc3Transport("nope", echo_stub.url, env_credentials()).deliver(b"{}")


def test_fc2_sdk_async_against_the_stub(echo_stub):
    from fc2.fc_exceptions import FcError

    transport = Fc2Transport("svc", "writer", echo_stub.url, env_credentials())
    transport.deliver(b'{"hello": 2}')
    inv = echo_stub.invocations[-1]
    assert (inv.api, inv.function, inv.mode, inv.status) == ("fc2", "svc/writer", "Async", 202)
    assert inv.headers["authorization"].startswith("FC AK-ENV:") and inv.headers["x-fc-security-token"]
    assert echo_stub.wait_async_done(5) and echo_stub.seen[-1][0] == b'{"hello": 2}'
    with pytest.raises(DeliveryRejected, match="InvalidArgument"):
        transport.deliver(b"x" * (128 * 1024 + 1))
    with pytest.raises(FcError):
        Fc2Transport("svc", "writer", echo_stub.url, env_credentials(token="wrong")).deliver(b"{}")


def test_fc2_open_sdk_async_against_the_stub(echo_stub):
    """FC 2.0 through its OpenAPI SDK (alibabacloud-fc-open20210406): ACS3 signing, version 2021-04-06, FC 2.0's
    {errorCode, errorMessage} errors (which that SDK does not parse into its exception's code)."""
    from alibabacloud_tea_openapi.exceptions import ClientException

    transport = Fc2OpenTransport("svc", "writer", echo_stub.url, env_credentials())
    transport.deliver(b'{"hello": 3}')
    inv = echo_stub.invocations[-1]
    assert (inv.api, inv.function, inv.mode, inv.status) == ("fc2-open", "svc/writer", "Async", 202)
    assert inv.headers["authorization"].startswith("ACS3-HMAC-SHA256 Credential=AK-ENV,")
    assert inv.headers["x-acs-security-token"] == "sts-token-e"
    assert echo_stub.wait_async_done(5) and echo_stub.seen[-1][0] == b'{"hello": 3}'
    with pytest.raises(DeliveryRejected, match="InvalidArgument"):
        transport.deliver(b"x" * (128 * 1024 + 1))
    with pytest.raises(ClientException) as refused:  # retried later, not set aside
        Fc2OpenTransport("svc", "writer", echo_stub.url, env_credentials(token="wrong")).deliver(b"{}")
    assert refused.value.status_code == 403 and refused.value.data["errorCode"] == "InvalidAccessKeyId"


def test_stub_requires_auth_headers(echo_stub):
    bare = requests.post(echo_stub.url + "/2023-03-30/functions/writer/invocations", data=b"{}",
                         headers={"x-fc-invocation-type": "Async"})
    assert bare.status_code == 403 and bare.json()["Code"] == "InvalidAccessKeyId"
    bare2 = requests.post(echo_stub.url + "/2016-08-15/services/svc/functions/writer/invocations", data=b"{}")
    assert bare2.status_code == 403 and bare2.json()["ErrorCode"] == "InvalidAccessKeyId"
    assert echo_stub.seen == []


# End to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records_db():
    with mariadb.temp_database() as name:
        yield name


@pytest.fixture
def fc_writer(records_db, tmp_path, monkeypatch):
    """The records function as FC would run it: functions/records/index.py, configured by environment."""
    outputs = tmp_path / "nas-outputs"  # the NAS mount both functions share
    monkeypatch.setenv("SDFC_DATABASE_URL", mariadb.url(records_db))
    monkeypatch.setenv("SDFC_OUTPUTS_DIR", str(outputs))
    monkeypatch.setattr(fc_handler, "_writer", None)
    spec = importlib.util.spec_from_file_location("records_index", REPO / "functions" / "records" / "index.py")
    index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(index)
    index.initialize(None)
    yield index, outputs
    index.pre_stop(None)


def wait_for_row(store, prompt: str, timeout: float = 20) -> dict:
    """The record of the generation with this prompt (each generation has its own record key)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (row := row_with_prompt(store, prompt)) is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no record for {prompt[:40]!r}")


def row_with_prompt(store, prompt: str) -> dict | None:
    rows = store._fetch(f"SELECT `id` FROM `generated_images` WHERE `prompt` = {store.placeholder}", (prompt,))
    assert len(rows) <= 1, f"{len(rows)} records for {prompt[:40]!r}"
    return store.get(rows[0]["id"], with_image=True) if rows else None


def generate(server, request_id: str, headers: dict | None = None, **payload) -> requests.Response:
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={**SMALL, **payload}, auth=(USER, PASSWORD),
                      headers={"x-fc-request-id": request_id, **(headers or {})}, timeout=60)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("api", ["fc3", "fc2", "fc2-open"])
def test_txt2img_reaches_mariadb_through_fc(api, fc_writer, records_db, tmp_path):
    index, outputs = fc_writer
    # fc3 takes the role's credentials from FC's request headers, the FC 2.0 SDKs from the environment.
    key_id, token = ("AK-FROM-HEADERS", "sts-token-h") if api == "fc3" else ("AK-ENV", "sts-token-e")
    stub = FcStub({"sdfc-records": index.handler, "sdfc/sdfc-records": index.handler},
                  access_key_id=key_id, security_token=token).start()
    env = {"SDFC_DISPATCH": api, "SDFC_FC_ENDPOINT": stub.url, "SDFC_RECORDS_FUNCTION": "sdfc-records",
           "SDFC_RECORDS_SERVICE": "sdfc", "SDFC_OUTPUTS_DIR": str(outputs), "SDFC_DISPATCH_MAX_BACKOFF_S": "0.3"}
    if api == "fc3":
        env.update(FC_INSTANCE_ID="c-records-e2e", FC_FUNCTION_NAME="sdfc-api")  # x-fc-* headers are FC's there
    if api in ("fc2", "fc2-open"):
        env.update(ALIBABA_CLOUD_ACCESS_KEY_ID="AK-ENV", ALIBABA_CLOUD_ACCESS_KEY_SECRET="secret-e",
                   ALIBABA_CLOUD_SECURITY_TOKEN="sts-token-e")
    server = start_server(tmp_path, env=env)
    store = open_store(mariadb.url(records_db))
    headers = ROLE_HEADERS if api == "fc3" else {}
    prompt, long_prompt, outage_prompt = f"over FC ({api})", f"{api} " + "🎨" * 16_000, f"during an outage ({api})"
    try:
        response = generate(server, f"{api}-e2e", headers, prompt=prompt, negative_prompt="blur", seed=99,
                            cfg_scale=4.5)
        row = wait_for_row(store, prompt)
        assert {k: row[k] for k in ("prompt", "negative_prompt", "steps", "seed", "cfg_scale", "size", "model")} \
            == {"prompt": prompt, "negative_prompt": "blur", "steps": "2", "seed": "99", "cfg_scale": "4.5",
                "size": "64x64", "model": "tiny-sd"}
        assert base64.b64decode(row["image_base64"]) == base64.b64decode(response.json()["images"][0])
        sent = [i for i in stub.accepted("Async") if json.loads(i.body)["request_id"] == row["request_id"]]
        assert len(sent) == 1 and len(sent[0].body) < 4096  # metadata and a key, never the image
        assert row["image_key"] == json.loads(sent[0].body)["image_key"]

        # A prompt whose event exceeds FC's 128 KB async cap travels by key as well, and is stored verbatim.
        generate(server, f"{api}-long", headers, prompt=long_prompt)
        long_row = wait_for_row(store, long_prompt)
        long_sent = [i for i in stub.accepted("Async") if json.loads(i.body)["request_id"] == long_row["request_id"]]
        assert "event_key" in json.loads(long_sent[0].body) and len(long_sent[0].body) < 1024

        # FC unavailable for a while: records wait in the spool and arrive once it answers again.
        stub.functions_backup, stub.functions = stub.functions, {}
        generate(server, f"{api}-outage", headers, prompt=outage_prompt)
        time.sleep(1.0)
        assert row_with_prompt(store, outage_prompt) is None
        stub.functions = stub.functions_backup
        assert wait_for_row(store, outage_prompt)["prompt"] == outage_prompt
        assert stub.wait_async_done(10)
        counts = mariadb.fetch(records_db, "SELECT COUNT(*) AS n FROM generated_images WHERE prompt IN (%s, %s, %s)",
                               (prompt, long_prompt, outage_prompt))
        assert counts[0]["n"] == 3
    finally:
        server.stop()
        stub.stop()
        store.close()


def test_fc_async_retries_complete_a_failed_write(fc_writer, records_db):
    """The writer fails on the first delivery (after writing the row, its answer lost); FC's async retry
    delivers again and the idempotent upsert leaves exactly one row."""
    from sdfc.records import OutputsStore
    from sdfc.records.events import encode_event, event_from_generation, image_key, utc_now

    index, outputs_dir = fc_writer
    attempts = []

    def flaky(event, context):
        result = index.handler(event, context)
        attempts.append(context.request_id)
        if len(attempts) == 1:
            raise TimeoutError("instance frozen before answering")
        return result

    stub = FcStub({"sdfc-records": flaky}, access_key_id="AK-ENV", security_token="sts-token-e",
                  retry_delay_s=0.01).start()
    try:
        outputs = OutputsStore(outputs_dir)
        now = utc_now()
        record = {"request_id": "fc-retry", "image_index": 0, "prompt": "retried", "negative_prompt": "",
                  "steps": 2, "seed": 5, "sampler": "Euler", "cfg_scale": 7.0, "size": "64x64",
                  "model_hash": "e8b3bb4a7a", "model": "tiny-sd", "infotext": "retried", "image_format": "png",
                  "image_bytes": b"\x89PNG retried"}
        key = image_key("fc-retry", 0, "png", now)
        outputs.put(key, record["image_bytes"])
        Fc3Transport("sdfc-records", stub.url, env_credentials()).deliver(
            encode_event(event_from_generation(record, key, now)))
        assert stub.wait_async_done(10) and stub.accepted()[0].outcome == "ok"
        assert len(attempts) == 2 and stub.accepted()[0].attempts == 2
        rows = mariadb.fetch(records_db, "SELECT prompt FROM generated_images WHERE request_id = 'fc-retry'")
        assert rows == [{"prompt": "retried"}]
    finally:
        stub.stop()
