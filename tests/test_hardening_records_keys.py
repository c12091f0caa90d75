"""Issue 15 #3, over real sockets: a client's `x-fc-*` headers decide nothing. Its `x-fc-request-id` is no
record key (two requests with the same one keep two rows), its `x-fc-access-key-*` headers never become the
dispatch credentials unless the request passed auth inside FC, and a spool entry that keeps failing while
others get through is set aside in `rejected/` without delaying them."""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
import requests

from sdfc.dispatch import Dispatcher, RecordSink, Spool
from sdfc.dispatch.transports import LocalTransport
from sdfc.records import OutputsStore, RecordWriter, open_store
from sdfc.records.events import event_from_generation, image_key, utc_now

from .fc_stub import FcStub
from .live_server import PASSWORD, USER, start_server

SMALL = dict(width=64, height=64, steps=2)
FC_ENV = {"FC_INSTANCE_ID": "c-hardening", "FC_FUNCTION_NAME": "sdfc-api"}


def rows_with_prompt(store, prompt: str) -> list[dict]:
    rows = store._fetch(f"SELECT `id` FROM `generated_images` WHERE `prompt` = {store.placeholder} ORDER BY `id`",
                        (prompt,))
    return [store.get(r["id"], with_image=True) for r in rows]


def wait_for_rows(store, prompt: str, count: int = 1, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = rows_with_prompt(store, prompt)
        if len(rows) >= count:
            return rows
        time.sleep(0.02)
    raise AssertionError(f"{count} record(s) with prompt {prompt!r} expected after {timeout} s")


def txt2img(server, prompt: str, headers: dict | None = None, auth=(USER, PASSWORD)) -> requests.Response:
    return requests.post(server.url + "/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt}, auth=auth,
                         headers=headers or {}, timeout=60)


def test_a_client_request_id_is_no_record_key(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'records.db'}"
    server = start_server(tmp_path, env={"SDFC_DATABASE_URL": database_url})
    store = open_store(database_url)
    try:
        chosen = {"x-fc-request-id": "victim-request-1"}
        first = txt2img(server, "the victim's picture", chosen)
        second = txt2img(server, "the attacker's picture", chosen)
        assert first.status_code == second.status_code == 200
        assert "victim-request-1" not in (first.headers["X-Request-Id"], second.headers["X-Request-Id"])
        victim = wait_for_rows(store, "the victim's picture")
        attacker = wait_for_rows(store, "the attacker's picture")
        assert len(victim) == len(attacker) == 1 and victim[0]["id"] != attacker[0]["id"]
        assert victim[0]["request_id"] != attacker[0]["request_id"]
        assert base64.b64decode(victim[0]["image_base64"]) == base64.b64decode(first.json()["images"][0])
        assert store.count() == 2
        assert Spool(tmp_path / "data" / "spool").names() == [] and Spool(tmp_path / "data" / "spool").rejected() == []
    finally:
        server.stop()
        store.close()


def poison_entry(data_dir, prompt: str) -> str:
    """A spooled record whose image in the outputs store never matches its sha256: the writer answers
    ImageNotReady (transient) to every delivery, for ever."""
    outputs = OutputsStore(data_dir / "outputs")
    now = utc_now()
    record = {"request_id": "poison", "image_index": 0, "prompt": prompt, "negative_prompt": "", "steps": 2,
              "seed": 1, "sampler": "Euler", "cfg_scale": 7.0, "size": "64x64", "model_hash": "e8b3bb4a7a",
              "model": "tiny-sd", "infotext": prompt, "image_format": "png", "image_bytes": b"\x89PNG the original"}
    key = image_key("poison", 0, "png", now)
    outputs.put(key, b"\x89PNG something else")
    return Spool(data_dir / "spool").write(event_from_generation(record, key, now))


def test_a_poison_spool_entry_is_set_aside_and_delays_nobody(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'records.db'}"
    name = poison_entry(tmp_path / "data", "poison")
    spool = Spool(tmp_path / "data" / "spool")
    server = start_server(tmp_path, env={"SDFC_DATABASE_URL": database_url})  # default backoff: up to 30 s
    store = open_store(database_url)
    try:
        lags = []
        deadline = time.monotonic() + 30
        i = 0
        while name not in spool.rejected() and time.monotonic() < deadline:
            prompt = f"after the poison {i}"
            assert txt2img(server, prompt).status_code == 200
            answered = time.monotonic()
            wait_for_rows(store, prompt, timeout=10)
            lags.append(time.monotonic() - answered)
            i += 1
        assert name in spool.rejected(), f"still retried after {i} generations:\n{server.log()[-3000:]}"
        assert max(lags) < 2.0, lags  # no generation's record waited behind the poison
        reason = (spool.rejected_dir / f"{name}.reason.txt").read_text()
        assert "ImageNotReady" in reason and "while other records were" in reason
        assert spool.names() == [] and store.count() == i and not rows_with_prompt(store, "poison")
    finally:
        server.stop()
        store.close()


def test_an_outage_never_rejects_records(tmp_path):
    """The other side of the bound: while nothing is delivered, failures are the writer's, not the records'."""
    outputs = OutputsStore(tmp_path / "outputs")
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    writer = RecordWriter(store, outputs)
    down = threading.Event()
    down.set()

    def handle(body):
        if down.is_set():
            raise ConnectionError("database down")
        return writer.handle(body)

    spool = Spool(tmp_path / "spool")
    dispatcher = Dispatcher(spool, LocalTransport(handle), outputs, base_backoff_s=0.005, max_backoff_s=0.02,
                            max_strikes=2)
    sink = RecordSink(outputs, dispatcher)
    for i in range(3):
        sink([{"request_id": uuid.uuid4().hex, "image_index": 0, "prompt": f"outage {i}", "image_format": "png",
               "image_bytes": b"\x89PNG outage %d" % i}])
    time.sleep(1.0)  # dozens of failed attempts each
    assert dispatcher.retries > 20 and spool.rejected() == []
    down.clear()
    assert dispatcher.wait_idle(10) and store.count() == 3 and spool.rejected() == []
    # Restartable: after close (FC's pre-stop drain), a later submit starts the worker again.
    assert dispatcher.close(1)
    sink([{"request_id": uuid.uuid4().hex, "image_index": 0, "prompt": "after close", "image_format": "png",
           "image_bytes": b"\x89PNG after close"}])
    assert dispatcher.wait_idle(10) and store.count() == 4
    dispatcher.close(1)


@pytest.fixture()
def stub():
    received = []
    fc = FcStub({"sdfc-records": lambda body, context: received.append(json.loads(body))},
                access_key_id="GOOD-AK", security_token="good-token").start()
    fc.received = received
    yield fc
    fc.stop()


EVIL = {"x-fc-access-key-id": "EVIL-AK", "x-fc-access-key-secret": "evil", "x-fc-security-token": "evil-token"}
GOOD = {"x-fc-access-key-id": "GOOD-AK", "x-fc-access-key-secret": "good", "x-fc-security-token": "good-token"}


def dispatch_env(stub) -> dict:
    return {"SDFC_DISPATCH": "fc3", "SDFC_FC_ENDPOINT": stub.url, "SDFC_RECORDS_FUNCTION": "sdfc-records",
            "SDFC_DISPATCH_MAX_BACKOFF_S": "0.3"}


def delivered_with(stub, prompt: str, timeout: float = 20) -> list[str]:
    """The access key ids of the invocations that carried `prompt`, once one was accepted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(event.get("prompt") == prompt for event in stub.received):
            break
        time.sleep(0.05)
    return sorted({inv.headers.get("authorization", "").split("Credential=")[-1].split(",")[0]
                   for inv in stub.invocations if prompt.encode() in inv.body})


@pytest.mark.parametrize("in_fc", [False, True], ids=["outside-fc", "in-fc"])
def test_access_key_headers_of_a_request_that_failed_auth_change_nothing(tmp_path, stub, in_fc):
    env = dispatch_env(stub)
    if in_fc:
        env.update(FC_ENV)  # FC's headers are believed, from requests that pass auth
    else:
        env.update(ALIBABA_CLOUD_ACCESS_KEY_ID="GOOD-AK", ALIBABA_CLOUD_ACCESS_KEY_SECRET="good",
                   ALIBABA_CLOUD_SECURITY_TOKEN="good-token")
    server = start_server(tmp_path, env=env)
    try:
        if in_fc:  # an authenticated request through FC brings the role's credentials
            r = requests.get(server.url + "/sdapi/v1/options", auth=(USER, PASSWORD), headers=GOOD, timeout=10)
            assert r.status_code == 200
        assert txt2img(server, "anonymous", EVIL, auth=None).status_code == 401
        assert txt2img(server, "wrong password", EVIL, auth=(USER, "not-the-password")).status_code == 401
        assert requests.get(server.url + "/sdapi/v1/options", headers=EVIL, timeout=10).status_code == 401
        if not in_fc:  # outside FC even an authenticated client's x-fc-* headers are just the client's
            assert txt2img(server, "authenticated, outside FC", EVIL).status_code == 200
            assert delivered_with(stub, "authenticated, outside FC") == ["GOOD-AK"]
        assert txt2img(server, "the next record").status_code == 200
        assert delivered_with(stub, "the next record") == ["GOOD-AK"], server.log()[-2000:]
        assert not [inv for inv in stub.invocations if "EVIL-AK" in inv.headers.get("authorization", "")]
    finally:
        server.stop()
