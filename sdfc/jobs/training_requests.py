"""The `train-lora` / `train-embedding` tasks' requests: validated as hostile input in the serving process, and
turned into the plain-data config the training child reads (sdfc/jobs/training_process.py starts it).

Paths in a request never name the server's file system directly: `base` (a diffusers model folder) and `images`
are folders inside the training-data folder (SDFC_TRAINING_DIR; the NAS in FC), and the result is written as
`<name>.safetensors` into the LoRA folder (SDFC_LORA_DIR) or the embeddings folder (SDFC_EMBEDDINGS_DIR) the
engine lists. Size, steps, rank and image count are bounded, so that one request cannot hold an executor for
days or fill its memory. No torch here: the serving image validates requests and has none.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from ..api.errors import ApiError, ValidationFailed
from ..api.payloads import TASK_ID_PATTERN, TASK_ID_TEXT
from ..api.schema import Field as F
from ..api.schema import Model

TASK_TYPE = "train-lora"
TRAINING_TYPES = ("train-lora", "train-embedding")
MAX_STEPS = 20_000
MAX_RANK = 128
MAX_RESOLUTION = 1024
MAX_BATCH = 8
MAX_IMAGES = 1000
MAX_PROMPT = 2000
MAX_VECTORS = 75  # the engine reads at most one 75-token chunk
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A relative folder: parts of letters, digits and `_ -.` that start with neither `.` nor a space (no `..`,
# no hidden folders); symlinks out of the training-data folder are refused after resolving.
FOLDER_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_ .-]{0,99}(/[A-Za-z0-9_-][A-Za-z0-9_ .-]{0,99}){0,7}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$"
PROMPT_PATTERN = rf"^[\s\S]{{0,{MAX_PROMPT}}}$"


class DatasetError(ValueError):
    """Training images that cannot be used (none, unreadable, no caption)."""


def plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and not path.name.startswith(".")


def image_paths(folder: Path) -> list[Path]:
    """The folder's images, sorted by name. Sub-folders, hidden files and symlinks are not read: a link could
    make the trainer read (and a caption's words land in the LoRA's metadata from) a file outside the folder."""
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder.name!r} does not exist")
    return sorted(p for p in folder.iterdir() if plain_file(p) and p.suffix.lower() in IMAGE_SUFFIXES)


TRAIN_LORA = Model("TrainLoraRequest", (
    F("base", "str", None, "the base model in diffusers form: a folder inside the training-data folder "
                           "(SDFC_TRAINING_DIR)", required=True, pattern=FOLDER_PATTERN),
    F("images", "str", None, "a folder of images inside the training-data folder, each with an optional caption "
                             ".txt beside it", required=True, pattern=FOLDER_PATTERN),
    F("output_name", "str", None, "the LoRA's name: <output_name>.safetensors in the LoRA folder, used as "
                                  "<lora:output_name:1>", required=True, pattern=NAME_PATTERN),
    F("prompt", "str", None, f"the caption of images without a .txt (at most {MAX_PROMPT} characters)",
      pattern=PROMPT_PATTERN),
    F("rank", "int", 8, "the LoRA's rank (network dim)", ge=1, le=MAX_RANK, strings=False),
    F("alpha", "float", None, "network alpha; the weights' scale is alpha / rank (default: the rank)",
      ge=0.001, le=1024),
    F("learning_rate", "float", 1e-4, "the UNet LoRA's learning rate (AdamW, constant)", ge=1e-9, le=1),
    F("text_encoder_lr", "float", None, "also train the text encoder's attention, at this rate", ge=1e-9, le=1),
    F("steps", "int", 500, "optimiser steps", ge=1, le=MAX_STEPS, strings=False),
    F("resolution", "int", 512, "training size (buckets hold about resolution² pixels); a multiple of the "
                                "model's size step (64 for SD 1.x)", ge=8, le=MAX_RESOLUTION, strings=False),
    F("batch_size", "int", 1, "images per step", ge=1, le=MAX_BATCH, strings=False),
    F("seed", "int", -1, "-1: a random one (the result says which)", ge=-1, le=2**32 - 1, strings=False),
    F("buckets", "bool", True, "aspect-ratio buckets; false: centre-cropped squares"),
    F("noise_offset", "float", 0.0, "kohya's noise offset", ge=0, le=1),
    F("overwrite", "bool", False, "replace an existing LoRA of that name"),
    F("force_task_id", "str", None, TASK_ID_TEXT, pattern=TASK_ID_PATTERN),
), description="A LoRA training job (run by the training child process): kohya-style .safetensors into the "
               "LoRA folder.")


def inside(root: Path | None, relative: str, field: str) -> Path:
    """`relative` (already matched against FOLDER_PATTERN) resolved inside `root`, symlinks followed; a folder
    that is missing or outside is the same 404, which says nothing of where the server keeps its files."""
    if root is None:
        raise ApiError(503, "training is not configured on this server (SDFC_TRAINING_DIR)", error="NotConfigured")
    base = root.resolve()
    path = (base / relative).resolve()
    if (path != base and base not in path.parents) or not path.is_dir():
        raise ApiError(404, f"{field}: no folder {relative!r} in the training-data folder", error="NotFound")
    return path


TRAIN_EMBEDDING = Model("TrainEmbeddingRequest", (
    *(f for f in TRAIN_LORA.fields if f.name in ("base", "images")),
    F("embedding_name", "str", None, "the embedding's name: <embedding_name>.safetensors in the embeddings folder, "
                                     "used as a word of the prompt", required=True, pattern=NAME_PATTERN),
    F("prompt", "str", None, f"the caption of images without a .txt; [name] (or the name) marks where the "
                             f"embedding goes (at most {MAX_PROMPT} characters)", pattern=PROMPT_PATTERN),
    F("init_text", "str", "*", "the words whose token vectors start it", pattern=r"^[\s\S]{0,200}$"),
    F("num_vectors_per_token", "int", 1, "vectors (tokens) of the embedding", ge=1, le=MAX_VECTORS, strings=False),
    F("learn_rate", "float", 5e-3, "AdamW's learning rate (A1111's default)", ge=1e-9, le=1),
    *(f for f in TRAIN_LORA.fields if f.name in ("steps", "resolution", "batch_size", "seed", "buckets",
                                                 "overwrite", "force_task_id")),
), description="A textual-inversion training job (run by the training child process): A1111's .safetensors "
               "into the embeddings folder.")

# task type: (request model, its name field, the settings folder written to, what the folder is called)
KINDS = {"train-lora": (TRAIN_LORA, "output_name", "lora_dir", "LoRA"),
         "train-embedding": (TRAIN_EMBEDDING, "embedding_name", "embeddings_dir", "embedding")}


def validate(body, training_dir: Path | None, out_dir: Path | None, kind: str = TASK_TYPE) -> dict:
    """The request's values, complete (defaults filled, a random seed chosen), or a 4xx."""
    model, name_field, _, noun = KINDS[kind]
    values, errors = model.parse(body)
    if errors:
        raise ValidationFailed(errors)
    values = {f.name: f.default if values[f.name] is None else values[f.name] for f in model.fields}
    if values["seed"] == -1:  # chosen now and stored, so that the task runs the same wherever it runs
        values["seed"] = secrets.randbelow(2**32)
    if not (inside(training_dir, values["base"], "base") / "model_index.json").is_file():
        raise ApiError(400, f"base: {values['base']!r} is not a diffusers model folder (no model_index.json); an "
                            "ONNX export cannot be trained: use the diffusers model it was exported from")
    try:
        count = len(image_paths(inside(training_dir, values["images"], "images")))
    except DatasetError as exc:
        raise ApiError(400, f"images: {exc}") from None
    if not 1 <= count <= MAX_IMAGES:
        raise ApiError(400, f"images: the folder must hold 1 to {MAX_IMAGES} images, it holds {count}")
    if out_dir is None:
        raise ApiError(503, f"no {noun} folder is configured", error="NotConfigured")
    if (out_dir / f"{values[name_field]}.safetensors").exists() and not values["overwrite"]:
        raise ApiError(409, f"a {noun} named {values[name_field]!r} exists; choose another {name_field} or "
                            "send overwrite: true", error="Conflict")
    return values


def child_config(kind: str, values: dict, training_dir: Path, out_dir: Path, overrides: dict | None = None) -> dict:
    """The training child's config (sdfc/training/child.py): plain JSON data, every path resolved and confined
    here, so that the child trusts it as it is. `overrides`: trainer settings no task field names (A1111's
    /train/embedding continues an existing embedding's vectors and step count)."""
    common = dict(base=str(inside(training_dir, values["base"], "base")),
                  images=str(inside(training_dir, values["images"], "images")), prompt=values["prompt"],
                  steps=values["steps"], resolution=values["resolution"], batch_size=values["batch_size"],
                  seed=values["seed"], buckets=values["buckets"], max_images=MAX_IMAGES)
    if kind == "train-embedding":
        config = dict(output=str(out_dir / f"{values['embedding_name']}.safetensors"), init_text=values["init_text"],
                      num_vectors=values["num_vectors_per_token"], learning_rate=values["learn_rate"], **common)
    else:
        config = dict(output=str(out_dir / f"{values['output_name']}.safetensors"), rank=values["rank"],
                      alpha=values["alpha"], learning_rate=values["learning_rate"],
                      text_encoder_lr=values["text_encoder_lr"], noise_offset=values["noise_offset"], **common)
    config.update(overrides or {})
    return {"kind": kind, "config": config}
