"""Export a diffusers Stable Diffusion folder to the ONNX layout the engine serves.

Output layout (one folder per model, several such folders make a models directory):
    sdfc.json                       manifest: name, architecture, prediction type, precision, source
                                    (kind, name, sha256, short_hash = A1111's "Model hash" for single
                                    files), exporter versions, and with --clip-skip `clip_skip_outputs`
                                    ({"1": "last_hidden_state", "2": "clip_skip_2", ...}); for an
                                    inpainting UNet `unet_in_channels` (9)
                                    `component_precision` ({"unet": "fp16", "vae_decoder": "fp32", ...}
                                    beside the top-level `precision`) and, for an fp16 VAE decoder,
                                    `fp32_fallback` ({"vae_decoder": "vae_decoder_fp32"}); for --target cuda
                                    `target`, `graph_optimization` ("offline"), `fused_ops` per component,
                                    `lora` ("unsupported": no weights maps), see cuda_target.py
    vae_decoder_fp32/model.onnx     fp16 exports with an fp16 VAE: the fp32 decoder the engine retries with
                                    when the fp16 one overflows (precision.py)
    tokenizer/tokenizer.json        fast tokenizer (loads in 75 ms instead of 180 ms from vocab + merges)
    text_encoder/model.onnx  unet/model.onnx  vae_decoder/model.onnx  vae_encoder/model.onnx (+ config.json)
                                    each graph with its weights beside it in model.onnx_data, page aligned
                                    so that onnxruntime memory-maps them (see external_data.py)
    unet/weights_map.json  text_encoder/weights_map.json
                                    each PyTorch weight's initializer (name, transposed or not), which
                                    LoRAs are merged into (weight_map.py)
    scheduler/scheduler_config.json

The export is written next to `out` and moved into place only when complete, so a models folder never
holds a half-written model; an existing `out` is replaced only if it is an earlier sdfc export.
Local paths that the exporter records (`_name_or_path`) are removed, so the same source always gives
the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from models_export.precision import FP32_VAE_DECODER
from models_export.progress import step
from models_export.sdxl_export import SDXL_FAMILY, required_folders, write_fast_tokenizers
from models_export.weight_map import write_weight_maps

log = logging.getLogger("sdfc.export")

MANIFEST = "sdfc.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PRECISIONS = ("fp32", "fp16")
# The dummy input size optimum traces and validates with (latents for the UNet and VAE decoder, pixels for
# the VAE encoder). Height and width are dynamic axes of every graph, so the size does not change the ONNX
# (byte-identical to the default 64 on the tiny model, fp32 and fp16), but tracing at 64x64 latents ran the
# VAE decoder at 512x512 in PyTorch: fp16 convolutions on CPU took 56 s of a 74 s tiny export; now 19 s.
# 16 stays divisible by the 8x down/upsampling of SD's UNet.
TRACE_SHAPES = {"height": 16, "width": 16}


class ExportError(Exception):
    """A user-facing export failure (bad input folder, unsupported model)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def diffusers_folder_sha256(src: Path) -> str:
    """A stable hash for a diffusers folder: sha256 over its weight files in name order.

    A1111's "Model hash" is the sha256 of a single checkpoint file; a diffusers folder has none, so
    this hash identifies the folder but will not equal any A1111 hash. Export the single file to get one.
    """
    digest = hashlib.sha256()
    weights = sorted(p for p in src.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in weights:
        digest.update(p.relative_to(src).as_posix().encode())
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


def check_diffusers_folder(src: Path) -> None:
    if not src.exists():
        raise ExportError(f"input folder {str(src)!r} does not exist")
    if not src.is_dir():
        raise ExportError(f"input {str(src)!r} is not a folder (for a .safetensors/.ckpt file use "
                          "`sdfc export checkpoint`)")
    index = src / "model_index.json"
    if not index.is_file():
        raise ExportError(f"{str(src)!r} is not a diffusers model folder: model_index.json is missing")
    from models_export.architecture import refuse_transformer_models

    refuse_transformer_models(src)  # SD3, Flux...: named as such, not as a folder lacking a UNet
    missing = [c for c in required_folders(src) if not (src / c).is_dir()]
    if missing:
        raise ExportError(f"{str(src)!r} lacks the component folder(s) {', '.join(missing)}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for pkg in ("torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def export_diffusers(src: Path, out: Path, *, name: str | None = None, precision: str = "fp32",
                     source_sha256: str | None = None, source_kind: str = "diffusers",
                     source_name: str | None = None, validate: bool = True, clip_skip: bool = False,
                     distilled: str | None = None, vae_precision: str | None = None, target: str = "cpu",
                     cuda_only_fusions: bool = True) -> Path:
    """Export `src` (a diffusers SD folder) to `out`; returns `out`.

    `vae_precision` (None: precision.default_vae_precision for the architecture) may keep the VAE fp32 in an
    fp16 export; the manifest's `component_precision` says what each part is (see precision.py).

    The architecture and prediction type are detected from the folder's configs (architecture.py) and
    written to the manifest; `distilled` ("lcm" or "turbo") flags a few-step model whose folder does not
    say so (an LCMScheduler config says "lcm" by itself).

    `validate` runs optimum's check of every ONNX model against PyTorch on sample inputs (fp32 only:
    optimum's fp16 check crashes). It takes longer than the export itself. `clip_skip` adds the text
    encoder outputs for A1111's CLIP skip (see clip_skip.py), listed in the manifest as `clip_skip_outputs`.
    `target` "cuda" fuses the graphs for onnxruntime's CUDA provider (cuda_target.py; `cuda_only_fusions`
    False leaves out the fusions that have CUDA kernels only, for checking the graphs on CPU).
    """
    src, out = Path(src), Path(out)
    check_diffusers_folder(src)
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    if vae_precision not in (None, *PRECISIONS):
        raise ExportError(f"VAE precision must be 'fp32' or 'fp16', not {vae_precision!r}")
    if precision == "fp32" and vae_precision == "fp16":
        raise ExportError("--vae-precision fp16 needs --precision fp16 (an fp32 export is fp32 throughout)")
    check_output_folder(out)
    from models_export.architecture import detect_architecture
    from sdfc.engine.architectures import DISTILLED

    if distilled is not None and distilled not in DISTILLED:
        raise ExportError(f"--distilled must be one of {', '.join(DISTILLED)}, not {distilled!r}")
    family = detect_architecture(src)
    distilled = distilled or family["distilled"]
    _check_target(target, family["architecture"])
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    if source_sha256 is None:
        with step(f"hashing the weights of {src}"):
            source_sha256 = diffusers_folder_sha256(src)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or src.name,
        "architecture": family["architecture"],
        "prediction_type": family["prediction_type"],
        "precision": precision,
        "source": {"kind": source_kind, "name": source_name or src.name, "sha256": source_sha256,
                   "short_hash": source_sha256[:10]},
        "exporter": _versions(),
    }
    if unet_config.get("in_channels", 4) != 4:  # an inpainting UNet: the engine feeds it the mask channels
        manifest["unet_in_channels"] = unet_config["in_channels"]
    if distilled:
        manifest["distilled"] = distilled
    from sdfc.engine.architectures import ARCHITECTURES

    if clip_skip and not ARCHITECTURES[family["architecture"]].clip_skip:
        # A1111 applies no CLIP skip to OpenCLIP (SD 2.x): its encoder's layer is fixed.
        log.info("%s: no CLIP-skip outputs for a %s model (A1111 has no CLIP skip for it)", src,
                 family["architecture"])
        clip_skip = False
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        # --target cuda fuses the fp32 graphs and converts to fp16 afterwards (cuda_target.py).
        _export_onnx(src, staging, "fp32" if target == "cuda" else precision, validate)
        if target == "cpu":
            manifest.update(_apply_component_precision(src, staging, precision, vae_precision, family["architecture"]))
        if clip_skip:
            manifest["clip_skip_outputs"] = _add_clip_skip(staging)
        if target == "cuda":  # after clip skip: its outputs are found by name in the plain graph
            manifest.update(_optimize_for_cuda(staging, precision, vae_precision, family["architecture"],
                                               cuda_only_fusions))
        elif family["architecture"] not in SDXL_FAMILY:  # the engine refuses LoRAs on SDXL (no maps needed)
            with step("mapping the weights to their initializers (for LoRAs)"):
                write_weight_maps(src, staging)
        _move_weights_out_of_the_graphs(staging)
        if family["architecture"] in SDXL_FAMILY:
            write_fast_tokenizers(src, staging, _write_config)  # tokenizer/ (base) and tokenizer_2/
        else:
            _write_tokenizer_json(src, staging)
        _drop_local_paths(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _make_readable(staging)
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%s, source sha256 %s)", out, precision, source_sha256[:10])
    return out


def _add_clip_skip(out: Path) -> dict[str, str]:
    from models_export.clip_skip import add_clip_skip_outputs

    with step("adding the CLIP-skip outputs to the text encoder"):
        outputs = add_clip_skip_outputs(out / "text_encoder" / "model.onnx")
    return {str(n): name for n, name in outputs.items()}


def _move_weights_out_of_the_graphs(out: Path) -> None:
    from models_export.external_data import move_weights_to_external_data

    with step("writing the weights beside each graph (model.onnx_data)"):
        for component in COMPONENTS + ("text_encoder_2",):
            if (out / component / "model.onnx").is_file():  # SDXL adds text_encoder_2; its refiner lacks text_encoder
                move_weights_to_external_data(out / component / "model.onnx")
        if (out / FP32_VAE_DECODER / "model.onnx").is_file():  # the fp32 twin of an fp16 VAE decoder
            move_weights_to_external_data(out / FP32_VAE_DECODER / "model.onnx")


def check_output_folder(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder that is not an earlier sdfc export."""
    if out.is_file():
        raise ExportError(f"output {str(out)!r} is a file; give a folder to write the model to")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"output folder {str(out)!r} is not empty and holds no {MANIFEST}; "
                          "refusing to replace it (give a new or empty folder, or an earlier sdfc export)")


def _export_onnx(src: Path, out: Path, precision: str, validate: bool) -> None:
    from optimum.exporters.onnx import main_export

    # With validation on, optimum's own fp16 error reporting crashes; fp16 is checked by our tests.
    kwargs = {"dtype": "fp16", "do_validation": False} if precision == "fp16" else {"do_validation": validate}
    with step(f"exporting {src} to ONNX ({precision}); minutes for full-size models"):
        main_export(str(src), output=str(out), task="text-to-image", device="cpu", **TRACE_SHAPES, **kwargs)


def _apply_component_precision(src: Path, out: Path, precision: str, vae_precision: str | None,
                               architecture: str) -> dict:
    """fp16 exports: float32 timestep, the VAE at its precision, the fp32 fallback decoder (precision.py).
    Returns the manifest entries: each component's precision, and the fallback's folder where there is one."""
    from models_export import precision as per_component

    vae_precision = vae_precision or per_component.default_vae_precision(architecture, precision)
    extra = per_component.apply(src, out, vae_precision, TRACE_SHAPES) if precision == "fp16" else {}
    components = [p.name for p in out.iterdir() if (p / "model.onnx").is_file() and p.name != FP32_VAE_DECODER]
    return {"component_precision": per_component.component_precisions(components, precision, vae_precision),
            **extra}


def _check_target(target: str, architecture: str) -> None:
    from models_export import cuda_target

    if target not in cuda_target.TARGETS:
        raise ExportError(f"target must be one of {', '.join(cuda_target.TARGETS)}, not {target!r}")
    if target == "cuda":
        try:
            cuda_target.check_architecture(architecture)
        except cuda_target.CudaTargetError as exc:
            raise ExportError(str(exc)) from None


def _optimize_for_cuda(out: Path, precision: str, vae_precision: str | None, architecture: str,
                       cuda_only_fusions: bool) -> dict:
    """The fp32 export in `out` fused for CUDA and converted to each part's precision (cuda_target.py); no
    weight maps: LoRAs are refused on these graphs. Returns the manifest entries."""
    from models_export import cuda_target, precision as per_component

    vae_precision = vae_precision or per_component.default_vae_precision(architecture, precision)
    components = [p.name for p in out.iterdir() if (p / "model.onnx").is_file()]
    component_precision = per_component.component_precisions(components, precision, vae_precision)
    entries = cuda_target.optimize_export(out, architecture, component_precision,
                                          cuda_only_fusions=cuda_only_fusions)
    return {"component_precision": component_precision, **entries}


def _replace_folder(new: Path, out: Path) -> None:
    """Move the finished export `new` to `out`, replacing an earlier export there."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def _drop_local_paths(out: Path) -> None:
    # `_name_or_path` records where the source sat on the exporting machine (often a temp folder).
    for config in [out / "model_index.json", *out.glob("*/config.json")]:
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            _write_config(config, data)


def _write_tokenizer_json(src: Path, out: Path) -> None:
    """Keep only the fast tokenizer: tokenizer/tokenizer.json serves both the engine and transformers."""
    from transformers import CLIPTokenizerFast
    fast = CLIPTokenizerFast.from_pretrained(str(src / "tokenizer"))
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    fast.save_pretrained(str(out / "tokenizer"), legacy_format=False)
    # The exporter's model_index.json names the slow CLIPTokenizer, which needs the vocab.json and
    # merges.txt dropped above: name the fast one so that diffusers/optimum load this folder as it is.
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
    _write_config(index_path, index)


def _write_config(path: Path, data: dict) -> None:
    # One layout for every JSON config the export rewrites: the fixture's bytes depend on it.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_readable(out: Path) -> None:
    # The exporter writes external-data files with mode 0600, and the staging folder is 0700:
    # a non-root server could not read them.
    for p in [out, *out.rglob("*")]:
        mode = p.stat().st_mode
        extra = stat.S_IRGRP | stat.S_IROTH | ((stat.S_IXGRP | stat.S_IXOTH) if p.is_dir() else 0)
        os.chmod(p, mode | extra)
