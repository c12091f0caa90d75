"""Distilled (LCM) models: an LCMScheduler folder is exported flagged "lcm", and A1111's LCM sampler on it gives
diffusers' LCMScheduler images through diffusers' StableDiffusionPipeline (same model, noise and timesteps).

Two conventions differ and are bridged here, not in the engine: A1111 starts from σ_max·noise in k-diffusion's
space, which is sqrt(1 − ᾱ_999)·noise in diffusers' (VP) space, while diffusers' pipeline starts from the noise
itself, so the pipeline is handed the VP latent; and the timesteps are the engine's (8 steps: 999, 859, …, 19,
all on LCM's 50-step grid, where A1111's interpolated schedule and diffusers' timesteps coincide).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.rng import ImageRNG

from .sd2_models import exported_model
from .test_sd2 import UNetCalls

TOLERANCE = 1e-4
STEPS, SIZE = 8, 64
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"
LCM_SCHEDULER = {"_class_name": "LCMScheduler", "original_inference_steps": 50, "timestep_scaling": 10.0,
                 "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading"}


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    onnx_dir = exported_model(tmp_path_factory, "sd1", scheduler=LCM_SCHEDULER)
    src = tmp_path_factory.getbasetemp() / "tiny-diffusers" / "sd1-custom"
    assert json.loads((src / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    return onnx_dir, src, Engine(onnx_dir)


def test_lcm_scheduler_folder_is_flagged_lcm(lcm):
    onnx_dir, _, engine = lcm
    assert json.loads((onnx_dir / "sdfc.json").read_text())["distilled"] == "lcm"
    assert engine.current.distilled == "lcm"


@torch.no_grad()
def diffusers_lcm(src, seeds, timesteps, cfg):
    import diffusers.schedulers.scheduling_lcm as scheduling_lcm
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), seeds, source="GPU")
    first = torch.from_numpy(rng.first())
    a_max = pipe.scheduler.alphas_cumprod[999]
    saved = scheduling_lcm.randn_tensor
    # The scheduler's re-noising draws come from the images' own generators, as the engine's.
    scheduling_lcm.randn_tensor = lambda shape, **kw: torch.from_numpy(rng.next()).to(kw.get("dtype"))
    try:
        out = pipe(prompt=[PROMPT] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE,
                   guidance_scale=cfg, timesteps=timesteps, latents=first * (1 - a_max).sqrt(), output_type="np")
    finally:
        scheduling_lcm.randn_tensor = saved
    return list(out.images)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_lcm_sampler_matches_diffusers_lcm_scheduler(lcm, cfg):
    _, src, engine = lcm
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                                cfg_scale=cfg, sampler_name="LCM", seed=42, batch_size=2)
    model = engine.load()
    timesteps = []
    with UNetCalls(model) as calls:
        unet = model.unet

        def recording(sample, timestep, context, *args, **kwargs):
            timesteps.append(int(timestep))
            return unet(sample, timestep, context, *args, **kwargs)
        model.unet = recording
        result = engine.generate(request)
    assert timesteps == [999 - 140 * i for i in range(STEPS)]
    assert calls.rows == [2 if cfg == 1.0 else 4] * STEPS  # CFG 1: no uncond batch
    expected = diffusers_lcm(src, [42, 43], timesteps, cfg)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(result.float_images, expected))
    assert diff <= TOLERANCE
    assert float(np.std(result.float_images[0])) > 1e-3
