"""sdfc.fc in process: FC 3.0's HTTP event ⇄ WSGI, the lifecycle routes' edges, the web composition."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from sdfc.config import Settings
from sdfc.fc import events, gateway, lifecycle
from sdfc.fc.compose import create_sdapi_app, create_web_app

from .conftest import MODELS_DIR

AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:Wonder-land42").decode()}
# What FC's environment says in every instance: x-fc-* headers are FC's own there (sdfc/fc/gateway.py).
FC_ENV = {"FC_INSTANCE_ID": "c-test-1", "FC_FUNCTION_NAME": "sdfc-api"}


def fc_call(control_path: str, **headers) -> dict:
    """The headers of FC's own call of a hook (x-fc-control-path names it)."""
    return {"x-fc-control-path": control_path, "x-fc-request-id": f"fc{control_path.replace('/', '-')}", **headers}


def settings(tmp_path, **extra) -> Settings:
    return Settings.from_env({"SDFC_AUTH": "alice:Wonder-land42", "SDFC_DATA_DIR": str(tmp_path),
                              "SDFC_MODELS_DIR": str(MODELS_DIR), "SDFC_DISPATCH": "local", **FC_ENV, **extra})


@pytest.fixture()
def sdapi(tmp_path):
    app = create_sdapi_app(settings(tmp_path))
    yield app
    app.extensions["sdfc.records"].close(5)


# --- events --------------------------------------------------------------------------------------------------

def test_an_fc_http_event_becomes_the_same_request():
    event = {"version": "v1", "rawPath": "/a/b", "isBase64Encoded": True,
             "body": base64.b64encode(b"\x89PNG bytes").decode(),
             "headers": {"Content-Type": "image/png", "X-Fc-Request-Id": "forged", "X-Custom": "1"},
             "queryParameters": {"q": "cat", "tag": ["x", "y"]},
             "requestContext": {"domainName": "sd.example.com", "http": {"method": "put", "sourceIp": "203.0.113.9"}}}
    call = events.call_from_event(json.dumps(event).encode())
    assert (call.method, call.path, call.body, call.source_ip) == ("PUT", "/a/b", b"\x89PNG bytes", "203.0.113.9")
    assert call.query == "q=cat&tag=x&tag=y"
    # x-fc-* only ever from FC itself; the host from the request context when the headers lack it
    assert call.headers == {"content-type": "image/png", "x-custom": "1", "host": "sd.example.com"}


def test_hand_written_events_may_inline_json():
    call = events.call_from_event({"path": "/sdapi/v1/txt2img", "body": {"prompt": "x"}})
    assert call.method == "POST" and json.loads(call.body) == {"prompt": "x"}
    assert call.headers["content-type"] == "application/json"


@pytest.mark.parametrize("event,message", [
    (b"not json", "not JSON"), (b"[1, 2]", "JSON object"), ({"body": "x"}, "rawPath"),
    ({"rawPath": "relative"}, "rawPath"), ({"rawPath": "/", "isBase64Encoded": True, "body": "%%%"}, "base64"),
    ({"rawPath": "/", "headers": ["a"]}, "headers"), ({"rawPath": "/", "body": 3}, "body must be"),
])
def test_bad_events_are_refused_with_the_reason(event, message):
    with pytest.raises(events.EventError, match=message):
        events.call_from_event(event)


# --- lifecycle -----------------------------------------------------------------------------------------------

def test_lifecycle_routes_answer_fc_calls_without_client_credentials_and_nothing_else(sdapi):
    client = sdapi.test_client()
    assert client.get("/sdapi/v1/options").status_code == 401
    # A client's request through the HTTP trigger: FC's gateway says /http-invoke, whatever the path.
    assert client.get("/pre-stop", headers=fc_call("/http-invoke")).status_code == 404
    assert client.get("/pre-stop", headers=AUTH).status_code == 404  # client credentials are no FC call
    assert client.post("/initialize", headers=fc_call("/pre-stop")).status_code == 404  # another hook's call
    assert not sdapi.extensions["sdfc"].draining
    r = client.post("/initialize", headers=fc_call("/initialize", **{"x-fc-request-id": "init-9"}))
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "init-9"
    assert client.get("/pre-stop", headers=fc_call("/pre-stop")).status_code == 200


def test_initialize_warms_each_configured_size_at_both_unet_batches(tmp_path):
    config = lifecycle.LifecycleConfig(warmup_sizes=lifecycle.parse_sizes("64x64, 96x64"))
    app = create_sdapi_app(settings(tmp_path), config)
    model = app.extensions["sdfc"].engine.load()
    unet, shapes = model.unet, []
    model.unet = lambda sample, *args, **kw: shapes.append(sample.shape) or unet(sample, *args, **kw)
    try:
        r = app.test_client().post("/initialize", headers=fc_call("/initialize"))
        assert r.status_code == 200 and list(r.json["warmup_sizes"]) == ["64x64", "96x64"]
        # (batch, channels, latent h, latent w): each size with the CFG batch (2) and the CFG-1 batch (1).
        assert sorted(set(shapes)) == [(1, 4, 8, 8), (1, 4, 8, 12), (2, 4, 8, 8), (2, 4, 8, 12)]
    finally:
        app.extensions["sdfc.records"].close(5)
    assert lifecycle.parse_sizes("") == lifecycle.parse_sizes("0") == ()
    for bad in ("512", "512x500", "axb"):
        with pytest.raises(ValueError, match="SDFC_WARMUP_SIZES"):
            lifecycle.parse_sizes(bad)


def test_outside_fc_lifecycle_routes_need_credentials(tmp_path):
    app = create_sdapi_app(Settings.from_env({"SDFC_AUTH": "alice:Wonder-land42", "SDFC_DATA_DIR": str(tmp_path),
                                              "SDFC_MODELS_DIR": str(MODELS_DIR), "SDFC_DISPATCH": "local"}))
    client = app.test_client()
    assert client.get("/pre-stop", headers=fc_call("/pre-stop")).status_code == 401  # anyone can send that
    assert not app.extensions["sdfc"].draining
    assert client.get("/pre-stop", headers=AUTH).status_code == 200
    app.extensions["sdfc.records"].close(5)


def routes(app) -> set[str]:
    return {rule.rule for rule in app.url_map.iter_rules()}


def test_sd_api_mounts_only_the_api_tasks_docs_and_hooks(sdapi):
    client = sdapi.test_client()
    for path in ("/gallery/api/images", "/", "/images", "/static/web/web.css"):
        assert client.get(path, headers=AUTH).status_code == 404, path
    assert not any(r.startswith(("/gallery", "/static/web")) for r in routes(sdapi))
    assert client.get("/docs").status_code == 200 and client.get("/sdapi/v1/samplers", headers=AUTH).status_code == 200
    assert {"/sdapi/v2/tasks/txt2img", "/internal/progress", "/pre-stop"} <= routes(sdapi)
    documented = set(client.get("/openapi.json").json["paths"])
    assert "/sdapi/v1/txt2img" in documented and not any(p.startswith("/gallery") for p in documented)


def test_initialize_fails_when_cuda_is_required_but_absent(tmp_path):
    app = create_sdapi_app(settings(tmp_path, SDFC_DEVICE="cuda"), lifecycle.LifecycleConfig(require_cuda=True))
    r = app.test_client().post("/initialize", headers=fc_call("/initialize"))
    assert r.status_code == 500 and "SDFC_REQUIRE_CUDA" in r.json["detail"]
    # Every component is named (onnxruntime falls back per session), and the driver it found (none here).
    assert "text_encoder, unet, vae_decoder, vae_encoder on the CPU" in r.json["detail"]
    assert "driver None" in r.json["detail"] and "--build-arg CUDA=12" in r.json["detail"]
    app.extensions["sdfc.records"].close(5)


def test_invoke_refuses_lifecycle_paths_and_flags_failures_for_fc(sdapi):
    client = sdapi.test_client()
    invoke = fc_call("/invoke")
    # A client error fails the same way on every try: FC must not retry it (each retry wakes a GPU).
    r = client.post("/invoke", data=json.dumps({"rawPath": "/invoke", "body": "{}"}), headers=invoke)
    assert r.status_code == 400 and "x-fc-status" not in r.headers
    r = client.post("/invoke", data=json.dumps({"rawPath": "/sdapi/v1/txt2img", "body": {"steps": 1}}),
                    headers=invoke)
    assert r.status_code == 200 and r.json["statusCode"] == 401  # the event's request has no credentials
    assert "x-fc-status" not in r.headers
    r = client.post("/invoke", data=json.dumps({"rawPath": "/sdapi/v1/txt2img", "headers": AUTH,
                                                "body": {"steps": 0}}), headers=invoke)
    assert r.json["statusCode"] == 422 and "x-fc-status" not in r.headers
    # A server-side failure may pass on another instance: FC marks it failed (async retries, then onFailure).
    assert [s for s in (400, 401, 404, 422, 429, 500, 503) if gateway.worth_retrying(s)] == [429, 500, 503]
    r = client.post("/invoke", data=json.dumps({"rawPath": "/sdapi/v1/samplers", "headers": AUTH}),
                    headers=invoke)
    assert r.json["statusCode"] == 200 and "x-fc-status" not in r.headers
    assert any(s["name"] == "Euler" for s in json.loads(r.json["body"]))


def test_pre_stop_waits_for_in_flight_requests_then_drains_the_records(sdapi):
    api, hooks = sdapi.extensions["sdfc"], sdapi.extensions[lifecycle.EXTENSION]
    drained = []
    hooks.drains.append(lambda left: drained.append(left) or True)
    tracker = api.track()
    tracker.__enter__()
    threading.Timer(0.3, tracker.__exit__, (None, None, None)).start()
    started = time.monotonic()
    r = sdapi.test_client().get("/pre-stop", headers=fc_call("/pre-stop"))
    assert time.monotonic() - started >= 0.25
    assert r.status_code == 200 and r.json == {"drained": True, "in_flight": 0} and api.draining
    assert drained and 0 < drained[0] <= hooks.config.drain_s


def test_pre_stop_reports_a_drain_that_ran_out_of_time(tmp_path):
    app = create_sdapi_app(settings(tmp_path), lifecycle.LifecycleConfig(drain_s=0.2))
    app.extensions["sdfc"].track().__enter__()  # a request that never ends
    r = app.test_client().get("/pre-stop", headers=fc_call("/pre-stop"))
    assert r.status_code == 503 and r.json == {"drained": False, "in_flight": 1}
    app.extensions["sdfc.records"].close(5)


# --- the web function ----------------------------------------------------------------------------------------

def test_the_web_function_never_generates_nor_dispatches(tmp_path):
    app = create_web_app(settings(tmp_path))
    client = app.test_client()
    for method, path in (("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v2/tasks/txt2img"),
                         ("DELETE", "/sdapi/v2/tasks/x"), ("GET", "/sdapi/v1/samplers")):
        assert client.open(path, method=method, json={"steps": 1}, headers=AUTH).status_code in (404, 405), path
    assert not any(r.startswith("/sdapi/v1") for r in routes(app)) and "/initialize" not in routes(app)
    assert client.get("/docs").status_code == 200 and client.get("/", headers=AUTH).status_code == 200
    assert client.get("/gallery/api/images", headers=AUTH).status_code == 200
    r = client.post("/internal/progress", json={"id_task": "nope"}, headers=AUTH)
    assert r.status_code == 200 and r.json["completed"] is False
    assert "sdfc.records" not in app.extensions  # no dispatcher: nothing here makes images
    assert app.extensions["sdfc.jobs"].worker is None and not app.extensions["sdfc"].engine_ready


def test_a_composition_builds_only_the_rooms_its_parts_need(tmp_path):
    from sdfc.app import create_app

    api_only = create_app(settings(tmp_path, SDFC_DATABASE_URL="mysql://nobody@203.0.113.1:1/x"),
                          parts={"sdapi", "docs"})
    assert "sdfc.records_store" not in api_only.extensions and "sdfc.jobs" not in api_only.extensions
    assert not any(r.startswith(("/sdapi/v2", "/internal", "/gallery")) for r in routes(api_only))
    api_only.extensions["sdfc.records"].close(5)
    pages = create_app(settings(tmp_path), parts={"web"})
    assert routes(pages) >= {"/", "/images"} and "sdfc.records_store" not in pages.extensions
    with pytest.raises(ValueError, match="unknown parts"):
        create_app(settings(tmp_path), parts={"sdapi", "admin"})


def test_binary_responses_travel_base64_in_the_event_response(tmp_path):
    app = create_web_app(settings(tmp_path))
    call = events.call_from_event({"rawPath": "/static/swagger/favicon-32x32.png"})
    result = events.run(app, call, {"x-fc-request-id": "web-1"})
    assert result["statusCode"] == 200 and result["isBase64Encoded"]
    assert base64.b64decode(result["body"]).startswith(b"\x89PNG")
    assert result["headers"]["X-Request-Id"] == "web-1"
    text = events.run(app, events.call_from_event({"rawPath": "/openapi.json"}))
    assert not text["isBase64Encoded"] and json.loads(text["body"])["openapi"].startswith("3.")
