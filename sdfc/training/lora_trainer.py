"""LoRA training for SD 1.x: the standard noise-prediction loss, on LoRA weights of the UNet's attention
projections (and, optionally, of the text encoder's), everything else frozen.

Each step: latents of a batch of images (from the VAE once, at the start: kohya's cache_latents), noise and a
timestep per image from the model's DDPM schedule (its scheduler config's betas and prediction type), the UNet's
prediction for the noised latents under the captions' conditioning, MSE against the noise (or the velocity, for a
v-prediction model). AdamW at a constant rate, gradients clipped to norm 1 (kohya's defaults). A seed fixes
everything random: the LoRA's initial weights, the image order, the noise and the timesteps.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import dataset, kohya

log = logging.getLogger("sdfc.training")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MAX_GRAD_NORM = 1.0


class TrainingError(ValueError):
    """A training run that cannot start: a base model that is not a diffusers SD folder, a bad size."""


@dataclass
class LoraTrainingConfig:
    base: Path                      # the model in diffusers form (model_index.json, unet/, vae/, …)
    images: Path                    # images, each with an optional .txt caption beside it
    output: Path                    # the .safetensors file to write
    prompt: str | None = None       # the caption of images without a .txt
    rank: int = 8
    alpha: float | None = None      # None: alpha = rank (scale 1)
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # None: the UNet only
    steps: int = 500
    resolution: int = 512
    batch_size: int = 1
    seed: int = 0
    buckets: bool = True
    noise_offset: float = 0.0
    max_images: int | None = None
    device: str | None = None       # None: cuda when there is one

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainingResult:
    path: Path | None               # None when cancelled (nothing is written)
    steps_done: int
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    metadata: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


@dataclass
class _Models:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler: object
    size_step: int


def load_base_and_images(config):
    """(device, base model, training images) for a LoRA or embedding run: the resolution must suit the model."""
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_base(config.base, device)
    if config.resolution % models.size_step:
        raise TrainingError(f"resolution must be a multiple of {models.size_step} for this model, "
                            f"got {config.resolution}")
    images = dataset.load_dataset(Path(config.images), config.prompt, config.resolution, models.size_step,
                                  config.buckets, config.max_images)
    return device, models, images


def load_base(base: Path, device: str):
    """The diffusers folder's parts, frozen; its DDPM training schedule from its scheduler config."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base)
    missing = [part for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (base / part).exists()]
    if missing:
        raise TrainingError(f"{base.name!r} is not a diffusers Stable Diffusion folder (missing "
                            f"{', '.join(missing)}); an ONNX export cannot be trained: point at the diffusers "
                            "model it was exported from")
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet")).to(device)
    vae = AutoencoderKL.from_pretrained(str(base / "vae")).to(device)
    text_encoder = CLIPTextModel.from_pretrained(str(base / "text_encoder")).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(str(base / "scheduler"))
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
    # Both sides of a bucket must survive the VAE's and then the UNet's downsampling (64 for SD 1.x).
    size_step = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)
    return _Models(tokenizer, text_encoder, vae, unet, scheduler, size_step)


def train_lora(config: LoraTrainingConfig, progress: Callable[[int, float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> TrainingResult:
    """Train, then write the LoRA; `progress(step, loss)` after every step, `cancelled()` checked before each
    (a cancelled run writes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    started_at = time.time()
    device, models, images = load_base_and_images(config)

    torch.manual_seed(config.seed)  # the LoRA's initial down matrices
    unet = inject_adapter_in_model(_lora_config(LoraConfig, config, UNET_TARGETS), models.unet)
    groups = [{"params": _trainable(unet), "lr": config.learning_rate}]
    text_encoder = models.text_encoder
    train_te = config.text_encoder_lr is not None
    if train_te:
        text_encoder = inject_adapter_in_model(_lora_config(LoraConfig, config, TEXT_ENCODER_TARGETS), text_encoder)
        groups.append({"params": _trainable(text_encoder), "lr": config.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups)

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    latents = _cache_latents(models.vae, images, generator, device)
    tokens = {img.path: _tokens(models.tokenizer, img.caption).to(device) for img in images}
    fixed_conditioning = None if train_te else {p: text_encoder(ids)[0].detach() for p, ids in tokens.items()}
    schedule = models.scheduler

    order = np.random.default_rng(config.seed)
    result = TrainingResult(None, 0)
    epoch: list = []
    unet.train()
    while result.steps_done < config.steps:
        if cancelled is not None and cancelled():
            result.cancelled = True
            break
        if not epoch:
            epoch = dataset.batches(images, config.batch_size, order)
        batch = epoch.pop(0)
        x0 = torch.cat([latents[img.path] for img in batch])
        if fixed_conditioning is not None:
            cond = torch.cat([fixed_conditioning[img.path] for img in batch])
        else:
            cond = text_encoder(torch.cat([tokens[img.path] for img in batch]))[0]
        loss = noise_prediction_loss(unet, schedule, x0, cond, generator, config.noise_offset)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], MAX_GRAD_NORM)
        optimizer.step()
        result.steps_done += 1
        result.losses.append(float(loss.detach()))
        if progress is not None:
            progress(result.steps_done, result.losses[-1])
    if result.cancelled:
        log.info("LoRA training cancelled at step %d of %d", result.steps_done, config.steps)
        return result

    weights = {"unet": get_peft_model_state_dict(unet)}
    if train_te:
        weights["text_encoder"] = get_peft_model_state_dict(text_encoder)
    buckets: dict = {}
    for img in images:
        buckets[img.bucket] = buckets.get(img.bucket, 0) + 1
    result.metadata = kohya.metadata(
        output_name=Path(config.output).stem, rank=config.rank, alpha=config.network_alpha,
        learning_rate=config.learning_rate, text_encoder_lr=config.text_encoder_lr, max_train_steps=config.steps,
        steps_done=result.steps_done, resolution=config.resolution, batch_size=config.batch_size,
        seed=config.seed, num_images=len(images), bucket_counts=buckets,
        tag_frequency=dataset.tag_frequency(images), dataset_name=Path(config.images).name,
        base_model=Path(config.base).name, started_at=started_at, finished_at=time.time(),
        use_buckets=config.buckets, noise_offset=config.noise_offset)
    result.path = _write(Path(config.output), kohya.kohya_tensors(weights, config.network_alpha), result.metadata)
    log.info("LoRA written to %s after %d steps (loss %.5f)", result.path, result.steps_done, result.final_loss)
    return result


def noise_prediction_loss(unet, schedule, x0, cond, generator, noise_offset: float = 0.0):
    """MSE between the UNet's prediction for x0 noised at a random timestep and the noise (the velocity, for
    a v-prediction model); noise and timesteps from `generator` (on the CPU: the same on every device)."""
    import torch

    device = x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator).to(device)
    t = torch.randint(0, schedule.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
    a = schedule.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if schedule.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    predicted = unet(noisy, t, encoder_hidden_states=cond).sample
    return torch.nn.functional.mse_loss(predicted.float(), target.float())


def _lora_config(LoraConfig, config: LoraTrainingConfig, targets: list[str]):
    # "gaussian": down ~ N(0, 1/rank), up = 0, so that training starts from the base model exactly.
    return LoraConfig(r=config.rank, lora_alpha=config.network_alpha, target_modules=targets,
                      init_lora_weights="gaussian", lora_dropout=0.0)


def _trainable(model) -> list:
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def _tokens(tokenizer, caption: str):
    return tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _cache_latents(vae, images: list, generator, device: str) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for img in images:
            pixels = torch.from_numpy(dataset.pixels(img))[None].to(device)
            dist = vae.encode(pixels).latent_dist
            sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device)
            out[img.path] = sample * vae.config.scaling_factor
    return out


def _write(path: Path, tensors: dict, metadata: dict) -> Path:
    """Atomically: a half-written LoRA in the folder the server lists would be a broken model."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".training-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
