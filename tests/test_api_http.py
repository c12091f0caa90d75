"""The A1111 API over a real socket: `sdfc serve` in its own process, driven by webuiapi and requests."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from sdfc.engine import Engine, GenerationRequest

from .conftest import two_model_folder
from .live_server import PASSWORD, SECOND_PASSWORD, SECOND_USER, USER, start_server

SMALL = dict(width=64, height=64)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two models, so that switching checkpoints is observable."""
    return two_model_folder(tmp_path_factory.mktemp("models"), "b")


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("server")
    styles = tmp / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nmoody,"{prompt}, dark, moody",bright\n')
    srv = start_server(tmp, env={"SDFC_MODELS_DIR": str(models_dir), "SDFC_STYLES_FILE": str(styles),
                                 "SDFC_MAX_PIXELS": str(512 * 512), "SDFC_MAX_BODY_BYTES": str(2 * 1024 * 1024),
                                 "SDFC_CORS_ORIGINS": "https://studio.example/"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=USER, password=PASSWORD,
                             sampler="Euler a", steps=6)


@pytest.fixture(scope="module")
def local_engine(models_dir):
    return Engine(models_dir)


def auth_session(user=USER, password=PASSWORD) -> requests.Session:
    s = requests.Session()
    s.auth = (user, password)
    return s


def test_webuiapi_txt2img_returns_the_engines_image(api, local_engine):
    result = api.txt2img(prompt="a lighthouse, at dusk", negative_prompt="fog", seed=42, cfg_scale=6.5, **SMALL)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 42 and result.info["all_seeds"] == [42]
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 6
    assert result.parameters["prompt"] == "a lighthouse, at dusk"
    text = result.info["infotexts"][0]
    assert text.startswith('a lighthouse, at dusk\nNegative prompt: fog\nSteps: 6, Sampler: Euler a, '
                           'Schedule type: Automatic, CFG scale: 6.5, Seed: 42, Size: 64x64, '
                           'Model hash: e8b3bb4a7a, Model: tiny-sd, Version: ')
    expected = local_engine.generate(GenerationRequest(prompt="a lighthouse, at dusk", negative_prompt="fog",
                                                       seed=42, cfg_scale=6.5, steps=6, sampler_name="Euler a",
                                                       **SMALL))
    assert np.array_equal(np.asarray(result.image), np.asarray(expected.images[0]))


def test_webuiapi_img2img(api):
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    # webuiapi sends image_cfg_scale=1.5 (A1111's default): accepted, as no model here reads it.
    result = api.img2img(images=[init], prompt="a watercolor", denoising_strength=0.5, seed=7,
                         **SMALL)
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images
    assert np.abs(np.asarray(result.image, float) - np.asarray(init, float)).mean() > 1


def test_webuiapi_png_info_reads_back_the_infotext(api):
    generated = api.txt2img(prompt='say "hi": now,\nplease', seed=5, **SMALL)
    info = api.png_info(generated.image)
    assert info.info == generated.info["infotexts"][0]
    assert info.parameters["Prompt"] == 'say "hi": now,\nplease'
    assert info.parameters["Seed"] == "5" and info.parameters["Size-1"] == "64"


def test_webuiapi_models_and_switching(api):
    titles = api.util_get_model_names()
    assert titles == ["tiny-sd [e8b3bb4a7a]", "tiny-sd-b [bbbbbbbbbb]"]
    api.util_set_model("tiny-sd-b [bbbbbbbbbb]")
    try:
        assert api.get_options()["sd_model_checkpoint"] == "tiny-sd-b [bbbbbbbbbb]"
        assert api.util_get_current_model() == "tiny-sd-b [bbbbbbbbbb]"
        result = api.txt2img(prompt="x", seed=1, **SMALL)
        assert result.info["sd_model_name"] == "tiny-sd-b" and "Model hash: bbbbbbbbbb" in result.info["infotexts"][0]
    finally:
        api.util_set_model("tiny-sd [e8b3bb4a7a]")
    assert api.txt2img(prompt="x", seed=1, **SMALL).info["sd_model_hash"] == "e8b3bb4a7a"


def test_webuiapi_samplers_and_schedulers(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert next(s for s in api.get_samplers() if s["name"] == "Euler a")["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    schedulers = api.get_schedulers()
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                             "need_inner_model": False}
    assert {"Karras", "Uniform", "Exponential"} <= {s["label"] for s in schedulers}


def test_webuiapi_options_round_trip_and_samples_format(api, server):
    options = api.get_options()
    assert options["samples_format"] == "png" and options["jpeg_quality"] == 80.0
    api.set_options({"samples_format": "jpg"})
    try:
        result = api.txt2img(prompt="jpeg please", seed=3, **SMALL)
        assert result.image.format == "JPEG"
        # webuiapi re-encodes images as PNG before png-info, so send the JPEG bytes as they came.
        raw = auth_session().post(server.url + "/sdapi/v1/txt2img",
                                  json={"prompt": "jpeg please", "seed": 3, "steps": 6, **SMALL}).json()
        info = auth_session().post(server.url + "/sdapi/v1/png-info", json={"image": raw["images"][0]}).json()
        assert info["info"] == json.loads(raw["info"])["infotexts"][0]
        assert info["info"].startswith("jpeg please\nSteps: 6, Sampler: Euler, ")
    finally:
        api.set_options({"samples_format": "png"})
    assert api.get_options()["samples_format"] == "png"


def test_webuiapi_extra_single_image(api):
    image = Image.fromarray(np.full((16, 24, 3), 200, dtype=np.uint8))
    result = api.extra_single_image(image, upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (48, 32)
    assert np.asarray(result.image)[5, 5].tolist() == [200, 200, 200]


def test_webuiapi_progress_idle(api):
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _wait_for_progress(api, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2:
            return p
        time.sleep(0.05)
    raise AssertionError("the job never reported progress")


def test_progress_mid_job_and_interrupt(api):
    thread, box = _run_in_thread(lambda: api.txt2img(prompt="slow", seed=9, steps=150, n_iter=3,
                                                     width=256, height=256))
    progress = _wait_for_progress(api)
    assert 0 < progress["progress"] < 1
    assert progress["state"]["job"] == "scripts_txt2img" and progress["state"]["job_count"] == 3
    assert progress["current_image"] is not None
    Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
    assert api.interrupt() == {}
    thread.join(120)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert len(result.images) == 1 and result.info["all_seeds"] == [9]
    assert api.get_progress()["state"]["job_count"] == 0


def test_two_parallel_requests_both_succeed_one_after_the_other(server):
    session = auth_session()
    payload = {"prompt": "queue", "steps": 40, "width": 128, "height": 128}

    def call(seed):
        started = time.monotonic()
        r = session.post(server.url + "/sdapi/v1/txt2img", json=dict(payload, seed=seed), timeout=120)
        return r, started, time.monotonic()

    (t1, b1), (t2, b2) = _run_in_thread(lambda: call(1)), _run_in_thread(lambda: call(2))
    t1.join(180), t2.join(180)
    (r1, s1, e1), (r2, s2, e2) = b1["result"], b2["result"]
    assert r1.status_code == r2.status_code == 200
    assert json.loads(r1.json()["info"])["seed"] == 1 and json.loads(r2.json()["info"])["seed"] == 2
    # Served one at a time: the later finisher ended after the earlier one finished.
    first_end, second_end = sorted([e1, e2])
    assert second_end - first_end > 0.2


def test_original_services_documented_flow(server):
    """POST txt2img with prompt and steps only, decode the image, then png-info with a data URI."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2}, headers=headers,
                      timeout=300)
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["images", "parameters", "info"]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (512, 512) and image.format == "PNG"
    info = json.loads(body["info"])
    assert body["parameters"]["sampler_index"] == "Euler" and body["parameters"]["seed"] == -1
    r = requests.post(server.url + "/sdapi/v1/png-info", headers=headers,
                      json={"image": "data:image/png;base64," + body["images"][0]}, timeout=30)
    parsed = r.json()
    assert parsed["info"] == info["infotexts"][0]
    p = parsed["parameters"]
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == ("2", "Euler", "7.0", str(info["seed"]))
    assert (p["Size-1"], p["Size-2"], p["Model hash"], p["Model"]) == ("512", "512", "e8b3bb4a7a", "tiny-sd")
    assert 0 <= info["seed"] < 4294967294


def test_styles_are_applied(server):
    r = auth_session().post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a tree", "styles": ["moody"],
                                                                    "steps": 2, "seed": 1, **SMALL})
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "a tree, dark, moody" and info["negative_prompt"] == "bright"
    assert auth_session().get(server.url + "/sdapi/v1/prompt-styles").json() == [
        {"name": "moody", "prompt": "{prompt}, dark, moody", "negative_prompt": "bright"}]


def test_infotext_field_reproduces_an_image(server):
    session = auth_session()
    first = session.post(server.url + "/sdapi/v1/txt2img", json={
        "prompt": "a (red:1.2) boat", "negative_prompt": "fog", "seed": 77, "steps": 5, "cfg_scale": 5.5,
        "sampler_name": "DPM++ 2M", "scheduler": "Exponential", **SMALL}).json()
    text = json.loads(first["info"])["infotexts"][0]
    again = session.post(server.url + "/sdapi/v1/txt2img", json={"infotext": text}).json()
    info = json.loads(again["info"])
    assert (info["seed"], info["steps"], info["cfg_scale"], info["width"]) == (77, 5, 5.5, 64)
    assert info["infotexts"][0] == text
    assert again["images"][0] == first["images"][0]
    # Fields set explicitly win over the infotext.
    other = session.post(server.url + "/sdapi/v1/txt2img", json={"infotext": text, "seed": 78}).json()
    assert json.loads(other["info"])["seed"] == 78


def test_extra_batch_images(server):
    def b64(color):
        buffer = io.BytesIO()
        Image.new("RGB", (10, 20), color).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()
    r = auth_session().post(server.url + "/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": "data:image/png;base64," + b64("red"), "name": "a"}, {"data": b64("blue"), "name": "b"}],
        "resize_mode": 1, "upscaling_resize_w": 30, "upscaling_resize_h": 30, "upscaler_1": "Nearest"})
    images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in r.json()["images"]]
    assert [im.size for im in images] == [(30, 30), (30, 30)]
    assert images[0].getpixel((15, 15)) == (255, 0, 0) and images[1].getpixel((15, 15)) == (0, 0, 255)


def test_cors_only_for_allowed_origins(server):
    preflight = requests.options(server.url + "/sdapi/v1/txt2img", timeout=10, headers={
        "Origin": "https://studio.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://studio.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    r = auth_session().get(server.url + "/sdapi/v1/samplers", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def _expected_schedule(sampler) -> str:
    from sdfc.engine.schedules import find_schedule
    default = sampler.options.get("scheduler")
    return find_schedule(default).label if default else "Automatic"


def test_every_samplers_infotext_names_sampler_and_schedule_as_a1111(server):
    from sdfc.engine.samplers import SAMPLERS
    session = auth_session()
    for sampler in SAMPLERS:
        body = {"prompt": "x", "seed": 1, "steps": 3, "sampler_name": sampler.name, **SMALL}
        info = json.loads(session.post(server.url + "/sdapi/v1/txt2img", json=body).json()["info"])
        assert f"Sampler: {sampler.name}, Schedule type: {_expected_schedule(sampler)}, " in info["infotexts"][0]
        assert info["sampler_name"] == sampler.name
    explicit = {"prompt": "x", "seed": 1, "steps": 3, "sampler_name": "Euler a", "scheduler": "sgm_uniform", **SMALL}
    text = json.loads(session.post(server.url + "/sdapi/v1/txt2img", json=explicit).json()["info"])["infotexts"][0]
    assert "Sampler: Euler a, Schedule type: SGM Uniform, " in text
    combined = {"prompt": "x", "seed": 1, "steps": 3, "sampler_name": "DPM++ 2M SDE Karras", **SMALL}
    text = json.loads(session.post(server.url + "/sdapi/v1/txt2img", json=combined).json()["info"])["infotexts"][0]
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras, " in text


def test_variation_seed_and_rng_in_infotext(server):
    body = {"prompt": "x", "seed": 5, "subseed": 9, "subseed_strength": 0.3, "seed_resize_from_w": 128,
            "seed_resize_from_h": 96, "steps": 3, "override_settings": {"randn_source": "CPU"}, **SMALL}
    info = json.loads(auth_session().post(server.url + "/sdapi/v1/txt2img", json=body).json()["info"])
    text = info["infotexts"][0]
    assert "Seed: 5, Size: 64x64, " in text
    assert "Variation seed: 9, Variation seed strength: 0.3, Seed resize from: 128x96, " in text
    assert ", RNG: CPU, " in text and info["all_subseeds"] == [9]
