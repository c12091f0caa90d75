"""Random-weight SDXL base and refiner models in diffusers layout, deterministically (the tests' models).

The real SDXL structure shrunk: the base has two text encoders (a CLIP ViT-L-like `CLIPTextModel` and an
OpenCLIP-bigG-like `CLIPTextModelWithProjection`), whose penultimate hidden states are concatenated for the
UNet's cross-attention (32 + 64 here, 768 + 1280 in SDXL) and whose second's projected pooled output, with six
size ids (original size, crop top-left, target size), forms the UNet's "text_time" added embedding. The
refiner has only the second encoder and five ids (original size, crop, aesthetic score). Scheduler, VAE
scaling factor and `force_zeros_for_empty_prompt` are SDXL's own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

# SDXL 1.0's scheduler configuration (EulerDiscrete over the scaled-linear betas).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "trained_betas": None,
}
SDXL_VAE_SCALING = 0.13025

# Tiny sizes: CLIP-L-like 32 wide, OpenCLIP-bigG-like 64 wide with a 32-wide projection.
CLIP_L_WIDTH, OPEN_CLIP_WIDTH, POOLED_WIDTH, TIME_ID_WIDTH = 32, 64, 32, 8
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5


def _text_config(width: int, projection: int) -> dict:
    return dict(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=49408, max_position_embeddings=77, projection_dim=projection,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")


def _unet(cross_dim: int, time_ids: int):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=POOLED_WIDTH + time_ids * TIME_ID_WIDTH)


def _vae():
    from diffusers import AutoencoderKL
    channels = (32, 64, 64, 64)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=SDXL_VAE_SCALING,
                         force_upcast=False)


def build_sdxl(out: Path, seed: int = 0, cache_dir: Path | None = None, tokenizer_from: Path | None = None,
               refiner: bool = False) -> Path:
    """Write a tiny SDXL base (or, with `refiner`, refiner) pipeline to `out`; same seed, same weights."""
    import torch
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models_export.tiny import build_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the weights depend on the seed and the creation order below: keep both
    if refiner:
        unet = _unet(OPEN_CLIP_WIDTH, REFINER_TIME_IDS)
    else:
        unet = _unet(CLIP_L_WIDTH + OPEN_CLIP_WIDTH, BASE_TIME_IDS)
    vae = _vae()
    text_encoder = None if refiner else CLIPTextModel(CLIPTextConfig(**_text_config(CLIP_L_WIDTH, CLIP_L_WIDTH)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(OPEN_CLIP_WIDTH, POOLED_WIDTH)))
    staging = out / ".tokenizer-build"
    build_tokenizer(staging, cache_dir, tokenizer_from)
    tokenizer = CLIPTokenizer.from_pretrained(str(staging))
    # OpenCLIP pads with token 0 ("!"), as SDXL's tokenizer_2 does.
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(staging), pad_token="!")
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def build_tiny_sdxl(out: Path, size: str = "tiny", seed: int = 0, cache_dir: Path | None = None,
                    tokenizer_from: Path | None = None, architecture: str = "sdxl") -> Path:
    """tiny.BUILDERS' entry for "sdxl" and "sdxl-refiner" (one size: tiny)."""
    if size != "tiny":
        from models_export.onnx_export import ExportError
        raise ExportError(f"the {architecture} test model comes in size 'tiny' only, not {size!r}")
    return build_sdxl(out, seed=seed, cache_dir=cache_dir, tokenizer_from=tokenizer_from,
                      refiner=architecture == "sdxl-refiner")
