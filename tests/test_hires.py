"""Hires fix (issue #12 part 1): latent upscale modes, the second pass, and the API around them.

(1) sdfc.engine.upscale.interpolate equals torch.nn.functional.interpolate (≤ 1e-5) for every A1111 latent
    upscale mode; (2) the engine's hires fix equals a torch reference of A1111's (tests/reference_hires.py)
    on the tiny model, ≤ 1e-4 on decoded images, for latent and pixel upscalers; (3) A1111's own hires request
    (its test/test_txt2img.py) and a full one through a real `sdfc serve`; (4) the 4xx refusals.
"""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

from sdfc.engine import GenerationRequest, JobControl
from sdfc.engine.hires import HiresFix, plan
from sdfc.engine.upscale import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS, interpolate

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server

TOLERANCE = 1e-4
SIZE = 64  # the tiny model's native size; its size step is 16

# ---------------------------------------------------------------------------------------------------
# (1) latent upscale modes vs torch


@pytest.mark.parametrize("name", list(LATENT_UPSCALE_MODES))
@pytest.mark.parametrize("shape,size", [((2, 4, 8, 8), (16, 16)), ((1, 4, 8, 8), (12, 20)),
                                        ((1, 4, 5, 7), (13, 11)), ((1, 4, 16, 12), (8, 6)),
                                        ((1, 4, 9, 9), (9, 9)), ((1, 4, 7, 3), (21, 31))])
def test_latent_modes_match_torch_interpolate(name, shape, size):
    mode = LATENT_UPSCALE_MODES[name]
    x = np.random.default_rng(hash((name, shape)) % 2**32).standard_normal(shape).astype(np.float32)
    kwargs = {} if mode.mode.startswith("nearest") else {"align_corners": False}
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode.mode,
                                               antialias=mode.antialias, **kwargs).numpy()
    ours = interpolate(x, size, mode.mode, mode.antialias)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert float(np.abs(ours - expected).max()) <= 1e-5


def test_latent_mode_table_is_a1111s():
    assert {k: (v.mode, v.antialias) for k, v in LATENT_UPSCALE_MODES.items()} == {
        "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
    assert list(PIXEL_UPSCALERS) == ["None", "Lanczos", "Nearest"]


def test_target_size_follows_a1111():
    assert plan(64, 64, HiresFix(scale=1.5)).final_size == (96, 96)
    assert plan(64, 64, HiresFix(scale=1.3)).upscale_to == (83, 83)  # int(), then the latent floors
    assert plan(64, 64, HiresFix(scale=1.3)).final_size == (80, 80)
    assert plan(64, 48, HiresFix(resize_x=128)).final_size == (128, 96)
    assert plan(64, 48, HiresFix(resize_y=96)).final_size == (128, 96)
    # Both given: cover, then crop the latent (A1111's truncate_x/y).
    p = plan(64, 64, HiresFix(resize_x=128, resize_y=96))
    assert (p.upscale_to, p.truncate, p.final_size) == ((128, 128), (0, 4), (128, 96))
    p = plan(64, 64, HiresFix(resize_x=96, resize_y=128))
    assert (p.upscale_to, p.truncate, p.final_size) == ((128, 128), (4, 0), (96, 128))


# ---------------------------------------------------------------------------------------------------
# (2) parity with a torch reference of A1111's hires fix


@pytest.fixture(scope="module")
def hires_reference(tiny_diffusers):
    from .reference import ReferencePipeline
    from .reference_hires import HiresReference
    return HiresReference(ReferencePipeline(tiny_diffusers))


PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"
CASES = {
    # A latent upscaler; a different sampler, schedule, prompts and CFG scale in the second pass.
    "latent": dict(sampler="Euler", function="euler", schedule="uniform", seeds=[11, 12],
                   hires=HiresFix(scale=2, upscaler="Latent", denoising_strength=0.6, second_pass_steps=4,
                                  sampler_name="DPM++ 2M", prompt="a dog in the rain", negative_prompt="ugly",
                                  cfg_scale=5.0),
                   hr=dict(hr_function="dpmpp_2m", hr_schedule="karras", hr_prompt="a dog in the rain",
                           hr_negative="ugly", hr_cfg=5.0, hr_steps=4)),
    # A latent upscaler with the crop of hr_resize_x/y.
    "latent-crop": dict(sampler="Euler", function="euler", schedule="uniform", seeds=[5],
                        hires=HiresFix(resize_x=96, resize_y=128, upscaler="Latent (bicubic antialiased)",
                                       denoising_strength=0.45),
                        hr=dict(hr_function="euler", hr_schedule="uniform", hr_prompt=PROMPT, hr_negative=NEGATIVE,
                                hr_cfg=7.5, hr_steps=6)),
    # A pixel upscaler (decode, Lanczos, encode), with the crop; an ancestral sampler and a hires schedule.
    "pixel": dict(sampler="Euler a", function="euler_ancestral", schedule="uniform", seeds=[7, 8],
                  hires=HiresFix(resize_x=128, resize_y=96, upscaler="Lanczos", denoising_strength=0.5,
                                 scheduler="Karras"),
                  hr=dict(hr_function="euler_ancestral", hr_schedule="karras", hr_prompt=PROMPT,
                          hr_negative=NEGATIVE, hr_cfg=7.5, hr_steps=6)),
}


def _request(case, hires):
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6,
                             cfg_scale=7.5, sampler_name=case["sampler"], seed=case["seeds"][0],
                             batch_size=len(case["seeds"]), hires=hires)


@pytest.mark.parametrize("name", list(CASES))
def test_hires_matches_torch_reference(engine, hires_reference, name):
    case = CASES[name]
    result = engine.generate(_request(case, case["hires"]))
    first_pass = engine.generate(_request(case, None)).images  # the 8-bit images the pixel path upscaled
    h = case["hires"]
    expected, reference_first = hires_reference.run(
        seeds=case["seeds"], prompt=PROMPT, negative=NEGATIVE, width=SIZE, height=SIZE, steps=6, cfg=7.5,
        function=case["function"], schedule=case["schedule"], upscaler=h.upscaler, scale=h.scale,
        resize_x=h.resize_x, resize_y=h.resize_y, denoising_strength=h.denoising_strength,
        first_pass_images=first_pass if h.upscaler in PIXEL_UPSCALERS else None, **case["hr"])
    final = plan(SIZE, SIZE, h).final_size
    assert [im.size for im in result.images] == [final] * len(case["seeds"])
    assert all(a.shape == (final[1], final[0], 3) for a in expected)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(result.float_images, expected))
    assert diff <= TOLERANCE, f"{name}: max abs difference {diff}"
    if reference_first is not None:  # both sides' first passes agree to the last 8-bit step
        assert max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                   for a, b in zip(first_pass, reference_first)) <= 1
    # Not a blank: the second pass changed the image (vs the first pass simply resized).
    resized = np.asarray(first_pass[0].resize(final, Image.LANCZOS), np.float32) / 255
    assert float(np.abs(result.float_images[0] - resized).mean()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# Engine behaviour: progress, interrupt, skip, denoising 0


class _InterruptAt(JobControl):
    def __init__(self, job_no: int, step: int, action: str = "interrupt"):
        super().__init__()
        self.at, self.action, self.seen = (job_no, step), action, []

    def _step(self, step, latent):
        super()._step(step, latent)
        self.seen.append((self.job_no, self.job_count, self.sampling_steps))
        if (self.job_no, step) == self.at:
            getattr(self, self.action)()


def _small(**kw):
    return GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, steps=4, seed=3,
                             hires=HiresFix(scale=2, second_pass_steps=3, denoising_strength=0.5), **kw)


def test_second_pass_counts_as_a_job(engine):
    control = _InterruptAt(-1, -1)
    result = engine.generate(_small(n_iter=2), control)
    assert [im.size for im in result.images] == [(128, 128)] * 2
    # A1111: job_count doubles; the second pass of iteration n is job 2n + 1 with its own steps.
    jobs = sorted({(j, c) for j, c, _ in control.seen})
    assert jobs == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {s for j, _, s in control.seen if j % 2} == {3} and {s for j, _, s in control.seen if j % 2 == 0} == {4}
    assert control.progress == 1.0


def test_interrupt_in_first_pass_returns_the_low_res_image(engine):
    result = engine.generate(_small(), _InterruptAt(0, 2))
    assert result.interrupted and [im.size for im in result.images] == [(64, 64)]


def test_interrupt_in_second_pass_returns_the_hires_image(engine):
    control = _InterruptAt(1, 1)
    result = engine.generate(_small(), control)
    assert result.interrupted and [im.size for im in result.images] == [(128, 128)]
    assert max(s for j, _, s in control.seen if j == 1) == 3 and len([1 for j, *_ in control.seen if j == 1]) == 1


def test_skip_in_first_pass_returns_the_upscaled_image(engine):
    result = engine.generate(_small(n_iter=2), _InterruptAt(0, 2, "skip"))
    assert not result.interrupted and [im.size for im in result.images] == [(128, 128)] * 2


def test_denoising_zero_decodes_the_upscaled_latents(engine):
    # A1111: int(steps / 0) = 0 sigmas → [0]: no step; its own API test sends denoising_strength 0.
    zero = engine.generate(_small(), _InterruptAt(-1, -1))
    req = _small()
    req.hires.denoising_strength = 0
    control = _InterruptAt(-1, -1)
    result = engine.generate(req, control)
    assert [im.size for im in result.images] == [(128, 128)]
    assert {j for j, *_ in control.seen} == {0}  # no second-pass step ran
    assert float(np.abs(result.float_images[0] - zero.float_images[0]).max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# (3), (4) over HTTP: a real `sdfc serve`

# A1111's test/test_txt2img.py simple request; its hires test sets enable_hr on it.
A1111_SIMPLE = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
    "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
    "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
    "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
    "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}
MAX_PIXELS = 160 * 160


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hires-server")
    shutil.copytree(TINY_MODEL, tmp / "models" / "tiny-sd")
    styles = tmp / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nmoody,"{prompt}, dark",bright\n')
    srv = start_server(tmp, env={"SDFC_MODELS_DIR": str(tmp / "models"), "SDFC_STYLES_FILE": str(styles),
                                 "SDFC_MAX_PIXELS": str(MAX_PIXELS), "SDFC_MAX_STEPS": "40"})
    yield srv
    srv.stop()


def _post(server, body):
    return requests.post(server.url + "/sdapi/v1/txt2img", json=body, auth=(USER, PASSWORD), timeout=120)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_a1111_hires_request(server):
    body = dict(A1111_SIMPLE, enable_hr=True)
    r = _post(server, body)
    assert r.status_code == 200, r.text[:500]
    data = r.json()
    assert len(data["images"]) == 1 and _image(data["images"][0]).size == (128, 128)
    info = json.loads(data["info"])
    text = info["infotexts"][0]
    line = text.splitlines()[-1]
    # As A1111 writes it: first-pass Size, Denoising strength at its place, the Hires entries after.
    assert "Size: 64x64" in line and "Denoising strength: 0.0" in line and "Hires upscale: 2.0" in line
    assert line.index("Denoising strength") < line.index("Hires upscale")
    for absent in ("Hires upscaler", "Hires steps", "Hires sampler", "Hires prompt", "Hires resize",
                   "Hires schedule type", "Hires CFG Scale"):
        assert absent not in line
    assert info["width"] == 64 and info["height"] == 64 and info["denoising_strength"] == 0.0
    extra = info["extra_generation_params"]
    assert list(extra)[:5] == ["Denoising strength", "Hires prompt", "Hires negative prompt",
                               "Hires schedule type", "Hires upscale"]
    assert extra["Hires prompt"] is None and extra["Hires upscale"] == 2.0


def test_full_hires_request(server):
    body = dict(A1111_SIMPLE, enable_hr=True, seed=42, batch_size=2, denoising_strength=None, styles=["moody"],
                hr_upscaler="Lanczos", hr_resize_x=128, hr_resize_y=96, hr_second_pass_steps=2,
                hr_sampler_name="DPM++ 2M", hr_scheduler="Exponential", hr_prompt="a dog",
                hr_negative_prompt="ugly", hr_cfg=4.5)
    r = _post(server, body)
    assert r.status_code == 200, r.text[:500]
    data = r.json()
    assert [_image(b).size for b in data["images"]] == [(128, 96)] * 2
    info = json.loads(data["info"])
    line = info["infotexts"][1].splitlines()[-1]
    assert info["denoising_strength"] == 0.7  # the default sdfc uses where A1111 would fail
    expected = ["Denoising strength: 0.7", "Hires sampler: DPM++ 2M", 'Hires prompt: "a dog, dark"',
                "Hires negative prompt: \"ugly, bright\"", "Hires CFG Scale: 4.5", "Hires schedule type: Exponential",
                "Hires resize: 128x96", "Hires steps: 2", "Hires upscaler: Lanczos"]
    for entry in expected:
        assert entry.replace('"', "") in line.replace('"', ""), (entry, line)
    positions = [line.index(e.split(":")[0] + ":") for e in expected[1:]]
    assert positions == sorted(positions)  # A1111's insertion order
    assert "Size: 64x64" in line and "Seed: 43" in line


def test_webuiapi_hires(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=USER, password=PASSWORD,
                            sampler="Euler", steps=3)
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=1, enable_hr=True, hr_scale=2,
                         hr_upscaler=webuiapi.HiResUpscaler.LatentNearest, denoising_strength=0.5)
    assert result.image.size == (128, 128)
    assert "Hires upscaler: Latent (nearest)" in result.info["infotexts"][0]


def test_upscaler_lists_come_from_the_table(server):
    get = lambda path: requests.get(server.url + path, auth=(USER, PASSWORD), timeout=30)  # noqa: E731
    assert [m["name"] for m in get("/sdapi/v1/latent-upscale-modes").json()] == list(LATENT_UPSCALE_MODES)
    assert [u["name"] for u in get("/sdapi/v1/upscalers").json()] == list(PIXEL_UPSCALERS)


@pytest.mark.parametrize("fields,status,needle", [
    ({"hr_upscaler": "R-ESRGAN 4x+"}, 400, "Latent (nearest-exact), None, Lanczos, Nearest"),
    ({"hr_upscaler": ""}, 400, "could not find upscaler"),
    ({"hr_scale": 9}, 422, "hr_scale"),
    ({"hr_scale": 1.125}, 400, "multiple of 16"),          # 72x72: not a multiple of the size step
    ({"hr_upscaler": "Lanczos", "hr_resize_x": 100}, 400, "multiple of 8"),
    ({"hr_scale": 4}, 400, "hires fix second pass: image size 256x256"),  # over SDFC_MAX_PIXELS
    ({"hr_second_pass_steps": 41}, 400, "SDFC_MAX_STEPS"),
    ({"hr_second_pass_steps": -1}, 422, "hr_second_pass_steps"),
    ({"hr_sampler_name": "Nope"}, 400, "unknown sampler"),
    ({"hr_scheduler": "Nope"}, 400, "unknown scheduler"),
    ({"hr_checkpoint_name": "other"}, 400, "hr_checkpoint_name"),
    ({"firstphase_width": 32}, 400, "firstphase"),
    ({"denoising_strength": 1.5}, 422, "denoising_strength"),
    ({"hr_cfg": "lots"}, 422, "hr_cfg"),
    ({"hr_prompt": "(a:5000)"}, 400, "hr_prompt"),
])
def test_hires_refusals(server, fields, status, needle):
    r = _post(server, dict(A1111_SIMPLE, enable_hr=True, **fields))
    assert r.status_code == status, r.text[:300]
    assert needle in r.text, r.text[:500]


def test_infotext_field_repeats_a_hires_job(server):
    """A1111 1.8+'s `infotext` request field: the hires entries (and its enable_hr paste rule) come back."""
    body = dict(A1111_SIMPLE, enable_hr=True, seed=9, sampler_index="Euler", denoising_strength=0.6,
                hr_upscaler="Latent (bicubic)", hr_resize_x=128, hr_resize_y=96, hr_second_pass_steps=2,
                hr_scheduler="Karras", hr_prompt="a dog", hr_cfg=3.0)
    first = _post(server, body).json()
    text = json.loads(first["info"])["infotexts"][0]
    again = _post(server, {"infotext": text})
    assert again.status_code == 200, again.text[:300]
    again = again.json()
    assert again["parameters"]["enable_hr"] is True and again["parameters"]["hr_cfg"] == 3.0
    assert json.loads(again["info"])["infotexts"][0] == text
    assert again["images"] == first["images"]
