"""img2img's resize modes equal A1111 1.10's (modules/images.py resize_image, as tests/inpaint_reference.py
states it): the resized init images byte for byte, and whole jobs on the tiny model within 1e-4 of the torch
reference, including mode 3's latent upscale (torch.nn.functional.interpolate, bilinear)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdfc.engine import GenerationRequest
from sdfc.engine import init_image
from sdfc.engine.rng import ImageRNG
from sdfc.engine.samplers import img2img_steps

from .inpaint_reference import flatten, resize_image

torch = pytest.importorskip("torch")

TOLERANCE = 1e-4
SIZE, STEPS, CFG, STRENGTH = 64, 10, 7.5, 0.6
PROMPT, NEGATIVE = "a watercolor of a lighthouse", "blurry"


def _image(w, h, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    small = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), channels), dtype=np.uint8)
    image = Image.fromarray(small.squeeze(-1) if channels == 1 else small, mode).resize((w, h), Image.BICUBIC)
    if mode == "RGBA":  # a transparent corner and a half-transparent band
        alpha = np.full((h, w), 255, np.uint8)
        alpha[: h // 3, : w // 3] = 0
        alpha[h // 2: h // 2 + 3] = 128
        image.putalpha(Image.fromarray(alpha))
    return image


SIZES = [(96, 80), (80, 96), (64, 64), (30, 100), (200, 40), (17, 23), (64, 128), (128, 64)]
TARGETS = [(64, 64), (64, 128), (128, 48)]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("color", ["RGB", "L", "RGBA"])
def test_resize_image_is_a1111s_byte_for_byte(mode, color):
    for i, (w, h) in enumerate(SIZES):
        image = _image(w, h, color, seed=i)
        for width, height in TARGETS:
            ours, theirs = init_image.resize_image(mode, image, width, height), resize_image(mode, image, width, height)
            assert ours.size == theirs.size == (width, height)
            # A1111 pastes a mask onto an RGB canvas; its grey values are the same bytes.
            assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs.convert("RGB"))), \
                (mode, color, (w, h), (width, height))


def test_resize_and_fill_stretches_the_edges():
    image = _image(64, 32)  # wider than the 64x64 target: bands above and below
    out = np.asarray(init_image.resize_image(2, image, 64, 64)).astype(int)
    top = 64 // 2 - 32 // 2
    assert np.array_equal(out[top:top + 32], np.asarray(image.resize((64, 32), Image.LANCZOS)))
    assert np.std(out[:top], axis=0).max() <= 1  # each band column is one colour: the edge row stretched


def test_flatten_puts_transparency_on_white():
    image = _image(40, 30, "RGBA")
    assert np.array_equal(np.asarray(init_image.flatten(image)), np.asarray(flatten(image)))
    assert np.asarray(init_image.flatten(image))[0, 0].tolist() == [255, 255, 255]


@pytest.fixture(scope="module")
def reference(tiny_diffusers):
    from .inpaint_reference import InpaintReference
    return InpaintReference(tiny_diffusers)


@pytest.mark.parametrize("mode,source", [(1, (96, 80)), (2, (96, 80)), (2, (40, 96)), (3, (96, 80)), (3, (64, 64))])
def test_img2img_resize_modes_match_a1111(engine, reference, mode, source):
    from .inpaint_reference import img2img_init, processing
    init = _image(*source, seed=3)
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                            cfg_scale=CFG, sampler_name="Euler", seed=42, init_images=[init],
                            denoising_strength=STRENGTH, resize_mode=mode)
    result = engine.generate(req)
    p = img2img_init(processing(init_images=[init], resize_mode=mode, width=SIZE, height=SIZE), reference, [42],
                     inpainting_model=False)
    assert p.init_latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), [42], source="GPU")
    latents = reference.k_inpaint(p, "euler", PROMPT, NEGATIVE, rng.first(), rng.next, STEPS, CFG, "uniform",
                                  img2img_steps(STEPS, STRENGTH))
    expected = reference.decode(latents)
    assert float(np.abs(result.float_images[0] - expected[0]).max()) <= TOLERANCE
    assert result.images[0].size == (SIZE, SIZE)


def test_latent_upscale_mode_is_torch_bilinear():
    latents = np.random.default_rng(0).standard_normal((2, 4, 10, 12)).astype(np.float32)
    ours = init_image.resize_latent(latents, SIZE, SIZE)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(latents), size=(8, 8), mode="bilinear").numpy()
    assert float(np.abs(ours - theirs).max()) <= 1e-5
    same = latents[:, :, :8, :8]
    assert np.array_equal(init_image.resize_latent(same, SIZE, SIZE), same)  # already the job's size
