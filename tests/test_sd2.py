"""SD 2.x: the tiny epsilon and v-prediction models give diffusers' images, and CFG 1 runs no uncond batch.

The references are diffusers' own StableDiffusionPipeline on the same tiny model and the same initial noise
(`latents=`): Euler with the schedule A1111 uses (k-diffusion's Uniform sigmas, handed to diffusers'
EulerDiscreteScheduler as custom sigmas), and DDIM on A1111's grid, which is diffusers' leading grid without
its last step (A1111 stops at t = 1). diffusers pads prompts with the tokenizer's pad token "!" (id 0), the
OpenCLIP padding A1111 uses for SD 2.x, and reads v or ε from the scheduler config.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.rng import ImageRNG

from .sd2_models import diffusers_model, exported_model

TOLERANCE = 1e-4
STEPS, CFG, SIZE = 20, 7.5, 64
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"
KINDS = {"sd2": "epsilon", "sd2-v": "v_prediction"}


@pytest.fixture(scope="module", params=list(KINDS))
def sd2(request, tmp_path_factory):
    """(kind, ONNX model folder, diffusers folder, engine) for one tiny SD 2.x model."""
    onnx_dir = exported_model(tmp_path_factory, request.param)
    return request.param, onnx_dir, diffusers_model(tmp_path_factory, request.param), Engine(onnx_dir)


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(diffusers_dir):
        from diffusers import StableDiffusionPipeline
        if diffusers_dir not in cache:
            cache[diffusers_dir] = StableDiffusionPipeline.from_pretrained(
                str(diffusers_dir), safety_checker=None, requires_safety_checker=False).to(torch.float32)
            cache[diffusers_dir].set_progress_bar_config(disable=True)
        return cache[diffusers_dir]
    return get


def _noise(seeds):
    return ImageRNG((4, SIZE // 8, SIZE // 8), seeds, source="GPU").first()


def _uniform_sigmas(pipe, steps):
    """A1111's Automatic (Uniform) schedule: k-diffusion's `get_sigmas` over the model's float32 ᾱ."""
    from .reference import load_k_diffusion
    _, external = load_k_diffusion()
    alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
    return external.DiscreteEpsDDPMDenoiser(torch.nn.Identity(), alphas, quantize=False).get_sigmas(steps)


@torch.no_grad()
def diffusers_euler(pipe, seeds, cfg=CFG, steps=STEPS, prompt=PROMPT):
    from diffusers import EulerDiscreteScheduler
    saved = pipe.scheduler
    # "linspace" spacing: diffusers then starts from noise·σ_max, as k-diffusion does (not sqrt(σ_max² + 1)).
    pipe.scheduler = EulerDiscreteScheduler.from_config(saved.config, timestep_spacing="linspace")
    try:
        out = pipe(prompt=[prompt] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE,
                   guidance_scale=cfg, latents=torch.from_numpy(_noise(seeds)),
                   sigmas=_uniform_sigmas(pipe, steps).tolist(), output_type="np")
    finally:
        pipe.scheduler = saved
    return list(out.images)


@torch.no_grad()
def diffusers_ddim(pipe, seeds, cfg=CFG, steps=STEPS):
    from diffusers import DDIMScheduler
    saved = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(saved.config, clip_sample=False, timestep_spacing="leading",
                                               steps_offset=1, set_alpha_to_one=False)

    def stop_before_the_last_step(pipeline, i, t, kwargs):
        if i == steps - 2:  # A1111's DDIM makes steps − 1 model calls, ending at t = 1
            pipeline._interrupt = True
        return kwargs

    try:
        out = pipe(prompt=[PROMPT] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE,
                   guidance_scale=cfg, latents=torch.from_numpy(_noise(seeds)), num_inference_steps=steps,
                   eta=0.0, output_type="np", callback_on_step_end=stop_before_the_last_step)
    finally:
        pipe.scheduler = saved
    return list(out.images)


def _request(sampler, seed, batch_size=1, **kw):
    kw = {"cfg_scale": CFG, **kw}
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                             sampler_name=sampler, seed=seed, batch_size=batch_size, **kw)


def _max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


def test_tiny_sd2_manifests_declare_family_and_prediction(sd2):
    kind, onnx_dir, _, engine = sd2
    manifest = json.loads((onnx_dir / "sdfc.json").read_text())
    assert (manifest["architecture"], manifest["prediction_type"]) == ("sd2", KINDS[kind])
    assert "distilled" not in manifest
    # A1111 has no CLIP skip for OpenCLIP: the export adds no clip_skip_N outputs, and the option is ignored
    # (a client's stored CLIP skip 2, meant for SD 1.x models, must not break SD 2.x requests).
    assert "clip_skip_outputs" not in manifest
    info = engine.current
    assert (info.arch.name, info.arch.default_size, info.prediction_type) == ("sd2", 768, KINDS[kind])
    assert info.clip_skip_problem(2) is None
    tokens = np.array([[49406, 320, 49407] + [0] * 74])
    assert np.array_equal(engine.load().encode_tokens(tokens, clip_skip=2), engine.load().encode_tokens(tokens))


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_txt2img_matches_diffusers(sd2, pipelines, sampler):
    _, _, diffusers_dir, engine = sd2
    pipe = pipelines(diffusers_dir)
    result = engine.generate(_request(sampler, seed=1234, batch_size=2))
    expected = (diffusers_euler if sampler == "Euler" else diffusers_ddim)(pipe, [1234, 1235])
    assert _max_diff(result.float_images, expected) <= TOLERANCE
    assert float(np.std(result.float_images[0])) > 1e-3  # not two blanks


def test_prediction_type_changes_the_image(sd2, tmp_path):
    """The manifest's prediction type is what the denoiser uses: the same weights read the other way differ."""
    kind, onnx_dir, _, engine = sd2
    import shutil
    other = tmp_path / "other"
    shutil.copytree(onnx_dir, other)
    manifest = json.loads((other / "sdfc.json").read_text())
    manifest["prediction_type"] = "epsilon" if kind == "sd2-v" else "v_prediction"
    (other / "sdfc.json").write_text(json.dumps(manifest))
    ours = engine.generate(_request("Euler", seed=5)).float_images
    flipped = Engine(other).generate(_request("Euler", seed=5)).float_images
    assert _max_diff(ours, flipped) > 1e-2


def test_openclip_prompts_are_padded_with_zero(sd2):
    from sdfc.engine.conditioning import PromptEncoder
    from sdfc.engine.prompt_chunks import chunk_batches
    _, _, _, engine = sd2
    encoder = PromptEncoder(engine.load())
    tokens, _ = chunk_batches([encoder.chunker.chunks("a cat")], encoder.chunker)[0]
    row = tokens[0].tolist()
    end = row.index(49407)
    assert row[0] == 49406 and row[end + 1:] == [0] * (76 - end)


class UNetCalls:
    """Counts the rows of every UNet batch of a loaded model."""

    def __init__(self, model):
        self.model, self.rows, self._unet = model, [], model.unet

    def __enter__(self):
        def counting(sample, timestep, context, *args, **kwargs):
            self.rows.append(sample.shape[0])
            return self._unet(sample, timestep, context, *args, **kwargs)
        self.model.unet = counting
        return self

    def __exit__(self, *exc):
        del self.model.unet


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_cfg_1_runs_no_uncond_batch_and_equals_cond_only(sd2, pipelines, sampler):
    kind, _, diffusers_dir, engine = sd2
    with UNetCalls(engine.load()) as calls:
        result = engine.generate(_request(sampler, seed=21, batch_size=2, cfg_scale=1.0))
    assert calls.rows == [2] * (STEPS - (sampler == "DDIM"))  # one cond row per image, no uncond rows
    # diffusers runs no CFG at guidance 1 either: the cond-only prediction, image for image.
    pipe = pipelines(diffusers_dir)
    expected = (diffusers_euler if sampler == "Euler" else diffusers_ddim)(pipe, [21, 22], cfg=1.0)
    assert _max_diff(result.float_images, expected) <= TOLERANCE


def test_cfg_1_with_weighted_subprompts_still_runs_uncond(sd2):
    _, _, _, engine = sd2
    with UNetCalls(engine.load()) as calls:
        engine.generate(GenerationRequest(prompt="a cat AND a dog :0.5", width=SIZE, height=SIZE, steps=3,
                                          cfg_scale=1.0, sampler_name="Euler", seed=3))
    assert calls.rows == [3] * 3  # two cond rows and the uncond row: a weight ≠ 1 needs the uncond output
