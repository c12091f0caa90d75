"""Which model family a diffusers folder holds, read from its configs; what the manifest declares.

`detect_architecture` answers with the names the engine's table uses (sdfc/engine/architectures.py):
- a second text encoder (`text_encoder_2`) → SDXL: `sdxl` with both encoders, `sdxl-refiner` with only the
  second one and a UNet conditioned on 5 time ids (original size, crop, aesthetic score) instead of 6
  (original size, crop, target size);
- one CLIP text encoder whose hidden size is the UNet's cross-attention width → `sd1` for CLIP ViT-L (quick_gelu
  activation), `sd2` for OpenCLIP (gelu activation). Full-size models must also have their family's width (768,
  1024); smaller widths are the tiny test models of the same families.
The prediction type comes from the scheduler config (`epsilon` or `v_prediction`); an `LCMScheduler` there marks
a distilled LCM model. Anything else (a `transformer` instead of a UNet such as SD3 or Flux, an unknown UNet
class or input channel count, a width that fits no family) is an ExportError naming what was found.
"""
from __future__ import annotations

import json
from pathlib import Path

from models_export.onnx_export import ExportError
from sdfc.engine.architectures import PREDICTION_TYPES
UNET_CLASS = "UNet2DConditionModel"
# 4: txt2img; 9: an inpainting UNet (latent + mask + masked-image latent).
UNET_IN_CHANNELS = (4, 9)
# The published text-encoder width of each single-encoder family, and its activation.
FULL_SIZE_WIDTH = {"sd1": 768, "sd2": 1024}
ACTIVATION_FAMILY = {"quick_gelu": "sd1", "gelu": "sd2"}
# SDXL's UNet: `addition_embed_type` text_time, each time id embedded with `addition_time_embed_dim` features
# beside the pooled text embedding; the base has 6 time ids, the refiner 5.
SDXL_TIME_IDS = {6: "sdxl", 5: "sdxl-refiner"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{str(path)!r} is missing") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{str(path)!r} is not valid JSON: {exc}") from None


def _component_class(index: dict, name: str) -> str | None:
    """The class model_index.json names for a component (None when absent or null)."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


def refuse_transformer_models(src: Path) -> None:
    """An ExportError for a diffusion-transformer pipeline (SD3, Flux...: a `transformer`, no UNet)."""
    index = _read_json(Path(src) / "model_index.json")
    if _component_class(index, "transformer") or (Path(src) / "transformer").is_dir():
        found = _component_class(index, "transformer") or "transformer/"
        raise ExportError(f"{str(src)!r} holds a transformer ({found}, pipeline {index.get('_class_name')}) "
                          "instead of a UNet (SD3, Flux...): "
                          "only UNet models (SD 1.x, SD 2.x, SDXL) can be exported")


def detect_architecture(src: Path) -> dict:
    """{"architecture", "prediction_type", "distilled"} of the diffusers folder `src`, or an ExportError."""
    src = Path(src)
    index = _read_json(src / "model_index.json")
    where = f"{str(src)!r}"
    refuse_transformer_models(src)
    unet = _read_json(src / "unet" / "config.json")
    unet_class = unet.get("_class_name")
    if unet_class != UNET_CLASS:
        raise ExportError(f"{where}: unsupported UNet class {unet_class!r} (expected {UNET_CLASS})")
    in_channels = unet.get("in_channels", 4)
    if in_channels not in UNET_IN_CHANNELS:
        raise ExportError(f"{where}: the UNet takes {in_channels} input channels; only 4 (txt2img) and 9 "
                          "(inpainting) are supported (8 is an InstructPix2Pix model, 7 an upscaler)")
    scheduler = _read_json(src / "scheduler" / "scheduler_config.json")
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"{where}: unsupported prediction type {prediction_type!r} in the scheduler config "
                          f"(supported: {', '.join(PREDICTION_TYPES)})")
    distilled = "lcm" if scheduler.get("_class_name") == "LCMScheduler" else None
    if _component_class(index, "text_encoder_2") or (src / "text_encoder_2").is_dir():
        architecture = _sdxl_kind(src, index, unet)
    else:
        architecture = _single_encoder_family(src, unet)
    return {"architecture": architecture, "prediction_type": prediction_type, "distilled": distilled}


def _single_encoder_family(src: Path, unet: dict) -> str:
    where = f"{str(src)!r}"
    text = _read_json(src / "text_encoder" / "config.json")
    width, cross = text.get("hidden_size"), unet.get("cross_attention_dim")
    activation = text.get("hidden_act")
    family = ACTIVATION_FAMILY.get(activation)
    if family is None:
        raise ExportError(f"{where}: text encoder activation {activation!r} fits no model family "
                          "(quick_gelu: CLIP ViT-L, SD 1.x; gelu: OpenCLIP, SD 2.x)")
    if cross != width:
        raise ExportError(f"{where}: the UNet's cross_attention_dim {cross} fits no model family with a "
                          f"{width}-wide {activation} text encoder (SD 1.x: 768, SD 2.x: 1024, equal to the "
                          "text encoder's hidden size)")
    full = FULL_SIZE_WIDTH[family]
    other = {w: f for f, w in FULL_SIZE_WIDTH.items()}.get(cross)
    if other is not None and other != family:
        raise ExportError(f"{where}: cross_attention_dim {cross} is {other}'s width but the text encoder's "
                          f"{activation} activation is {family}'s ({full} wide); this mix fits no model family")
    return family


def _sdxl_kind(src: Path, index: dict, unet: dict) -> str:
    where = f"{str(src)!r}"
    if unet.get("addition_embed_type") != "text_time":
        raise ExportError(f"{where} has a second text encoder but its UNet's addition_embed_type is "
                          f"{unet.get('addition_embed_type')!r}, not SDXL's 'text_time'")
    text_2 = _read_json(src / "text_encoder_2" / "config.json")
    pooled = text_2.get("projection_dim") or text_2.get("hidden_size")
    per_id, total = unet.get("addition_time_embed_dim"), unet.get("projection_class_embeddings_input_dim")
    if not per_id or not total or (total - pooled) % per_id:
        raise ExportError(f"{where}: cannot count the UNet's time ids (projection_class_embeddings_input_dim "
                          f"{total}, addition_time_embed_dim {per_id}, pooled width {pooled})")
    time_ids = (total - pooled) // per_id
    kind = SDXL_TIME_IDS.get(time_ids)
    if kind is None:
        raise ExportError(f"{where}: the UNet takes {time_ids} time ids; SDXL takes 6, its refiner 5")
    has_first = bool(_component_class(index, "text_encoder")) or (src / "text_encoder").is_dir()
    if (kind == "sdxl") != has_first:
        raise ExportError(f"{where}: {time_ids} time ids ({kind}) but "
                          f"{'a' if has_first else 'no'} first text encoder; SDXL has both encoders, its "
                          "refiner only text_encoder_2")
    return kind
