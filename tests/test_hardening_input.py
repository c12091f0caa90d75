"""Hostile one-field input, against the real server: never a 5xx, always A1111's error shapes, strict JSON.

Issue 15 §4/§5. Every field of every request model, and every option, gets each HOSTILE value in an
otherwise small and valid request. A 4xx must come in A1111's shape ({error, detail, body, errors}) or,
for validation errors, FastAPI's ({"detail": [{loc, msg, type}, ...]}); every response body must be
strict JSON (no NaN/Infinity, no lone surrogate); and the server must still generate afterwards.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from sdfc.api import payloads
from sdfc.api.options import DEFAULTS

from .live_server import PASSWORD, USER, start_server

NESTED = "[" * 10000 + "]" * 10000
# Raw JSON texts: Python's json module (and so A1111) reads NaN, Infinity and 1e999 (as inf).
HOSTILE = ["NaN", "Infinity", "-Infinity", "1e308", "1e999", "-1", str(2 ** 63), str(2 ** 64), '""', '"\\ud800"',
           '"nan"', '"1e999"', "[]", "{}", "null", "true", NESTED]
SIZE = {"width": 16, "height": 16, "steps": 1}  # the tiny model's smallest size: each generation is cheap


def _png_b64(size=16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 90, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png_b64()
ROUTES = {  # route -> (model, a valid base body)
    "/sdapi/v1/txt2img": (payloads.TXT2IMG, dict(SIZE)),
    "/sdapi/v1/img2img": (payloads.IMG2IMG, dict(SIZE, init_images=[IMAGE])),
    "/sdapi/v1/extra-single-image": (payloads.EXTRAS_SINGLE, {"image": IMAGE, "upscaling_resize": 1}),
    "/sdapi/v1/extra-batch-images": (payloads.EXTRAS_BATCH,
                                     {"imageList": [{"data": IMAGE, "name": "a"}], "upscaling_resize": 1}),
    "/sdapi/v1/png-info": (payloads.PNG_INFO, {"image": IMAGE}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("hardening-input"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session():
    s = requests.Session()
    s.auth = (USER, PASSWORD)
    return s


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"response holds {name}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def with_raw(base: dict, field: str, raw: str) -> bytes:
    """`base` with `field` set to the raw JSON text `raw` (NaN and friends cannot go through json.dumps)."""
    body = json.dumps({**base, field: "__HOSTILE__"})
    return body.replace('"__HOSTILE__"', raw).encode("utf-8")


def post_raw(session, server, route: str, data: bytes):
    return session.post(server.url + route, data=data, headers={"Content-Type": "application/json"}, timeout=120)


def shape_problem(r) -> str | None:
    """Why this response breaks the contract, or None."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:200]}"
    try:
        body = strict_json(r.text)
    except (ValueError, AssertionError) as exc:
        return f"{r.status_code} with a body that is not strict JSON ({exc}): {r.text[:120]!r}"
    if r.status_code < 400:
        return None
    if r.status_code == 422 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        for entry in body["detail"]:
            if not (isinstance(entry, dict) and isinstance(entry.get("loc"), list) and entry["loc"][:1] == ["body"]
                    and isinstance(entry.get("msg"), str) and isinstance(entry.get("type"), str)):
                return f"422 entry not in FastAPI's shape: {entry}"
        return None
    if not (isinstance(body, dict) and set(body) == {"error", "detail", "body", "errors"}):
        return f"{r.status_code} not in A1111's error shape: {r.text[:200]}"
    return None


def assert_still_generates(session, server):
    r = session.post(server.url + "/sdapi/v1/txt2img", json=SIZE, timeout=120)
    assert r.status_code == 200, r.text[:300]
    strict_json(r.text)
    r = session.get(server.url + "/sdapi/v1/options", timeout=30)
    assert r.status_code == 200
    strict_json(r.text)


@pytest.mark.parametrize("route", ROUTES)
def test_every_field_with_every_hostile_value(server, session, route):
    model, base = ROUTES[route]
    problems = []
    for f in model.fields:
        for raw in HOSTILE:
            r = post_raw(session, server, route, with_raw(base, f.name, raw))
            problem = shape_problem(r)
            if problem:
                problems.append(f"{f.name}={raw[:20]}: {problem}")
    assert not problems, "\n".join(problems)
    assert_still_generates(session, server)


def test_every_option_with_every_hostile_value_and_nothing_poisons_the_process(server, session):
    problems = []
    for key, default in DEFAULTS.items():
        if key in ("sd_model_checkpoint", "sd_checkpoint_hash"):
            continue  # model switching has its own test (test_api_http)
        for raw in HOSTILE:
            r = post_raw(session, server, "/sdapi/v1/options", json.dumps({key: "__H__"}).replace('"__H__"', raw)
                         .encode())
            problem = shape_problem(r)
            if problem:
                problems.append(f"{key}={raw[:20]}: {problem}")
            elif r.status_code == 200:
                # Accepted: then it must be usable by the next job and readable back.
                g = session.post(server.url + "/sdapi/v1/txt2img", json=SIZE, timeout=120)
                if g.status_code != 200 or shape_problem(g):
                    problems.append(f"{key}={raw[:20]} accepted, then txt2img gave {g.status_code}: {g.text[:150]}")
                o = session.get(server.url + "/sdapi/v1/options", timeout=30)
                if shape_problem(o) or o.status_code != 200:
                    problems.append(f"{key}={raw[:20]} accepted, then GET /options broke: {o.text[:150]}")
        session.post(server.url + "/sdapi/v1/options", json={key: default}, timeout=30)
    assert not problems, "\n".join(problems)
    assert_still_generates(session, server)


def test_override_settings_are_checked_like_options(server, session):
    for raw in ("NaN", "1e999", "0", "13", '"2"', "2.5"):
        body = with_raw(dict(SIZE), "override_settings", '{"CLIP_stop_at_last_layers": %s}' % raw)
        r = post_raw(session, server, "/sdapi/v1/txt2img", body)
        assert 400 <= r.status_code < 500 and not shape_problem(r), (raw, r.status_code, r.text[:200])


def test_nan_option_is_refused_and_generation_keeps_working(server, session):
    r = post_raw(session, server, "/sdapi/v1/options", b'{"CLIP_stop_at_last_layers": NaN}')
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.jsondecode"
    r = session.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "nan"}, timeout=30)
    assert r.status_code == 400 and "CLIP_stop_at_last_layers" in r.json()["detail"]
    r = session.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1.5}, timeout=30)
    assert r.status_code == 400 and "whole number" in r.json()["detail"]
    r = session.post(server.url + "/sdapi/v1/options", json={"jpeg_quality": 101}, timeout=30)
    assert r.status_code == 400 and "between 1 and 100" in r.json()["detail"]
    # A rejected POST stores none of its values, not even the valid ones.
    r = session.post(server.url + "/sdapi/v1/options", json={"jpeg_quality": 50, "s_noise": -1}, timeout=30)
    assert r.status_code == 400
    assert session.get(server.url + "/sdapi/v1/options", timeout=30).json()["jpeg_quality"] == 80
    assert_still_generates(session, server)


@pytest.mark.parametrize("field,raw,kind", [
    ("cfg_scale", "NaN", "value_error.jsondecode"),
    ("cfg_scale", "1e308", "value_error.number.not_le"),
    ("cfg_scale", '"nan"', "type_error.float"),
    ("cfg_scale", '"1e999"', "type_error.float"),  # floats take numbers only (schema.py)
    ("subseed_strength", "Infinity", "value_error.jsondecode"),
    ("eta", "1e999", "value_error.jsondecode"),
    ("s_churn", "-Infinity", "value_error.jsondecode"),
    ("seed", str(2 ** 64), "value_error.number.not_le"),
    ("steps", str(2 ** 63), "value_error.number.not_le"),
    ("batch_size", "0", "value_error.number.not_ge"),
    ("prompt", '"\\ud800"', "value_error.str.surrogate"),
])
def test_bad_numbers_and_strings_are_422_naming_the_field(server, session, field, raw, kind):
    r = post_raw(session, server, "/sdapi/v1/txt2img", with_raw(dict(SIZE), field, raw))
    assert r.status_code == 422, r.text[:200]
    entry = r.json()["detail"][0]
    assert entry["type"] == kind
    assert entry["loc"] in (["body"], ["body", field])


def test_deeply_nested_json_is_422(server, session):
    for data in (NESTED.encode(), ('{"prompt": %s}' % NESTED).encode(), ('{"a":' * 5000 + "1" + "}" * 5000).encode()):
        r = post_raw(session, server, "/sdapi/v1/txt2img", data)
        assert r.status_code == 422 and "nested" in r.json()["detail"][0]["msg"]


def test_raw_surrogate_bytes_and_escaped_pairs(server, session):
    r = post_raw(session, server, "/sdapi/v1/txt2img", b'{"prompt": "\xed\xa0\x80", "steps": 1}')
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    # A valid pair is a real character (an emoji) and generates.
    r = post_raw(session, server, "/sdapi/v1/txt2img",
                 b'{"prompt": "\\ud83d\\ude00 cat", "width": 16, "height": 16, "steps": 1}')
    assert r.status_code == 200, r.text[:200]


@pytest.mark.parametrize("width,height,fragment", [
    (20, 16, "multiple of 8"),
    (24, 16, "multiple of 16"),  # the tiny UNet halves its latent once: ONNX fails on odd latents
    (16, 8, "multiple of 16"),
])
def test_sizes_the_model_cannot_take_are_400_before_generating(server, session, width, height, fragment):
    r = session.post(server.url + "/sdapi/v1/txt2img", json={"width": width, "height": height, "steps": 1},
                     timeout=60)
    assert r.status_code == 400 and fragment in r.json()["detail"], r.text[:200]


def test_clip_skip_the_model_lacks_is_400(server, session):
    r = session.post(server.url + "/sdapi/v1/txt2img",
                     json=dict(SIZE, override_settings={"CLIP_stop_at_last_layers": 5}), timeout=60)
    assert r.status_code == 400 and "CLIP skip 5" in r.json()["detail"]


def test_extras_null_and_literal_fields(server, session):
    r = session.post(server.url + "/sdapi/v1/extra-batch-images", json={"imageList": None}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "type_error.none.not_allowed"
    r = session.post(server.url + "/sdapi/v1/extra-batch-images", json={"imageList": [1]}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "imageList", 0]
    r = session.post(server.url + "/sdapi/v1/extra-single-image", json={"image": IMAGE, "resize_mode": 2},
                     timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.const"
    r = session.post(server.url + "/sdapi/v1/extra-single-image", json={"image": IMAGE, "upscaling_resize": 9},
                     timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.number.not_le"


def test_infotext_values_are_checked_like_fields(server, session):
    for text in ("a\nSteps: 1e400, Seed: 1, Size: 16x16", "a\nSteps: 1, Seed: 1e30, Size: 16x16",
                 "a\nSteps: 1, Seed: 1, CFG scale: nan, Size: 16x16", "a\nSteps: 1, Seed: 1, Size: 16x16, Clip skip: inf"):
        r = session.post(server.url + "/sdapi/v1/txt2img", json={"infotext": text}, timeout=60)
        assert 400 <= r.status_code < 500 and not shape_problem(r), (text, r.status_code, r.text[:200])


def test_jpeg_infotext_too_long_for_exif_is_400_before_generating(server, session):
    prompt = "a " * 20000  # 40 000 characters: 80 000 bytes of UTF-16, over the 64 KiB APP1 segment
    r = session.post(server.url + "/sdapi/v1/txt2img",
                     json=dict(SIZE, prompt=prompt, override_settings={"samples_format": "jpg"}), timeout=120)
    assert r.status_code == 400 and "EXIF" in r.json()["detail"], r.text[:200]
    # WebP's EXIF chunk has no such limit; PNG's text chunk neither.
    for fmt in ("webp", "png"):
        r = session.post(server.url + "/sdapi/v1/txt2img",
                         json=dict(SIZE, prompt=prompt, override_settings={"samples_format": fmt}), timeout=120)
        assert r.status_code == 200, (fmt, r.text[:200])


def test_openapi_declares_the_bounds(server):
    spec = requests.get(server.url + "/openapi.json", timeout=30).json()
    txt2img = spec["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"]
    assert txt2img["cfg_scale"]["maximum"] == payloads.CFG_SCALE_MAX
    assert txt2img["steps"]["minimum"] == 1 and txt2img["seed"]["maximum"] == payloads.SEED_MAX
    extras = spec["components"]["schemas"]["ExtrasSingleImageRequest"]["properties"]
    assert extras["resize_mode"]["enum"] == [0, 1] and extras["upscaling_resize"]["maximum"] == 8


def test_clip_skip_the_model_lacks_cannot_be_stored(server, session):
    # Within A1111's range 1..12, but the tiny export has only skips 1 and 2: storing 10 would fail every job.
    r = session.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 10}, timeout=30)
    assert r.status_code == 400 and "available: 1, 2" in r.json()["detail"]
    assert session.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2},
                        timeout=30).status_code == 200
    session.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, timeout=30)
    assert_still_generates(session, server)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_img2img_that_would_run_no_timestep_is_400(server, session, sampler):
    body = dict(SIZE, init_images=[IMAGE], sampler_name=sampler, denoising_strength=0.5)  # int(0.5 × 1) = 0
    r = session.post(server.url + "/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 400 and "0 steps" in r.json()["detail"], r.text[:200]
    r = session.post(server.url + "/sdapi/v1/img2img", json=dict(body, steps=2), timeout=60)
    assert r.status_code == 200, r.text[:200]
    # k-diffusion samplers run one step anyway, as A1111's.
    r = session.post(server.url + "/sdapi/v1/img2img", json=dict(body, sampler_name="Euler"), timeout=60)
    assert r.status_code == 200, r.text[:200]


def test_responses_and_info_are_strict_json_even_if_a_non_finite_value_slips_through():
    from flask import Flask

    from sdfc.api.errors import json_response
    from sdfc.api.infotext import info_json

    with Flask(__name__).app_context():
        body = json_response({"a": float("nan"), "b": [float("inf")], "c": "\ud800", "d": 1.5}).get_data()
    assert strict_json(body.decode("utf-8")) == {"a": None, "b": [None], "c": "\ud800", "d": 1.5}
    info = info_json(prompt="p", negative_prompt="", seed=1, subseed=1, subseed_strength=float("nan"), width=8,
                     height=8, sampler_name="Euler", cfg_scale=float("inf"), steps=1, infotexts=[], all_prompts=[],
                     all_negative_prompts=[], all_seeds=[], all_subseeds=[], batch_size=1, sd_model_name="m",
                     sd_model_hash="h", seed_resize_from_w=-1, seed_resize_from_h=-1, denoising_strength=None,
                     extra_generation_params={}, styles=[], job_timestamp="0", clip_skip=1)
    assert strict_json(info)["cfg_scale"] is None
