"""Inpainting equals A1111 1.10's (tests/inpaint_reference.py, written from its source) on the tiny models.

Ordinary model: the masked latent blending in the CFG denoiser (after the denoised output for k-diffusion,
before the UNet for DDIM) and the final blend; the 9-channel tiny inpainting model (`sdfc export tiny
--architecture inpaint`, built once per session): its image conditioning. Same noise and mask on both
sides; decoded float images agree to 1e-4, and the final images (8-bit, the original laid over everything
outside the mask) are byte-identical to A1111's overlay of the same decoded pixels.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine import inpaint
from sdfc.engine.rng import ImageRNG
from sdfc.engine.samplers import img2img_steps

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server

cv2 = pytest.importorskip("cv2")  # the reference's blur is OpenCV's, as A1111's

TOLERANCE = 1e-4
SIZE, STEPS, CFG, STRENGTH = 64, 10, 7.5, 0.75
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"


def _init_image(w=96, h=80, seed=7) -> Image.Image:
    """A smooth random image (upsampled noise): Lanczos and the fill blur see structure, not only noise."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _mask(w=96, h=80, box=(30, 20, 70, 60)) -> Image.Image:
    mask = Image.new("L", (w, h))
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="session")
def inpaint_model(tmp_path_factory):
    """The tiny inpainting model: (diffusers folder, models folder holding its ONNX export)."""
    from models_export import tiny
    from models_export.onnx_export import export_diffusers

    root = tmp_path_factory.mktemp("tiny-inpaint")
    tiny.build(root / "diffusers", seed=0, tokenizer_from=TINY_MODEL / "tokenizer", architecture="inpaint")
    export_diffusers(root / "diffusers", root / "models" / "tiny-sd-inpaint", name="tiny-sd-inpaint",
                     validate=False)
    return root / "diffusers", root / "models"


@pytest.fixture(scope="module")
def reference(tiny_diffusers):
    from .inpaint_reference import InpaintReference
    return InpaintReference(tiny_diffusers)


@pytest.fixture(scope="module")
def inpaint_reference(inpaint_model):
    from .inpaint_reference import InpaintReference
    return InpaintReference(inpaint_model[0])


@pytest.fixture(scope="module")
def inpaint_engine(inpaint_model):
    return Engine(inpaint_model[1])


def _request(sampler, options: inpaint.InpaintOptions, **kw):
    fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                  sampler_name=sampler, seed=1234, init_images=[_init_image()], mask=_mask(),
                  denoising_strength=STRENGTH, inpaint=options)
    fields.update(kw)
    return GenerationRequest(**fields)


def _processing(req: GenerationRequest, weight=1.0):
    from .inpaint_reference import processing
    o = req.inpaint
    return processing(init_images=req.init_images, resize_mode=req.resize_mode, width=req.width, height=req.height,
                      batch_size=req.batch_size, mask=req.mask, mask_blur_x=o.mask_blur_x, mask_blur_y=o.mask_blur_y,
                      mask_round=o.mask_round, inpainting_fill=o.inpainting_fill, inpaint_full_res=o.inpaint_full_res,
                      inpaint_full_res_padding=o.inpaint_full_res_padding,
                      inpainting_mask_invert=int(o.inpainting_mask_invert), inpainting_mask_weight=weight)


def _reference_run(reference, req, function, schedule, inpainting_model=False, weight=1.0):
    """A1111's init + sample + decode for `req`; returns (decoded floats, processing)."""
    from .inpaint_reference import img2img_init
    seeds = [req.seed + i for i in range(req.batch_size)]
    p = img2img_init(_processing(req, weight), reference, seeds, inpainting_model)
    if req.initial_noise_multiplier != 1.0:  # Img2Img.sample() notes it before sampling
        p.extra_generation_params["Noise multiplier"] = req.initial_noise_multiplier
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), seeds, source="GPU")
    first = rng.first()
    t_enc = img2img_steps(STEPS, STRENGTH)
    if function == "ddim":
        latents = reference.ddim_inpaint(p, PROMPT, NEGATIVE, first * np.float32(req.initial_noise_multiplier),
                                         STEPS, CFG, t_enc)
    else:
        latents = reference.k_inpaint(p, function, PROMPT, NEGATIVE, first, rng.next, STEPS, CFG, schedule, t_enc,
                                      noise_multiplier=req.initial_noise_multiplier)
    return reference.decode(latents), p


def _check(result, expected, p):
    """Decoded floats within TOLERANCE; final images exactly A1111's overlay of our decoded pixels."""
    from .inpaint_reference import finish_images
    assert len(result.float_images) == len(expected)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(result.float_images, expected))
    assert diff <= TOLERANCE, diff
    assert float(np.std(result.float_images[0])) > 1e-3
    for ours, theirs in zip(result.images, finish_images(result.float_images, p)):
        assert ours.size == theirs.size
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert result.extra_generation_params == p.extra_generation_params


# (sampler, k-diffusion function or "ddim", its Automatic schedule, inpainting options, extra request fields)
ORDINARY_CASES = [
    pytest.param("Euler a", "euler_ancestral", "uniform",
                 inpaint.InpaintOptions(inpainting_fill=1, inpaint_full_res=False), dict(batch_size=2),
                 id="euler-a-original-batch2"),
    pytest.param("Euler", "euler", "uniform",
                 inpaint.InpaintOptions(inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=6),
                 {}, id="euler-fill-only-masked"),
    pytest.param("DDIM", "ddim", None,
                 inpaint.InpaintOptions(inpainting_fill=2, inpaint_full_res=False, mask_blur_x=2, mask_blur_y=6),
                 dict(initial_noise_multiplier=0.9), id="ddim-latent-noise-multiplier"),
    pytest.param("DPM++ 2M", "dpmpp_2m", "karras",
                 inpaint.InpaintOptions(inpainting_fill=3, inpaint_full_res=False, inpainting_mask_invert=True),
                 dict(resize_mode=1), id="dpmpp-latent-nothing-inverted-crop"),
]


@pytest.mark.parametrize("sampler,function,schedule,options,extra", ORDINARY_CASES)
def test_inpainting_matches_a1111(engine, reference, sampler, function, schedule, options, extra):
    req = _request(sampler, options, **extra)
    result = engine.generate(req)
    expected, p = _reference_run(reference, req, function, schedule)
    _check(result, expected, p)


INPAINT_MODEL_CASES = [
    pytest.param("Euler", "euler", "uniform", inpaint.InpaintOptions(inpainting_fill=0, inpaint_full_res=False),
                 id="euler-fill"),
    pytest.param("DDIM", "ddim", None, inpaint.InpaintOptions(inpainting_fill=1, inpaint_full_res=True),
                 id="ddim-original-only-masked"),
]


@pytest.mark.slow
@pytest.mark.parametrize("sampler,function,schedule,options", INPAINT_MODEL_CASES)
def test_inpainting_model_matches_a1111(inpaint_engine, inpaint_reference, sampler, function, schedule, options):
    req = _request(sampler, options)
    result = inpaint_engine.generate(req)
    expected, p = _reference_run(inpaint_reference, req, function, schedule, inpainting_model=True)
    assert p.image_conditioning.shape == (1, 5, SIZE // 8, SIZE // 8)
    _check(result, expected, p)


@pytest.mark.slow
def test_inpainting_model_img2img_and_txt2img(inpaint_engine, inpaint_reference):
    from .inpaint_reference import txt2img_image_conditioning
    # img2img without a mask: an all-ones mask, the init image scaled by 1 - inpainting_mask_weight.
    req = _request("Euler", inpaint.InpaintOptions(mask_weight=0.4), mask=None)
    expected, p = _reference_run(inpaint_reference, req, "euler", "uniform", inpainting_model=True, weight=0.4)
    _check(inpaint_engine.generate(req), expected, p)
    # txt2img: A1111's txt2img_image_conditioning (everything masked, a grey image). The grey image's latent
    # is ill-conditioned (the VAE's first GroupNorm sees a constant: float rounding / sqrt(eps)), ONNX and
    # torch differ there by 4e-2; so the reference samples with the engine's conditioning, checked for its
    # layout against A1111's, and the UNet path itself is compared.
    model = inpaint_engine.load()
    ours = inpaint.txt2img_conditioning(model.vae_encode, 1, SIZE, SIZE)
    theirs = txt2img_image_conditioning(inpaint_reference, 1, SIZE, SIZE).numpy()
    assert ours.shape == theirs.shape == (1, 5, SIZE // 8, SIZE // 8)
    assert np.array_equal(ours[:, :1], theirs[:, :1]) and np.all(ours[:, :1] == 1)
    assert np.array_equal(ours[:, 1:], model.vae_encode(np.zeros((1, 3, SIZE, SIZE), np.float32)))
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), [5], source="GPU")
    expected = inpaint_reference.k_txt2img("euler", PROMPT, NEGATIVE, rng.first(), rng.next, STEPS, CFG, "uniform",
                                           torch.from_numpy(ours))
    result = inpaint_engine.generate(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE,
                                                       height=SIZE, steps=STEPS, cfg_scale=CFG, seed=5))
    assert float(np.abs(result.float_images[0] - expected[0]).max()) <= TOLERANCE


# ---- what the overlay guarantees ----------------------------------------------------------------------

def _outside_unchanged(engine, invert: bool):
    """(final image, resized original, mask as bool at the job's size) for a sharp mask (blur 0)."""
    init, mask = _init_image(SIZE, SIZE), _mask(SIZE, SIZE, (16, 8, 40, 48))
    req = _request("Euler a", inpaint.InpaintOptions(inpainting_fill=1, inpaint_full_res=False, mask_blur_x=0,
                                                     mask_blur_y=0, inpainting_mask_invert=invert),
                   init_images=[init], mask=mask, denoising_strength=0.9)
    image = np.asarray(engine.generate(req).images[0]).astype(int)
    return image, np.asarray(init).astype(int), np.asarray(mask) > 0


def test_unmasked_pixels_are_the_original(engine):
    image, original, masked = _outside_unchanged(engine, invert=False)
    # Tolerance 0: outside the mask the overlay is opaque, so the original's bytes come back exactly.
    assert np.array_equal(image[~masked], original[~masked])
    changed = np.any(image != original, axis=2)
    assert changed[masked].mean() > 0.9  # the masked area really was repainted


def test_inverted_mask_changes_exactly_the_complement(engine):
    image, original, masked = _outside_unchanged(engine, invert=True)
    changed = np.any(image != original, axis=2)
    assert not changed[masked].any()          # the white area is kept...
    assert changed[~masked].mean() > 0.9      # ...and the rest repainted
    normal, _, _ = _outside_unchanged(engine, invert=False)
    assert not np.any(normal != original, axis=2)[~masked].any()


def test_blurred_mask_keeps_what_the_blur_does_not_reach(engine):
    req = _request("Euler", inpaint.InpaintOptions(inpainting_fill=1, inpaint_full_res=False, mask_blur_x=4,
                                                   mask_blur_y=4), init_images=[_init_image(SIZE, SIZE)],
                   mask=_mask(SIZE, SIZE, (20, 20, 44, 44)))
    image = np.asarray(engine.generate(req).images[0]).astype(int)
    blurred = np.asarray(inpaint.blur_mask(_mask(SIZE, SIZE, (20, 20, 44, 44)), 4, 4))
    original = np.asarray(_init_image(SIZE, SIZE)).astype(int)
    assert np.array_equal(image[blurred == 0], original[blurred == 0])  # exact where the blurred mask is 0
    assert 0 < (blurred == 0).sum() < SIZE * SIZE


# ---- the mask's pixel steps --------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1, 2, 3, 4, 7, 10, 16, 33, 64])
def test_blur_is_opencvs_bit_for_bit(sigma):
    rng = np.random.default_rng(sigma)
    for shape in [(37, 64), (80, 23), (5, 300)]:
        mask = (rng.random(shape) > 0.7).astype(np.uint8) * 255
        mask[:, : shape[1] // 4] = rng.integers(0, 256, (shape[0], shape[1] // 4))
        k = 2 * int(2.5 * sigma + 0.5) + 1
        expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), sigma), (1, k), sigma)
        assert np.array_equal(np.asarray(inpaint.blur_mask(Image.fromarray(mask), sigma, sigma)), expected)
        assert np.array_equal(np.asarray(inpaint.blur_mask(Image.fromarray(mask), sigma, 0)),
                              cv2.GaussianBlur(mask, (k, 1), sigma))


def test_binary_mask_reads_alpha_or_grey():
    from .inpaint_reference import create_binary_mask
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 200))
    rgba.putpixel((2, 2), (0, 0, 0, 100))
    for round_alpha in (True, False):
        ours = inpaint.binary_mask(rgba, round_alpha)
        assert ours.mode == "L" and ours.tobytes() == create_binary_mask(rgba, round_alpha).tobytes()
    assert inpaint.binary_mask(rgba).getpixel((1, 1)) == 255 and inpaint.binary_mask(rgba).getpixel((2, 2)) == 0
    grey = Image.new("RGB", (8, 8), (10, 200, 30))
    assert inpaint.binary_mask(grey).tobytes() == grey.convert("L").tobytes()


@pytest.mark.parametrize("box,pad", [((30, 20, 70, 60), 0), ((0, 0, 10, 70), 4), ((80, 5, 96, 12), 32),
                                     ((40, 70, 41, 80), 1)])
def test_crop_region_as_a1111(box, pad):
    from .inpaint_reference import expand_crop_region, get_crop_region_v2
    mask = _mask(96, 80, box)
    for width, height in [(64, 64), (64, 128), (128, 48)]:
        ours = inpaint.crop_region(mask, pad)
        assert ours == get_crop_region_v2(mask, pad)
        assert inpaint.expand_crop_region(ours, width, height, 96, 80) == \
            expand_crop_region(ours, width, height, 96, 80)
    assert inpaint.crop_region(Image.new("L", (8, 8)), 3) is None


def test_validation_refuses_bad_fields(engine):
    from sdfc.engine import InvalidRequestError
    for options in (inpaint.InpaintOptions(mask_blur_x=inpaint.MAX_ENGINE_MASK_BLUR + 1), inpaint.InpaintOptions(inpainting_fill=4),
                    inpaint.InpaintOptions(inpaint_full_res_padding=-1), inpaint.InpaintOptions(mask_weight=2)):
        with pytest.raises(InvalidRequestError):
            engine.generate(_request("Euler", options))
    with pytest.raises(InvalidRequestError):
        engine.generate(_request("Euler", inpaint.InpaintOptions(), initial_noise_multiplier=float("nan")))
    with pytest.raises(InvalidRequestError, match="resize_mode 3"):  # A1111 fails here too
        engine.generate(_request("Euler", inpaint.InpaintOptions(inpaint_full_res=False), resize_mode=3))


# ---- over HTTP: A1111's own test/test_img2img.py requests ----------------------------------------------

def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _a1111_img2img_request() -> dict:
    """test/test_img2img.py's simple_img2img_request (its test_files images replaced by ours)."""
    return {
        "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
        "include_init_images": False, "init_images": [_b64(_init_image(96, 80))], "inpaint_full_res": False,
        "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
        "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
        "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
        "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
        "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_server(tmp_path_factory.mktemp("inpaint-server"), env={"SDFC_MODELS_DIR": str(TINY_MODEL.parent)})
    yield live
    live.stop()


@pytest.fixture()
def session():
    s = requests.Session()
    s.auth = (USER, PASSWORD)
    return s


def _images(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(i))) for i in response.json()["images"]]


def test_a1111_inpainting_requests_over_http(server, session):
    url = server.url + "/sdapi/v1/img2img"
    body = _a1111_img2img_request()
    assert [im.size for im in _images(session.post(url, json=body))] == [(64, 64)]  # test_img2img_simple_performed
    body["mask"] = _b64(_mask())
    masked = session.post(url, json=body)  # test_inpainting_masked_performed
    assert [im.size for im in _images(masked)] == [(64, 64)]
    info = json.loads(masked.json()["info"])
    assert "Mask blur: 4" in info["infotexts"][0] and "Masked content: fill" in info["infotexts"][0]
    assert masked.json()["parameters"]["mask"] is None  # include_init_images false
    body["inpainting_mask_invert"] = True  # test_inpainting_with_inverted_masked_performed
    inverted = session.post(url, json=body)
    assert [im.size for im in _images(inverted)] == [(64, 64)]
    assert "Mask mode: Inpaint not masked" in json.loads(inverted.json()["info"])["infotexts"][0]


def test_inpainting_fields_over_http(server, session):
    url = server.url + "/sdapi/v1/img2img"
    body = dict(_a1111_img2img_request(), mask=_b64(_mask()), inpaint_full_res=True, inpaint_full_res_padding=8,
                include_init_images=True, batch_size=2, seed=3)
    response = session.post(url, json=body)
    images = _images(response)
    assert [im.size for im in images] == [(96, 80)] * 2  # "Only masked": the result is the whole init image
    assert response.json()["parameters"]["mask"] == body["mask"]  # include_init_images echoes them
    text = json.loads(response.json()["info"])["infotexts"][0]
    assert "Inpaint area: Only masked, Masked area padding: 8" in text
    for mode in (1, 2, 3):
        assert [im.size for im in _images(session.post(url, json=dict(_a1111_img2img_request(),
                                                                      resize_mode=mode)))] == [(64, 64)]
    bad = [({"image_cfg_scale": 2.5}, 400), ({"mask_blur": 65}, 422), ({"mask_blur_x": 70, "mask_blur": None}, 422),
           ({"inpainting_fill": 4}, 422),
           ({"mask": "not an image"}, 400), ({"latent_mask": "x"}, 400), ({"resize_mode": 4}, 422),
           ({"mask": _b64(_mask()), "resize_mode": 3, "inpaint_full_res": False}, 400)]
    for fields, status in bad:
        r = session.post(url, json=dict(_a1111_img2img_request(), **fields))
        assert r.status_code == status, (fields, r.status_code, r.text)


@pytest.mark.slow
def test_inpainting_model_over_http(inpaint_model, tmp_path_factory, session):
    live = start_server(tmp_path_factory.mktemp("inpaint-model-server"), env={"SDFC_MODELS_DIR": str(inpaint_model[1])})
    try:
        body = dict(_a1111_img2img_request(), mask=_b64(_mask()), initial_noise_multiplier=0.8)
        response = session.post(live.url + "/sdapi/v1/img2img", json=body)
        assert [im.size for im in _images(response)] == [(64, 64)]
        info = json.loads(response.json()["info"])
        assert info["is_using_inpainting_conditioning"] is True
        text = info["infotexts"][0]
        assert "Conditional mask weight: 1.0" in text and "Noise multiplier: 0.8, Eta: 0.0" in text
        txt = session.post(live.url + "/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 3, "width": 64,
                                                                  "height": 64})
        assert [im.size for im in _images(txt)] == [(64, 64)]
        assert "Conditional mask weight: 1.0" in json.loads(txt.json()["info"])["infotexts"][0]
    finally:
        live.stop()
