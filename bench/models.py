"""The benchmark models, built once into a cache folder and reused by later runs.

Each size gets two folders: `<size>/diffusers` (the PyTorch form, for the diffusers peer) and
`<size>/onnx` (our export of it, served by both sdfc and optimum's ORT pipeline), so all three
implementations run the same weights. Building needs torch; it happens in the parent only when the
cache is missing, never in a measured worker.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
# The committed fixture's tokenizer.json holds the real CLIP vocabulary: building from it needs no download.
FIXTURE_TOKENIZER = REPO / "tests" / "fixtures" / "models" / "tiny-sd" / "tokenizer"
DEFAULT_CACHE = REPO / "bench" / "out" / "models"

# Image side per model size: the settings (tiny at 64x64, mid at 256x256).
IMAGE_SIDE = {"tiny": 64, "mid": 256}
BUILD_SEED = 0


@dataclass(frozen=True)
class BenchModel:
    size: str
    diffusers_dir: Path
    onnx_dir: Path
    side: int

    def describe(self) -> dict:
        return {"size": self.size, "image": f"{self.side}x{self.side}", "onnx_dir": str(self.onnx_dir),
                "diffusers_dir": str(self.diffusers_dir), "unet_parameters": unet_parameters(self)}


def unet_parameters(model: BenchModel) -> int | None:
    """UNet parameter count, recorded at build time (counting later would need torch in the parent)."""
    info = model.onnx_dir.parent / "bench-model.json"
    return json.loads(info.read_text()).get("unet_parameters") if info.is_file() else None


def ensure_model(size: str, cache: Path = DEFAULT_CACHE) -> BenchModel:
    """The cached model of `size`, built and exported first if the cache lacks it."""
    if size not in IMAGE_SIDE:
        raise ValueError(f"unknown model size {size!r}; choose from {', '.join(IMAGE_SIDE)}")
    root = Path(cache) / size
    model = BenchModel(size, root / "diffusers", root / "onnx", IMAGE_SIDE[size])
    if not (model.diffusers_dir / "model_index.json").is_file():
        _build_diffusers(model)
    # Exports from before the weights moved out of the graphs are stale: the bench measures today's layout.
    if not (model.onnx_dir / "unet" / "model.onnx_data").is_file():
        _export_onnx(model)
    return model


def _build_diffusers(model: BenchModel) -> None:
    from models_export import tiny

    log.info("building the %s model in diffusers form into %s", model.size, model.diffusers_dir)
    tiny.build(model.diffusers_dir, size=model.size, seed=BUILD_SEED, tokenizer_from=FIXTURE_TOKENIZER)
    params = tiny.unet_parameter_count(model.size)
    (model.diffusers_dir.parent / "bench-model.json").write_text(
        json.dumps({"size": model.size, "seed": BUILD_SEED, "unet_parameters": params}, indent=2) + "\n")


def _export_onnx(model: BenchModel) -> None:
    from models_export.onnx_export import export_diffusers

    log.info("exporting the %s model to ONNX into %s", model.size, model.onnx_dir)
    export_diffusers(model.diffusers_dir, model.onnx_dir, name=f"bench-{model.size}")
