"""Single-file SD 1.x checkpoints (A1111's .safetensors / .ckpt): read them into diffusers, write them back.

Reading uses diffusers' own single-file loader, fully offline: the architecture comes from configs shipped
in this package (`models_export/configs/<name>/`, diffusers layout), passed as a local `config` folder with
`local_files_only=True`, so the Hugging Face hub is never asked for anything.
- `sd15`: the public Stable Diffusion 1.5 configuration (UNet 320/640/1280/1280, cross-attention 768,
  8 heads; CLIP ViT-L/14 text encoder 768 hidden / 12 layers / 12 heads; VAE 128/256/512/512 with scaling
  factor 0.18215; SD 1.5's PNDM scheduler config).
- `tiny`: the random-weight test model that `tiny.py` builds.
- any folder in the same layout (model_index.json, unet/ vae/ text_encoder/ config.json,
  scheduler/scheduler_config.json, optionally tokenizer/).
`auto` (the default) picks the shipped config whose weight names and shapes the checkpoint matches.

The tokenizer: SD 1.x uses CLIP's BPE vocabulary, the same for every shipped config, so no config ships a
copy (it is 3.6 MB). It is taken, in this order, from `tokenizer_from` (any folder with a tokenizer.json,
such as an exported model's `tokenizer/`), from the config folder's own `tokenizer/`, or built from the
open-clip-torch wheel (pip download from the package registry, cached in `clip_wheel_dir`).

Before diffusers sees the file, every weight the config needs is checked by name and shape: diffusers
without `accelerate` loads with `strict=False` and would leave missing weights randomly initialised.

Writing (`write_checkpoint`) maps each diffusers weight to its LDM name with `ldm_keys`, which is what the
round-trip tests prove: diffusers -> single file -> diffusers gives identical weights.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models_export import ldm_keys
from models_export.onnx_export import ExportError, check_diffusers_folder
from models_export.progress import step

log = logging.getLogger("sdfc.export")

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
AUTO = "auto"


# ---------------------------------------------------------------- configs

def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve_config(config: str) -> Path:
    """The folder for a shipped config name or a user's config folder."""
    if config in shipped_configs():
        return CONFIGS_DIR / config
    folder = Path(config)
    if not folder.is_dir():
        raise ExportError(f"unknown --config {config!r}: use {AUTO}, one of {', '.join(shipped_configs())}, "
                          "or a folder holding diffusers configs")
    missing = [f for f in CONFIG_FILES if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"config folder {str(folder)!r} lacks {', '.join(missing)}")
    return folder


def expected_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """LDM name -> shape of every weight an SD 1.x checkpoint needs for this config.

    The three models are built on the meta device: shapes only, no memory, even for SD 1.5.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = UNet2DConditionModel.load_config(str(config_dir / "unet"))
    vae_cfg = AutoencoderKL.load_config(str(config_dir / "vae"))
    text_cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
    with torch.device("meta"):
        models = {"unet": (UNet2DConditionModel.from_config(unet_cfg), unet_cfg),
                  "vae": (AutoencoderKL.from_config(vae_cfg), vae_cfg),
                  "text_encoder": (CLIPTextModel(text_cfg), None)}
    shapes = {}
    for component, (model, cfg) in models.items():
        for key, tensor in model.state_dict().items():
            name = ldm_keys.NAMERS[component](key, cfg)
            shapes[name] = ldm_keys.ldm_shape(name, tuple(tensor.shape))
    return shapes


# ---------------------------------------------------------------- reading a checkpoint

def check_checkpoint_file(path: Path) -> None:
    if not path.exists():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a folder, not a checkpoint file (for a diffusers folder use "
                          "`sdfc export diffusers`)")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ExportError(f"checkpoint {str(path)!r} is neither .safetensors nor .ckpt")


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint (safetensors: read from the header only)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        return {k: tuple(v.shape) for k, v in _load_ckpt(path).items() if hasattr(v, "shape")}
    except ExportError:
        raise
    except Exception as exc:  # a corrupt or foreign file: name it, with the reader's reason
        raise ExportError(f"cannot read checkpoint {str(path)!r}: {exc}") from None


def _load_ckpt(path: Path) -> dict[str, Any]:
    import pickle

    import torch
    try:
        # weights_only: a .ckpt is a pickle; never run code from a downloaded file (diffusers does the same).
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ExportError(f"checkpoint {str(path)!r} holds Python objects besides tensors and is not loaded "
                          f"for safety ({str(exc).splitlines()[0]}); convert it to .safetensors") from None
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ExportError(f"checkpoint {str(path)!r} does not hold a state dict")
    return data


def model_family_problem(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint is plainly not an SD 1.x txt2img model, or None."""
    keys = shapes.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return f"{str(path)!r} is an SDXL checkpoint; only SD 1.x is supported"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return f"{str(path)!r} is an SD 2.x checkpoint (OpenCLIP text encoder); only SD 1.x is supported"
    if not any(k.startswith(ldm_keys.UNET_PREFIX) for k in keys):
        return (f"{str(path)!r} is not a Stable Diffusion checkpoint: it has no {ldm_keys.UNET_PREFIX}* "
                "weights (a LoRA, VAE or embedding file?)")
    conv_in = shapes.get(ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        return (f"{str(path)!r} is not a txt2img SD 1.x checkpoint: its UNet takes {conv_in[1]} input "
                "channels (an inpainting or pix2pix model?), not 4")
    return None


def config_mismatches(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable reasons why a checkpoint does not fit a config; empty when it fits."""
    missing = [k for k in expected if k not in shapes]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {len(expected)} weights it needs are missing "
                        f"(e.g. {missing[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} weights have other shapes (e.g. {k}: {shapes[k]} in the file, "
                        f"{expected[k]} in the config)")
    return problems


def choose_config(path: Path, shapes: dict[str, tuple[int, ...]], config: str) -> tuple[str, Path]:
    """(label, folder) of the config this checkpoint is converted with; ExportError if none fits."""
    if problem := model_family_problem(path, shapes):
        raise ExportError(problem)
    candidates = shipped_configs() if config == AUTO else [config]
    found = {}
    for label in candidates:
        folder = resolve_config(label)
        problems = config_mismatches(shapes, expected_shapes(folder))
        if not problems:
            return label, folder
        found[label] = problems
    label, problems = min(found.items(), key=lambda item: len(item[1]))
    which = f"any shipped config ({', '.join(candidates)}); closest is {label!r}" if config == AUTO \
        else f"config {label!r}"
    raise ExportError(f"checkpoint {str(path)!r} is not an SD 1.x model matching {which}: "
                      + "; ".join(problems))


# ---------------------------------------------------------------- checkpoint -> diffusers

def prepare_config(config_dir: Path, into: Path, tokenizer_from: Path | None = None,
                   clip_wheel_dir: Path | None = None) -> Path:
    """Copy a config folder and give it a tokenizer; returns the copy."""
    from models_export.tiny import build_tokenizer

    _copy_files(config_dir, into)
    if tokenizer_from is not None:
        check_tokenizer_folder(tokenizer_from)
        shutil.rmtree(into / "tokenizer", ignore_errors=True)
        build_tokenizer(into / "tokenizer", tokenizer_from=tokenizer_from)
    elif not (into / "tokenizer").is_dir():
        with step("building the CLIP tokenizer from the open-clip-torch wheel"):
            build_tokenizer(into / "tokenizer", cache_dir=clip_wheel_dir)
    return into


def _copy_files(src: Path, dst: Path) -> None:
    # File contents only: an installed package's read-only modes must not follow into the temp copy.
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def check_tokenizer_folder(folder: Path) -> None:
    if not (Path(folder) / "tokenizer.json").is_file():
        raise ExportError(f"tokenizer folder {str(folder)!r} holds no tokenizer.json")


def checkpoint_to_diffusers(path: Path, dst: Path, config: str = AUTO, tokenizer_from: Path | None = None,
                            clip_wheel_dir: Path | None = None) -> tuple[Path, str]:
    """Convert a single-file SD 1.x checkpoint to a diffusers folder `dst`; returns (dst, config label)."""
    import torch
    from diffusers import StableDiffusionPipeline

    path, dst = Path(path), Path(dst)
    check_checkpoint_file(path)
    if config != AUTO:
        resolve_config(config)  # an unknown --config fails before the file is read
    with step(f"checking the weights of {path}"):
        label, config_dir = choose_config(path, checkpoint_shapes(path), config)
    log.info("%s matches config %r", path.name, label)
    with tempfile.TemporaryDirectory(prefix="sdfc-config-") as tmp:
        local_config = prepare_config(config_dir, Path(tmp) / "config", tokenizer_from, clip_wheel_dir)
        with step(f"loading {path.name} with diffusers' single-file loader"):
            try:
                pipe = StableDiffusionPipeline.from_single_file(
                    str(path), config=str(local_config), local_files_only=True, torch_dtype=torch.float32,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                raise ExportError(f"diffusers could not load checkpoint {str(path)!r}: {exc}") from None
    with step(f"saving the diffusers model to {dst}"):
        pipe.save_pretrained(str(dst), safe_serialization=True)
    return dst, label


# ---------------------------------------------------------------- diffusers -> checkpoint

def diffusers_state_dicts(src: Path) -> dict[str, tuple[dict[str, Any], Any]]:
    """component -> (state dict, config) for the three weighted models of an SD 1.x diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from models_export.architecture import detect_architecture

    check_diffusers_folder(src)
    index = json.loads((src / "model_index.json").read_text())
    text_class = (index.get("text_encoder") or [None, None])[1]
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    family = detect_architecture(src)["architecture"]  # refuses what no family fits, naming it
    if text_class != "CLIPTextModel" or family != "sd1" or unet_cfg.get("in_channels") != 4:
        raise ExportError(f"{str(src)!r} is not an SD 1.x txt2img model ({family}, text encoder {text_class}, "
                          f"cross-attention {unet_cfg.get('cross_attention_dim')}, "
                          f"{unet_cfg.get('in_channels')} UNet input channels); only SD 1.x can be written")
    unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(src / "vae"), local_files_only=True)
    text = CLIPTextModel.from_pretrained(str(src / "text_encoder"), local_files_only=True)
    return {"unet": (unet.state_dict(), unet.config), "vae": (vae.state_dict(), vae.config),
            "text_encoder": (text.state_dict(), text.config)}


def ldm_state_dict(src: Path) -> dict[str, Any]:
    """The weights of a diffusers SD 1.x folder under their original single-file names."""
    import torch

    state: dict[str, Any] = {}
    for component, (weights, config) in diffusers_state_dicts(src).items():
        for key, tensor in weights.items():
            try:
                name = ldm_keys.NAMERS[component](key, config)
            except KeyError:
                raise ExportError(f"{str(src)!r}: {component} weight {key!r} has no SD 1.x single-file "
                                  "name; only SD 1.x models can be written") from None
            if name in state:
                raise ExportError(f"{str(src)!r}: two {component} weights map to {name!r}")
            state[name] = tensor.reshape(ldm_keys.ldm_shape(name, tuple(tensor.shape))).contiguous()
        if component == "text_encoder":
            positions = config.max_position_embeddings
            state[ldm_keys.TEXT_POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    return state


def write_checkpoint(src: Path, out: Path) -> Path:
    """Save a diffusers SD 1.x folder as one original-layout checkpoint (.safetensors, or .ckpt)."""
    import torch
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ExportError(f"output {str(out)!r} must end in .safetensors or .ckpt")
    if out.is_dir():
        raise ExportError(f"output {str(out)!r} is a folder; give a file name")
    with step(f"converting {src} to the single-file layout"):
        state = ldm_state_dict(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: an interrupted run never leaves a truncated checkpoint.
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        with step(f"writing {out} ({len(state)} tensors)"):
            if out.suffix.lower() == ".safetensors":
                save_file(state, partial, metadata={"format": "pt"})
            else:
                torch.save({"state_dict": state}, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return out
