"""SDXL base and refiner in the torch-free engine, proven against diffusers' SDXL pipelines on tiny models.

Both sides get the same model (built from a seed, exported by `sdfc export`'s own code), the same initial noise
(`latents=`; img2img: diffusers' noise draw replaced by ours) and the same sigmas: k-diffusion's uniform
schedule, which is what A1111's Euler walks, handed to diffusers' EulerDiscreteScheduler as custom sigmas.
Decoded float images must agree to 1e-4.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdfc.engine import Engine, GenerationRequest, InvalidRequestError
from sdfc.engine import schedules
from sdfc.engine.rng import ImageRNG
from sdfc.engine.sdxl import RefinerSwitch, SizeConditioning

from .conftest import TINY_MODEL
from .reference import load_k_diffusion

TOLERANCE = 1e-4
SIZE, STEPS, CFG = 64, 12, 7.0
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"
BASE, REFINER = "tiny-sdxl", "tiny-sdxl-refiner"


@pytest.fixture(scope="session")
def sdxl_models(tmp_path_factory):
    """(models folder with both ONNX exports, base diffusers folder, refiner diffusers folder)."""
    from models_export.onnx_export import export_diffusers
    from models_export.tiny_sdxl import build_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = TINY_MODEL / "tokenizer"
    base = build_sdxl(root / "diffusers" / BASE, seed=0, tokenizer_from=tokenizer)
    refiner = build_sdxl(root / "diffusers" / REFINER, seed=1, tokenizer_from=tokenizer, refiner=True)
    models = root / "models"
    export_diffusers(base, models / BASE, name=BASE, validate=False)
    export_diffusers(refiner, models / REFINER, name=REFINER, validate=False)
    return models, base, refiner


@pytest.fixture(scope="module")
def engine(sdxl_models):
    return Engine(sdxl_models[0])


@pytest.fixture(scope="module")
def pipelines(sdxl_models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    _, base_dir, refiner_dir = sdxl_models
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, add_watermarker=False)
    base_img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(base_dir, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, add_watermarker=False)
    for pipe in (base, base_img2img, refiner):
        # "linspace": with custom sigmas, the initial noise is scaled by sigmas[0] (k-diffusion's x = noise·σ₀).
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)
    return {"base": base, "img2img": base_img2img, "refiner": refiner}


def kdiffusion_sigmas(pipe, steps: int = STEPS) -> list[float]:
    """k-diffusion's uniform schedule (A1111's Euler, Automatic) over this model's noise levels."""
    _, external = load_k_diffusion()
    denoiser = external.DiscreteEpsDDPMDenoiser(torch.nn.Identity(), pipe.scheduler.alphas_cumprod.float(),
                                                quantize=False)
    return denoiser.get_sigmas(steps).tolist()


def engine_noise(seed: int, width: int = SIZE, height: int = SIZE) -> torch.Tensor:
    return torch.from_numpy(ImageRNG((4, height // 8, width // 8), [seed], source="GPU").first())


def request(**kw) -> GenerationRequest:
    values = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                  sampler_name="Euler", model=BASE)
    values.update(kw)
    return GenerationRequest(**values)


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())


def test_export_declares_sdxl_and_its_inputs(sdxl_models):
    import onnxruntime as ort

    models, _, _ = sdxl_models
    for name, architecture in ((BASE, "sdxl"), (REFINER, "sdxl-refiner")):
        manifest = json.loads((models / name / "sdfc.json").read_text())
        assert manifest["architecture"] == architecture
        assert "clip_skip_outputs" not in manifest  # SDXL encodes at fixed layers (A1111)
        unet = ort.InferenceSession(str(models / name / "unet" / "model.onnx"))
        inputs = {i.name: i.shape for i in unet.get_inputs()}
        assert inputs["time_ids"][1] == (6 if architecture == "sdxl" else 5)
        assert inputs["text_embeds"][1] == 32
        encoder = ort.InferenceSession(str(models / name / "text_encoder_2" / "model.onnx"))
        assert {"text_embeds", "hidden_states.2"} <= {o.name for o in encoder.get_outputs()}
        assert (models / name / "tokenizer_2" / "tokenizer.json").is_file()
    assert not (models / REFINER / "text_encoder").exists() and (models / BASE / "text_encoder").is_dir()


@pytest.mark.parametrize("width,height,crop", [(64, 64, (0, 0)), (96, 64, (16, 8))])
def test_txt2img_matches_diffusers(engine, pipelines, width, height, crop):
    top, left = crop
    result = engine.generate(request(seed=11, width=width, height=height,
                                     sdxl=SizeConditioning(sdxl_crop_top=top, sdxl_crop_left=left)))
    pipe = pipelines["base"]
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, guidance_scale=CFG,
                    sigmas=kdiffusion_sigmas(pipe), latents=engine_noise(11, width, height),
                    crops_coords_top_left=(top, left), output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE
    assert float(np.std(result.float_images[0])) > 1e-3


def test_long_prompts_and_emphasis_as_a1111(engine, pipelines):
    """Past 75 tokens diffusers truncates, so the reference here is the two torch encoders run as A1111's SDXL
    conditioner does: each chunk through each encoder (penultimate layer; OpenCLIP padded with 0 after the
    first end token), emphasis per encoder with its own mean restored, chunks concatenated, the pooled
    output of the first chunk."""
    from sdfc.engine.sdxl import SDXLPromptEncoder

    prompt = ", ".join(["a (red:1.3) cat on a [blue] mat"] * 12)  # > 75 tokens: two chunks
    encoder = SDXLPromptEncoder(engine.load(BASE), SIZE, SIZE)
    hidden, pooled = encoder.encode([prompt], negative=False)
    assert hidden.shape == (1, 154, 96) and pooled.shape == (1, 32)
    pipe = pipelines["base"]
    parts, first_pooled = [], None
    for _, chunker in encoder.encoders:
        assert [c.tokens for c in chunker.chunks(prompt)] == [c.tokens for c in encoder.encoders[0][1].chunks(prompt)]
    for text_encoder, (spec, chunker) in zip((pipe.text_encoder, pipe.text_encoder_2), encoder.encoders):
        chunks = []
        for index, chunk in enumerate(chunker.chunks(prompt)):
            tokens = list(chunk.tokens)
            if not spec.pad_with_end_token:
                end = tokens.index(49407)
                tokens[end + 1:] = [0] * (len(tokens) - end - 1)
            with torch.no_grad():
                out = text_encoder(torch.tensor([tokens]), output_hidden_states=True)
            z = out.hidden_states[-2][0].numpy()
            weighted = z * np.asarray(chunk.multipliers, np.float32)[:, None]
            chunks.append(weighted * np.float32(z.mean(dtype=np.float64) / weighted.mean(dtype=np.float64)))
            if spec.pooled and index == 0:
                first_pooled = out.text_embeds[0].numpy()
        parts.append(np.concatenate(chunks))
    assert max_diff(hidden[0], np.concatenate(parts, axis=1)) <= 1e-4
    assert max_diff(pooled[0], first_pooled) <= 1e-5


def test_empty_negative_prompt_is_zeros_as_diffusers(engine, pipelines):
    # A1111's force_zero_negative_prompt; diffusers zeros the negative when none is given
    # (force_zeros_for_empty_prompt in the base's model_index.json).
    result = engine.generate(request(seed=5, negative_prompt=""))
    pipe = pipelines["base"]
    expected = pipe(PROMPT, negative_prompt=None, height=SIZE, width=SIZE, guidance_scale=CFG,
                    sigmas=kdiffusion_sigmas(pipe), latents=engine_noise(5), output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE
    # ...and that differs from encoding "" (diffusers' negative_prompt="").
    encoded = pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, guidance_scale=CFG,
                   sigmas=kdiffusion_sigmas(pipe), latents=engine_noise(5), output_type="np").images[0]
    assert max_diff(encoded, expected) > 1e-3


def test_img2img_matches_diffusers(engine, pipelines, monkeypatch):
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    init = Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    result = engine.generate(request(seed=99, init_images=[init], denoising_strength=0.6))
    pipe = pipelines["img2img"]
    pixels = torch.from_numpy(np.moveaxis(np.asarray(init, dtype=np.float32) / 255.0, 2, 0)[None] * 2 - 1)
    with torch.no_grad():  # the engine encodes to the posterior mean, as A1111
        latent = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = engine_noise(99)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: noise.clone())
    # A1111 runs t_enc + 1 = int(0.6·12) + 1 = 8 steps from sigma index 12 − 8 = 4; diffusers starts at
    # index steps − int(steps·strength): strength 8/12 selects the same start.
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, image=latent, strength=8 / STEPS, guidance_scale=CFG,
                    sigmas=kdiffusion_sigmas(pipe), output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE


SWITCH_AT = 0.5


def test_base_and_refiner_match_diffusers_handoff(engine, pipelines):
    base, refiner = pipelines["base"], pipelines["refiner"]
    sigmas = kdiffusion_sigmas(base)
    # A1111 switches before the first call whose sigma's nearest table index t has (999 − t)/1000 ≥ switch_at;
    # diffusers' base keeps the steps with timestep ≥ round(1000·(1 − denoising_end)) and the refiner takes the
    # rest. With 12 uniform steps, the timesteps near 500 are 545.0 and 454.1: both rules hand step 6 over.
    table = np.sqrt((1 - base.scheduler.alphas_cumprod.numpy()) / base.scheduler.alphas_cumprod.numpy())
    a1111_step = next(i for i, s in enumerate(sigmas[:-1])
                      if (999 - int(np.argmin(np.abs(table - s)))) / 1000 >= SWITCH_AT)
    base.scheduler.set_timesteps(sigmas=sigmas)
    diffusers_step = int((base.scheduler.timesteps >= round(1000 * (1 - SWITCH_AT))).sum())
    assert a1111_step == diffusers_step == 6

    result = engine.generate(request(seed=21, refiner_checkpoint=REFINER, refiner_switch_at=SWITCH_AT))
    latents = base(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=CFG, sigmas=sigmas,
                   latents=engine_noise(21), denoising_end=SWITCH_AT, output_type="latent").images
    expected = refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, denoising_start=SWITCH_AT,
                       guidance_scale=CFG, sigmas=sigmas, output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE
    refiner_title = engine.find_model(REFINER).title
    assert result.extra_generation_params["Refiner"] == refiner_title
    assert result.extra_generation_params["Refiner switch at"] == SWITCH_AT
    # The refiner really changed the image.
    alone = engine.generate(request(seed=21))
    assert max_diff(alone.float_images[0], result.float_images[0]) > 1e-3


def test_refiner_switch_extremes(engine):
    # switch_at 1: the completed ratio never reaches 1 ((999 − 0)/1000): the base alone, no infotext entries.
    never = engine.generate(request(seed=3, steps=4, refiner_checkpoint=REFINER, refiner_switch_at=1.0))
    base = engine.generate(request(seed=3, steps=4))
    assert np.array_equal(never.float_images[0], base.float_images[0])
    assert "Refiner" not in never.extra_generation_params
    # switch_at null (A1111: no threshold) or 0: the refiner from the first call, its VAE decoding: the refiner
    # alone with the same noise.
    for at in (None, 0.0):
        at_once = engine.generate(request(seed=3, steps=4, refiner_checkpoint=REFINER, refiner_switch_at=at))
        alone = engine.generate(request(seed=3, steps=4, model=REFINER))
        assert np.array_equal(at_once.float_images[0], alone.float_images[0])
        assert at_once.extra_generation_params["Refiner switch at"] == at


def test_switch_rule_reads_the_nearest_table_sigma(engine):
    model = engine.load(BASE)
    switch = RefinerSwitch(model=None, switch_at=0.8)

    class Denoiser:
        pass

    denoiser = Denoiser()
    denoiser.model = model
    table = model.sigmas.sigmas
    assert switch.completed_ratio(denoiser, sigma=table[200]) == pytest.approx(0.799)
    assert switch.completed_ratio(denoiser, sigma=table[199] * 1.0001) == pytest.approx(0.8)
    assert switch.completed_ratio(denoiser, timestep=199) == pytest.approx(0.8)


def test_refiner_size_conditioning_uses_aesthetic_scores():
    size = SizeConditioning(sdxl_crop_top=4, sdxl_crop_left=2, sdxl_refiner_low_aesthetic_score=1.5,
                            sdxl_refiner_high_aesthetic_score=7.0)
    assert size.time_ids(False, 96, 64, negative=False).tolist() == [64, 96, 4, 2, 64, 96]
    assert size.time_ids(True, 96, 64, negative=False).tolist() == [64, 96, 4, 2, 7.0]
    assert size.time_ids(True, 96, 64, negative=True).tolist() == [64, 96, 4, 2, 1.5]


def test_refiner_aesthetic_score_options_reach_the_unet(engine, pipelines):
    size = SizeConditioning(sdxl_refiner_low_aesthetic_score=1.0, sdxl_refiner_high_aesthetic_score=8.0)
    result = engine.generate(request(seed=8, steps=4, model=REFINER, sdxl=size))
    refiner = pipelines["refiner"]
    sigmas = kdiffusion_sigmas(refiner, 4)
    # The refiner alone from pure noise: diffusers' img2img from σ₀ (denoising_start 0 adds no noise).
    expected = refiner(PROMPT, negative_prompt=NEGATIVE, image=engine_noise(8) * sigmas[0], denoising_start=1e-9,
                       guidance_scale=CFG, sigmas=sigmas, aesthetic_score=8.0, negative_aesthetic_score=1.0,
                       output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE


def test_align_your_steps_uses_sdxl_sigmas(engine, pipelines):
    model = engine.load(BASE)
    ays = schedules.find_schedule("Align Your Steps")
    sdxl = ays.sigmas(11, model.sigmas, sdxl=True)  # 11 steps: AYS's own points, then 0
    assert np.allclose(sdxl[:-1], schedules.AYS_SDXL) and sdxl[-1] == 0
    assert not np.allclose(ays.sigmas(11, model.sigmas), sdxl)
    # The pipeline asks for them on an SDXL model: its image is diffusers' on AYS's SDXL sigmas.
    result = engine.generate(request(seed=2, steps=11, scheduler="Align Your Steps"))
    assert result.schedule_label == "Align Your Steps"
    pipe = pipelines["base"]
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=CFG,
                    sigmas=[*schedules.AYS_SDXL, 0.0], latents=engine_noise(2), output_type="np").images[0]
    assert max_diff(result.float_images[0], expected) <= TOLERANCE


def test_unknown_refiner_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="refiner_checkpoint"):
        engine.generate(request(steps=2, refiner_checkpoint="no-such-model"))


def test_unsupported_sdxl_features_are_refused(engine, tmp_path):
    with pytest.raises(InvalidRequestError, match="LoRA"):
        engine.generate(request(steps=2, prompt="a cat <lora:style:0.8>"))
    with pytest.raises(InvalidRequestError, match="hires fix"):
        from sdfc.engine.hires import HiresFix
        engine.generate(request(steps=2, refiner_checkpoint=REFINER, refiner_switch_at=0.5, hires=HiresFix()))
    # CLIP skip is ignored on SDXL, as A1111 does without its sdxl_clip_l_skip option.
    assert np.array_equal(engine.generate(request(steps=2, seed=5, clip_skip=2)).float_images[0],
                          engine.generate(request(steps=2, seed=5)).float_images[0])


@pytest.fixture(scope="module")
def server(sdxl_models, tmp_path_factory):
    from .live_server import start_server

    srv = start_server(tmp_path_factory.mktemp("sdxl-server"), env={"SDFC_MODELS_DIR": str(sdxl_models[0])})
    yield srv
    srv.stop()


def test_http_refiner_request_writes_a1111s_infotext(server, engine):
    import base64
    import io

    import requests

    from .live_server import PASSWORD, USER

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    body = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, seed=4,
                sampler_name="Euler", refiner_checkpoint=REFINER, refiner_switch_at=0.5,
                override_settings={"sd_model_checkpoint": BASE})
    response = session.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    refiner_title = engine.find_model(REFINER).title
    assert f", Refiner: {refiner_title}, Refiner switch at: 0.5," in info["infotexts"][0]
    assert info["sd_model_name"] == BASE
    # The image is the engine's with the same request.
    expected = engine.generate(request(seed=4, steps=6, refiner_checkpoint=REFINER, refiner_switch_at=0.5))
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))

    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    img2img = dict(body, init_images=[base64.b64encode(buffer.getvalue()).decode()], denoising_strength=0.7)
    response = session.post(f"{server.url}/sdapi/v1/img2img", json=img2img, timeout=120)
    assert response.status_code == 200, response.text
    assert f"Refiner: {refiner_title}, Refiner switch at: 0.5" in json.loads(response.json()["info"])["infotexts"][0]

    for mode in ("txt2img", "img2img"):
        unknown = dict(img2img if mode == "img2img" else body, refiner_checkpoint="no-such-refiner")
        response = session.post(f"{server.url}/sdapi/v1/{mode}", json=unknown, timeout=60)
        assert response.status_code == 400, response.text
        assert "no-such-refiner" in response.text

    # A1111's create/embedding on an SDXL model: refused (an SD 1.x-style file would not fit its two encoders).
    response = session.post(f"{server.url}/sdapi/v1/create/embedding", timeout=60,
                            json={"name": "sdxl-emb", "num_vectors_per_token": 1, "init_text": "a"})
    assert response.status_code == 400 and "not supported yet" in response.json()["detail"], response.text


def test_embeddings_named_in_sdxl_prompts_are_refused(sdxl_models, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "mystyle.safetensors").write_bytes(b"not read for SDXL")
    engine = Engine(sdxl_models[0], embeddings_dir=folder)
    with pytest.raises(InvalidRequestError, match="mystyle"):
        engine.generate(request(steps=1, prompt="a cat, mystyle"))
    with pytest.raises(InvalidRequestError, match="mystyle"):
        engine.generate(request(steps=1, negative_prompt="(mystyle:1.2)"))
    assert engine.generate(request(steps=1, prompt="a cat, my style")).images


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sdxl", "sdxl-refiner"])
def test_export_tiny_cli_builds_sdxl(tmp_path, architecture):
    from models_export.cli import main

    out = tmp_path / architecture
    assert main(["tiny", "--architecture", architecture, "--out", str(out), "--no-validate",
                 "--tokenizer-from", str(TINY_MODEL / "tokenizer")]) == 0
    assert json.loads((out / "sdfc.json").read_text())["architecture"] == architecture
    engine = Engine(out)
    assert engine.generate(request(steps=2, model=None)).images[0].size == (SIZE, SIZE)


def test_live_previews_use_the_sdxl_latent_colours(engine):
    """The job's control carries its model family's latent → RGB rows (architectures.py) for /progress and
    task previews; an SDXL latent previewed with SD 1.x's rows would have other colours."""
    from sdfc.api.preview import preview_png
    from sdfc.engine import JobControl
    from sdfc.engine.architectures import ARCHITECTURES

    control = JobControl()
    engine.generate(request(steps=2, seed=3), control)
    assert control.preview_factors == ARCHITECTURES["sdxl"].latent_rgb_factors != ARCHITECTURES["sd1"].latent_rgb_factors
    assert preview_png(control.current_latent, control.preview_factors) != preview_png(control.current_latent)
