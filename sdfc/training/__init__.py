"""Training your own LoRAs: a separate job with torch, diffusers and peft, never imported by serving code.

The serving image has no torch; this room imports it lazily, inside the functions that train. It reads a base
model in diffusers form (the ONNX export cannot be trained) and a folder of captioned images, and writes a
kohya-style LoRA `.safetensors` into the LoRA folder that the engine (sdfc/engine/lora.py) reads, or an A1111
textual-inversion embedding into the embeddings folder (sdfc/engine/embeddings.py).

- dataset.py: images, captions and aspect-ratio buckets (PIL and numpy only)
- kohya.py: PEFT weights to kohya keys, and the `ss_*` metadata the ecosystem reads
- lora_trainer.py: the LoRA training loop and the loss both trainers use (torch)
- embedding_trainer.py: textual inversion (torch)
- tasks.py: the `train-lora` / `train-embedding` tasks: hostile request validation, and running them for the
  task runner (sdfc/jobs/runner.py)
- cli.py: `sdfc train lora|embedding`
"""
from __future__ import annotations

from .dataset import DatasetError

__all__ = ["DatasetError"]
