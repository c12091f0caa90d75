"""Issue 15 #2 and #9, over real sockets: FC's lifecycle routes answer only FC's own calls, `/invoke` never
reaches a hook however the event spells its path, `?` in rawPath is a query, and a 500 says nothing internal.

The sd-api container runs as in test_deploy_container (the image's command, FC's environment). FC's gateway
is modelled as documented: it sets `x-fc-control-path` on every request it forwards (`/http-invoke` for a
client's HTTP request, the hook's path for its own calls) and lets no client send `x-fc-*` headers."""
from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import requests

from .live_server import start_server
from .test_deploy_container import (PASSWORD, SMALL, USER, Container, fc_headers, records_stub,
                                    start_container)

BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def client_via_gateway(request_id: str | None = None) -> dict:
    """What a client's request through the HTTP trigger carries when it reaches the container."""
    return {**fc_headers(request_id or f"client-{uuid.uuid4().hex}"), "x-fc-control-path": "/http-invoke"}


def fc_call(control_path: str, request_id: str | None = None) -> dict:
    """FC's own call of a hook."""
    return {**fc_headers(request_id or f"fc-{uuid.uuid4().hex}"), "x-fc-control-path": control_path}


def txt2img_event(prompt: str) -> dict:
    return {"rawPath": "/sdapi/v1/txt2img", "requestContext": {"http": {"method": "POST"}},
            "headers": BASIC, "body": json.dumps({**SMALL, "prompt": prompt})}


@pytest.fixture(scope="module")
def stub():
    fc = records_stub()
    yield fc
    fc.stop()


@pytest.fixture(scope="module")
def container(tmp_path_factory, stub):
    box = start_container(tmp_path_factory.mktemp("hardening-fc"), stub)
    yield box
    assert box.stop() == 0, box.log()


def delivered(stub, prompt: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(event.get("prompt") == prompt for event in stub.received):
            return True
        time.sleep(0.05)
    return False


def test_client_calls_of_the_lifecycle_routes_are_refused_and_change_nothing(container, stub):
    invoke_prompt = f"smuggled {uuid.uuid4().hex}"
    attempts = [("GET", "/pre-stop", None), ("POST", "/initialize", None),
                ("POST", "/invoke", json.dumps(txt2img_event(invoke_prompt)).encode())]
    for method, path, body in attempts:
        for headers in ({}, client_via_gateway(), {**client_via_gateway(), **BASIC}):
            r = requests.request(method, container.url + path, data=body, timeout=30,
                                 headers={**headers, "Content-Type": "application/octet-stream"})
            assert r.status_code == 404, (method, path, headers.keys(), r.text)
    log = container.log()
    assert "pre-stop:" not in log and "initialized:" not in log  # no drain, no model load
    assert not delivered(stub, invoke_prompt, timeout=0.5)  # the smuggled event never ran
    # The records dispatcher still delivers: a client's generation reaches the records function.
    prompt = f"after the refusals {uuid.uuid4().hex}"
    r = requests.post(container.url + "/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt},
                      auth=(USER, PASSWORD), headers=client_via_gateway(), timeout=120)
    assert r.status_code == 200, r.text
    assert delivered(stub, prompt), container.log()


def test_fc_own_calls_of_the_hooks_still_work(container, stub):
    r = requests.post(container.url + "/initialize", headers=fc_call("/initialize"), timeout=120)
    assert r.status_code == 200 and r.json()["model"].startswith("tiny-sd"), r.text
    prompt = f"by InvokeFunction {uuid.uuid4().hex}"
    r = requests.post(container.url + "/invoke", data=json.dumps(txt2img_event(prompt)).encode(), timeout=120,
                      headers={**fc_call("/invoke"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["statusCode"] == 200, r.text
    assert delivered(stub, prompt)


# Spellings of the hooks' paths. Whatever werkzeug would route to a hook is refused; the rest are answered as the
# app answers them (404, a redirect), never by running a hook.
SPELLINGS = ["/%69nvoke", "/%69%6E%76%6F%6B%65", "/invoke?x=1", "/%70re-stop", "/pre-stop?", "/%69nitialize",
             "/%2Finvoke", "//invoke", "/invoke/", "/./invoke", "/sdapi/../invoke", "/INVOKE", "/invoke;x=1",
             "/invoke%00", "/invoke%20"]


@pytest.mark.parametrize("path", SPELLINGS)
def test_invoke_never_reaches_a_hook_however_the_path_is_spelled(container, path):
    event = {"rawPath": path, "requestContext": {"http": {"method": "GET" if "stop" in path else "POST"}},
             "headers": BASIC, "body": json.dumps(txt2img_event("nested"))}
    request_id = f"spell-{uuid.uuid4().hex}"
    r = requests.post(container.url + "/invoke", data=json.dumps(event).encode(), timeout=60,
                      headers={**fc_call("/invoke", request_id), "Content-Type": "application/octet-stream"})
    assert len(r.content) < 4096
    if r.status_code != 400:
        assert r.status_code == 200 and r.json()["statusCode"] in (301, 308, 404, 405), r.text
    routes = [line["route"] for line in container.request_lines() if line["request_id"] == request_id]
    assert routes.count("/invoke") == 1 and "/pre-stop" not in routes and "/initialize" not in routes
    assert "pre-stop:" not in container.log()


def test_a_nested_invoke_bomb_is_refused_at_the_first_level(container):
    event = txt2img_event("bomb")
    for _ in range(12):  # each level an /invoke of the one inside, spelled so that a string compare misses it
        event = {"rawPath": "/%69nvoke", "requestContext": {"http": {"method": "POST"}}, "body": json.dumps(event)}
    body = json.dumps(event).encode()
    r = requests.post(container.url + "/invoke", data=body, timeout=60,
                      headers={**fc_call("/invoke"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "hook" in r.json()["detail"]
    assert len(r.content) < 4096


def test_a_query_in_raw_path_is_a_query(container):
    event = {"rawPath": "/sdapi/v1/progress?skip_current_image=true", "queryParameters": {"extra": "1"},
             "requestContext": {"http": {"method": "GET"}}, "headers": BASIC}
    r = requests.post(container.url + "/invoke", data=json.dumps(event).encode(), timeout=60,
                      headers={**fc_call("/invoke"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["statusCode"] == 200 and "progress" in json.loads(result["body"])


def test_outside_fc_the_hooks_need_credentials(tmp_path):
    box = Container(tmp_path, {"FC_INSTANCE_ID": "", "SDFC_DISPATCH": "local", "SDFC_REQUIRE_CUDA": "0",
                               "SDFC_DATABASE_URL": f"sqlite:///{tmp_path / 'rds.db'}"})
    try:
        box.first_answer(limit=10)
        # Outside FC anyone can send FC's headers: they open nothing.
        r = requests.get(box.url + "/pre-stop", headers=fc_call("/pre-stop"), timeout=30)
        assert r.status_code == 401
        assert "pre-stop:" not in box.log()
        r = requests.get(box.url + "/pre-stop", auth=(USER, PASSWORD), timeout=30)
        assert r.status_code == 200 and r.json()["drained"] is True
    finally:
        assert box.stop() == 0, box.log()


def test_a_500_names_the_request_id_and_nothing_internal(tmp_path):
    models = tmp_path / "secret-models-path"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "sdfc.json").write_text("{ not json")
    server = start_server(tmp_path, env={"SDFC_MODELS_DIR": str(models)})
    try:
        r = requests.post(server.url + "/sdapi/v1/txt2img", json=SMALL, auth=(USER, PASSWORD), timeout=60)
        assert r.status_code == 500, r.text
        body = r.json()
        assert set(body) == {"error", "detail", "body", "errors"}
        request_id = r.headers["X-Request-Id"]
        assert body["detail"] == f"internal error, request id {request_id}"
        assert "secret-models-path" not in r.text and "Traceback" not in r.text
        time.sleep(0.2)
        log = server.log()
        assert f"in request {request_id}\nTraceback" in log  # the trace is in the log, under the request id
    finally:
        server.stop()
