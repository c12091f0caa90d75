"""The engine's images equal the reference's (k-diffusion + diffusers PyTorch) on the tiny model.

Same model, same prompt, same initial noise and same injected noise on both sides; the decoded float
images must agree to 1e-4 (onnxruntime vs PyTorch kernels differ at about 1e-6 per step).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdfc.engine import GenerationRequest
from sdfc.engine.rng import ImageRNG
from sdfc.engine.samplers import img2img_steps

from .reference import ReferencePipeline

TOLERANCE = 1e-4
STEPS, CFG, SIZE = 20, 7.5, 64
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"

# (A1111 sampler name, k-diffusion function or "ddim", its Automatic schedule)
SAMPLERS = [
    ("Euler", "euler", "uniform"),
    ("Euler a", "euler_ancestral", "uniform"),
    ("DPM++ 2M", "dpmpp_2m", "karras"),
    ("DDIM", "ddim", None),
]


@pytest.fixture(scope="module")
def reference(tiny_diffusers):
    return ReferencePipeline(tiny_diffusers)


def _reference_images(reference, function, schedule, seeds, init_latent=None, t_enc=None, steps=STEPS):
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), seeds, source="GPU")
    first = rng.first()
    if function == "ddim":
        return reference.ddim_sample(PROMPT, NEGATIVE, first, steps, CFG, init_latent, t_enc)
    return reference.k_sample(function, PROMPT, NEGATIVE, first, rng.next, steps, CFG, schedule,
                              init_latent=init_latent, t_enc=t_enc)


def _request(sampler, **kw):
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                             cfg_scale=CFG, sampler_name=sampler, **kw)


def _max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("sampler,function,schedule", SAMPLERS)
def test_txt2img_matches_reference(engine, reference, sampler, function, schedule):
    result = engine.generate(_request(sampler, seed=1234, batch_size=2))
    expected = _reference_images(reference, function, schedule, [1234, 1235])
    assert result.seeds == [1234, 1235]
    assert _max_diff(result.float_images, expected) <= TOLERANCE
    # The image really depends on the prompt (guards against a test that compares two blanks).
    assert float(np.std(result.float_images[0])) > 1e-3


@pytest.mark.parametrize("sampler,function,schedule", SAMPLERS)
def test_img2img_matches_reference(engine, reference, sampler, function, schedule):
    rng = np.random.default_rng(7)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    result = engine.generate(_request(sampler, seed=99, init_images=[init], denoising_strength=0.6))
    pixels = np.moveaxis(np.asarray(init, dtype=np.float32) / 255.0, 2, 0)[None] * 2 - 1
    init_latent = reference.encode_image(pixels)
    expected = _reference_images(reference, function, schedule, [99], init_latent,
                                 img2img_steps(STEPS, 0.6))
    assert _max_diff(result.float_images, expected) <= TOLERANCE


def test_karras_schedule_overrides_automatic(engine, reference):
    result = engine.generate(_request("Euler", scheduler="Karras", seed=5))
    assert result.schedule_label == "Karras"
    assert _max_diff(result.float_images, _reference_images(reference, "euler", "karras", [5])) <= TOLERANCE


def test_combined_sampler_name_is_split(engine, reference):
    result = engine.generate(_request("Euler a Karras", seed=5))
    assert (result.sampler_name, result.schedule_label) == ("Euler a", "Karras")
    expected = _reference_images(reference, "euler_ancestral", "karras", [5])
    assert _max_diff(result.float_images, expected) <= TOLERANCE


# The rest of the k-diffusion samplers A1111 runs, each with its Automatic schedule.
MORE_SAMPLERS = [
    ("LMS", "lms", "uniform"),
    ("Heun", "heun", "uniform"),
    ("DPM2", "dpm_2", "karras-discard"),
    ("DPM2 a", "dpm_2_ancestral", "karras-discard"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "karras"),
]


@pytest.mark.parametrize("sampler,function,schedule", MORE_SAMPLERS)
def test_more_samplers_match_reference(engine, reference, sampler, function, schedule):
    result = engine.generate(_request(sampler, seed=77, batch_size=2))
    expected = _reference_images(reference, function, schedule, [77, 78])
    assert _max_diff(result.float_images, expected) <= TOLERANCE
