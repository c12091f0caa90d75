"""Auth, bad input, limits, startup refusal and the route table, against the real server process."""
from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
import requests
from PIL import Image

from .live_server import AUTH, PASSWORD, SECOND_PASSWORD, SECOND_USER, USER, free_port, start_server

SMALL = {"width": 64, "height": 64, "steps": 2}
LIMIT_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("edges"),
                       env={"SDFC_MAX_PIXELS": str(256 * 256), "SDFC_MAX_STEPS": "60", "SDFC_MAX_IMAGES": "4",
                            "SDFC_MAX_BODY_BYTES": str(LIMIT_BODY)})
    yield srv
    srv.stop()


def post(server, path, body=None, auth=(USER, PASSWORD), **kw):
    return requests.post(server.url + path, json=body, auth=auth, timeout=60, **kw)


def a1111_shape(response) -> dict:
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}, body
    return body


def basic(raw: bytes) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# --- auth -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers,detail", [
    ({}, "Not authenticated"),
    (basic(f"{USER}:wrong-Password1".encode()), "Incorrect username or password"),
    (basic(b"mallory:Wonder-land42"), "Incorrect username or password"),
    ({"Authorization": "Basic !!!not-base64!!!"}, "Not authenticated"),
    (basic(b"no-colon-here"), "Not authenticated"),
    ({"Authorization": "Bearer abc.def"}, "Not authenticated"),
    ({"Authorization": "Basic"}, "Not authenticated"),
])
@pytest.mark.parametrize("route", ["/sdapi/v1/options", "/sdapi/v1/loras", "/sdapi/v1/progress"])
def test_bad_credentials_get_401_with_a_challenge(server, headers, detail, route):
    r = requests.get(server.url + route, headers=headers, timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert a1111_shape(r) == {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


def test_post_routes_are_protected_too(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=SMALL, timeout=10)
    assert r.status_code == 401


@pytest.mark.parametrize("user,password", [(USER, PASSWORD), (SECOND_USER, SECOND_PASSWORD)])
def test_each_configured_user_is_let_in(server, user, password):
    r = requests.get(server.url + "/sdapi/v1/options", auth=(user, password), timeout=10)
    assert r.status_code == 200 and r.json()["samples_format"] == "png"


def test_docs_and_openapi_are_open_and_describe_the_api(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    txt2img = spec["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"]
    assert txt2img["steps"]["default"] == 50 and txt2img["sampler_index"]["default"] == "Euler"
    assert "/sdapi/v1/png-info" in spec["paths"] and spec["components"]["securitySchemes"]["HTTPBasic"]
    page = requests.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in page.text
    asset = requests.get(server.url + "/static/swagger/swagger-ui-bundle.js", timeout=10)
    assert asset.status_code == 200 and len(asset.content) > 100_000


def test_cmd_flags_never_show_credentials(server):
    r = requests.get(server.url + "/sdapi/v1/cmd-flags", auth=(USER, PASSWORD), timeout=10)
    assert PASSWORD not in r.text and SECOND_PASSWORD not in r.text and r.json()["api_auth"] is None


def test_unknown_path_and_wrong_method(server):
    r = requests.get(server.url + "/sdapi/v1/does-not-exist", timeout=10)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = requests.get(server.url + "/sdapi/v1/txt2img", auth=(USER, PASSWORD), timeout=10)
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"} and "POST" in r.headers["Allow"]


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,loc,kind", [
    ({"steps": "many"}, ["body", "steps"], "type_error.integer"),
    ({"cfg_scale": "high"}, ["body", "cfg_scale"], "type_error.float"),
    ({"prompt": ["a", "list"]}, ["body", "prompt"], "type_error.str"),
    ({"override_settings": "x"}, ["body", "override_settings"], "type_error.dict"),
    ({"send_images": "maybe"}, ["body", "send_images"], "type_error.bool"),
    ([1, 2], ["body"], "type_error.dict"),
])
def test_type_errors_are_422_with_fastapi_details(server, body, loc, kind):
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert {"loc": loc, "type": kind} == {"loc": detail[0]["loc"], "type": detail[0]["type"]}


def test_malformed_json_and_missing_body_are_422(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=b'{"prompt": ', auth=(USER, PASSWORD),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.jsondecode"
    r = requests.post(server.url + "/sdapi/v1/txt2img", auth=(USER, PASSWORD), timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.missing"


def test_coercions_clients_rely_on(server):
    r = post(server, "/sdapi/v1/txt2img", {"steps": 2.0, "width": 64.9, "height": 64, "cfg_scale": 7,
                                            "seed": "11", "subseed": " -3 ", "unknown_field": {"ignored": True}})
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert (info["steps"], info["width"], info["height"], info["cfg_scale"], info["seed"], info["subseed"]) == \
        (2, 64, 64, 7.0, 11, -3)
    # A numeric string only where the document can state which strings are valid (schema.py): not for
    # fields the server limits further (steps, sizes) nor for floats.
    for field, raw, kind in (("steps", "2", "type_error.integer"), ("height", "64", "type_error.integer"),
                             ("cfg_scale", "7", "type_error.float")):
        r = post(server, "/sdapi/v1/txt2img", {field: raw, "steps": 2, "width": 64, "height": 64, field: raw})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == kind, (field, r.text[:200])


def _bomb_png(width=50000, height=50000) -> str:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("image,fragment", [
    ("%%%not base64%%%", "base64"),
    (base64.b64encode(b"plain text, not an image").decode(), "image"),
    ("", "Init image not found"),
    (_bomb_png(), "pixels"),
    ("https://example.invalid/cat.png", "URL"),
])
def test_broken_images_are_4xx_and_the_server_keeps_serving(server, image, fragment):
    r = post(server, "/sdapi/v1/img2img", {"init_images": [image] if image else [], **SMALL})
    assert 400 <= r.status_code < 500
    assert fragment.lower() in a1111_shape(r)["detail"].lower()
    r = post(server, "/sdapi/v1/png-info", {"image": image or " "})
    assert 400 <= r.status_code < 500
    assert post(server, "/sdapi/v1/txt2img", SMALL).status_code == 200


def test_img2img_without_init_images_is_404_as_a1111(server):
    r = post(server, "/sdapi/v1/img2img", SMALL)
    assert r.status_code == 404 and a1111_shape(r)["detail"] == "Init image not found"


def test_png_info_of_an_image_without_metadata(server):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    r = post(server, "/sdapi/v1/png-info", {"image": base64.b64encode(buffer.getvalue()).decode()})
    assert r.status_code == 200 and r.json() == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("body,limit", [
    ({"width": 512, "height": 512, "steps": 2}, "SDFC_MAX_PIXELS"),
    ({"width": 64, "height": 64, "steps": 500}, "SDFC_MAX_STEPS"),
    ({"width": 64, "height": 64, "steps": 2, "batch_size": 3, "n_iter": 2}, "SDFC_MAX_IMAGES"),
    ({"width": 65, "height": 64, "steps": 2}, "multiple of 8"),
    ({"width": 64, "height": 64, "steps": 2, "sampler_name": "Euler z"}, "valid samplers"),
    ({"width": 64, "height": 64, "steps": 2, "scheduler": "Wobbly"}, "valid schedulers"),
    ({"width": 64, "height": 64, "steps": 2, "enable_hr": True, "hr_scale": 8}, "hires fix second pass"),
    ({"width": 64, "height": 64, "steps": 2, "script_name": "img2img alternative test"},
     "Script 'img2img alternative test' not found"),  # an A1111 script sdfc does not have
])
def test_requests_over_a_limit_or_unsupported_are_4xx_naming_it(server, body, limit):
    r = post(server, "/sdapi/v1/txt2img", body)
    assert 400 <= r.status_code < 500 and limit in a1111_shape(r)["detail"]


def test_oversized_body_is_413(server):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": "x" * (LIMIT_BODY + 10)})
    assert r.status_code == 413 and "SDFC_MAX_BODY_BYTES" in a1111_shape(r)["detail"]
    assert post(server, "/sdapi/v1/txt2img", SMALL).status_code == 200


def test_options_errors_are_4xx(server):
    r = post(server, "/sdapi/v1/options", {"no_such_option": 1})
    assert r.status_code == 400 and "no_such_option" in a1111_shape(r)["detail"]
    r = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "missing-model"})
    assert r.status_code == 400 and "missing-model" in a1111_shape(r)["detail"]
    r = post(server, "/sdapi/v1/options", {"samples_format": "tiff"})
    assert r.status_code == 400


# --- route table ----------------------------------------------------------------------------------

LIST_ROUTES = {
    "/sdapi/v1/sd-vae": list, "/sdapi/v1/hypernetworks": list, "/sdapi/v1/face-restorers": list,
    "/sdapi/v1/realesrgan-models": list, "/sdapi/v1/prompt-styles": list, "/sdapi/v1/loras": list,
    "/sdapi/v1/script-info": list, "/sdapi/v1/extensions": list, "/sdapi/v1/latent-upscale-modes": list,
    "/sdapi/v1/upscalers": list, "/sdapi/v1/embeddings": dict, "/sdapi/v1/scripts": dict,
    "/sdapi/v1/memory": dict, "/sdapi/v1/cmd-flags": dict,
}


@pytest.mark.parametrize("route,kind", LIST_ROUTES.items())
def test_list_routes_answer_with_a1111_shapes(server, route, kind):
    r = requests.get(server.url + route, auth=(USER, PASSWORD), timeout=10)
    assert r.status_code == 200 and isinstance(r.json(), kind)


def test_specific_shapes(server):
    get = lambda route: requests.get(server.url + route, auth=(USER, PASSWORD), timeout=10).json()  # noqa: E731
    assert get("/sdapi/v1/scripts") == {  # the built-in scripts sdfc runs (tests/test_scripts.py)
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
        "img2img": ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                    "prompts from file or textbox", "sd upscale", "x/y/z plot"]}
    assert get("/sdapi/v1/embeddings") == {"loaded": {}, "skipped": {}}
    assert {u["name"] for u in get("/sdapi/v1/upscalers")} == {"None", "Lanczos", "Nearest"}
    memory = get("/sdapi/v1/memory")
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and memory["cuda"] == {"error": "unavailable"}


@pytest.mark.parametrize("route,expected", [
    ("/sdapi/v1/refresh-checkpoints", None), ("/sdapi/v1/refresh-vae", None),
    ("/sdapi/v1/refresh-embeddings", None), ("/sdapi/v1/refresh-loras", None), ("/sdapi/v1/skip", None),
    ("/sdapi/v1/interrupt", {}), ("/sdapi/v1/unload-checkpoint", {}), ("/sdapi/v1/reload-checkpoint", {}),
])
def test_control_routes(server, route, expected):
    r = post(server, route)
    assert r.status_code == 200 and r.json() == expected


@pytest.mark.parametrize("route", ["/sdapi/v1/interrogate", "/sdapi/v1/train/hypernetwork",
                                   "/sdapi/v1/create/hypernetwork", "/sdapi/v1/server-stop"])
def test_unsupported_routes_say_so(server, route):
    r = post(server, route, {})
    assert r.status_code == 501 and "not" in a1111_shape(r)["detail"]


# --- startup refusal ------------------------------------------------------------------------------

@pytest.mark.parametrize("auth,message", [
    ("", "without SDFC_AUTH"),
    ("alice:short1A", "8 to 30"),
    ("alice:alllowercaseletters", "three of"),
    ("alice", "user:password"),
])
def test_refuses_to_start_when_exposed_without_strong_auth(tmp_path, auth, message):
    proc = subprocess.run([sys.executable, "-m", "sdfc.cli", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port())], env={"SDFC_AUTH": auth, "PATH": "/usr/bin:/bin",
                                                   "SDFC_DATA_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_starts_on_all_interfaces_with_strong_auth(tmp_path):
    srv = start_server(tmp_path, env={"SDFC_AUTH": AUTH}, host="0.0.0.0")
    try:
        assert requests.get(srv.url + "/sdapi/v1/options", auth=(USER, PASSWORD), timeout=10).status_code == 200
    finally:
        srv.stop()


def test_each_request_is_logged_as_one_json_line(server):
    r = requests.get(server.url + "/sdapi/v1/samplers", auth=(USER, PASSWORD), timeout=10,
                     headers={"x-fc-request-id": "req-abc-123"})
    # Outside FC an x-fc-request-id is the client's choice, not FC's: the server names the request itself.
    request_id = r.headers["X-Request-Id"]
    assert request_id and request_id != "req-abc-123" and "req-abc-123" not in server.log()
    lines = [line for line in server.log().splitlines() if request_id in line]
    assert len(lines) == 1
    entry = json.loads(lines[0][lines[0].index("{"):])
    assert entry["route"] == "/sdapi/v1/samplers" and entry["status"] == 200 and entry["duration_ms"] >= 0
