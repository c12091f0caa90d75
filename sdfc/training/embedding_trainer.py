"""Textual-inversion training for SD 1.x: a few new token vectors learnt so that captions naming them
reconstruct the images; the UNet, VAE and the rest of the text encoder stay frozen.

The name's vectors enter CLIP as new tokens appended to the tokenizer (one per vector), their rows initialised
from the init text's token vectors (cycled when it has fewer tokens, zeros when it has none, as A1111's create
embedding does). Captions name the embedding with `[name]` (A1111's template word) or its name; a caption that
does neither gets it in front. The loss is the LoRA trainer's (lora_trainer.noise_prediction_loss). Written as
A1111 reads it: a `.safetensors` with one `emb_params` tensor (vectors × width) named after the file.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import dataset
from .lora_trainer import (TrainingError, _cache_latents, _tokens, _write, load_base_and_images,
                           noise_prediction_loss)

log = logging.getLogger("sdfc.training")


@dataclass
class EmbeddingTrainingConfig:
    base: Path
    images: Path
    output: Path                    # <name>.safetensors: the name is the word prompts use
    prompt: str | None = None       # the caption of images without a .txt
    init_text: str = "*"
    num_vectors: int = 1
    learning_rate: float = 5e-3     # A1111's default
    steps: int = 500
    resolution: int = 512
    batch_size: int = 1
    seed: int = 0
    buckets: bool = True
    max_images: int | None = None
    device: str | None = None
    # Rows to start from instead of the init text's (num_vectors × width), and the steps they already had: A1111's
    # train embedding (sdfc/api/training.py) continues an embedding that create embedding wrote.
    init_vectors: np.ndarray | None = None
    start_step: int = 0


@dataclass
class EmbeddingResult:
    path: Path | None
    steps_done: int
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def caption_with(caption: str, name: str, placeholder: str) -> str:
    """The caption with the embedding's tokens where it names the embedding (`[name]` or the name itself)."""
    named = re.compile(r"\[name\]|(?<![\w-])" + re.escape(name) + r"(?![\w-])")
    return named.sub(placeholder, caption) if named.search(caption) else f"{placeholder}, {caption}"


def train_embedding(config: EmbeddingTrainingConfig, progress: Callable[[int, float], None] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> EmbeddingResult:
    import torch

    from ..jobs.training_requests import MAX_VECTORS

    if not 1 <= config.num_vectors <= MAX_VECTORS:
        raise TrainingError(f"num_vectors must be from 1 to {MAX_VECTORS}, got {config.num_vectors}")
    device, models, images = load_base_and_images(config)
    name = Path(config.output).stem
    tokenizer, text_encoder = models.tokenizer, models.text_encoder

    placeholders = [f"<sdfc-ti-{i}>" for i in range(config.num_vectors)]
    init_ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
    tokenizer.add_tokens(placeholders)
    new_ids = tokenizer.convert_tokens_to_ids(placeholders)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set below
    table = text_encoder.get_input_embeddings().weight
    if config.init_vectors is not None and tuple(config.init_vectors.shape) != (config.num_vectors, table.shape[1]):
        raise TrainingError(f"the embedding is {config.init_vectors.shape[0]}x{config.init_vectors.shape[1]}; "
                            f"this model's text encoder takes {config.num_vectors}x{table.shape[1]}")
    with torch.no_grad():
        for i, row in enumerate(new_ids):
            if config.init_vectors is not None:
                table[row] = torch.from_numpy(np.asarray(config.init_vectors[i], np.float32)).to(table.dtype)
            else:
                table[row] = table[init_ids[i % len(init_ids)]] if init_ids else 0.0
    original = table.detach().clone()
    trained_rows = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
    trained_rows[new_ids] = True
    table.requires_grad_(True)
    optimizer = torch.optim.AdamW([table], lr=config.learning_rate)

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    latents = _cache_latents(models.vae, images, generator, device)
    tokens = {img.path: _tokens(tokenizer, caption_with(img.caption, name, " ".join(placeholders))).to(device)
              for img in images}
    order = np.random.default_rng(config.seed)
    result = EmbeddingResult(None, 0)
    epoch: list = []
    while result.steps_done < config.steps:
        if cancelled is not None and cancelled():
            result.cancelled = True
            return result
        if not epoch:
            epoch = dataset.batches(images, config.batch_size, order)
        batch = epoch.pop(0)
        x0 = torch.cat([latents[img.path] for img in batch])
        cond = text_encoder(torch.cat([tokens[img.path] for img in batch]))[0]
        loss = noise_prediction_loss(models.unet, models.scheduler, x0, cond, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # only the new rows learn: the vocabulary's own vectors are put back
            table[~trained_rows] = original[~trained_rows]
        result.steps_done += 1
        result.losses.append(float(loss.detach()))
        if progress is not None:
            progress(result.steps_done, result.losses[-1])
    vectors = table.detach()[new_ids].to(torch.float32).cpu().contiguous()
    metadata = {"name": name, "step": str(config.start_step + result.steps_done),
                "sd_checkpoint_name": Path(config.base).name, "init_text": config.init_text, "learning_rate": str(config.learning_rate),
                "trained_at": str(time.time())}
    result.path = _write(Path(config.output), {"emb_params": vectors}, metadata)
    log.info("embedding %s written after %d steps (loss %.5f)", name, result.steps_done, result.final_loss)
    return result
