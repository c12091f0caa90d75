"""Shared fixtures: the committed tiny ONNX model and, for references, the same model in diffusers form."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    import torch
    # The references run the tiny PyTorch UNet: with its default threads on a shared 2-core machine it is
    # tens of times slower than on one thread (thread hand-offs dominate such small kernels).
    torch.set_num_threads(1)
except ImportError:  # the serving-only environment has no torch; the reference tests then cannot run
    pass

FIXTURES = Path(__file__).parent / "fixtures"
MODELS_DIR = FIXTURES / "models"
TINY_MODEL = MODELS_DIR / "tiny-sd"


def two_model_folder(root: Path, second_hash: str) -> Path:
    """A models folder with the tiny model twice, the second renamed `tiny-sd-b` with hash `second_hash`×64, so
    that switching checkpoints is observable by name and hash."""
    import shutil

    shutil.copytree(TINY_MODEL, root / "tiny-sd")
    other = root / "tiny-sd-b"
    shutil.copytree(TINY_MODEL, other)
    manifest = json.loads((other / "sdfc.json").read_text())
    manifest["name"] = "tiny-sd-b"
    manifest["source"].update(sha256=second_hash * 64, short_hash=second_hash * 10)
    (other / "sdfc.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def tiny_onnx() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The tiny model rebuilt in diffusers form from its seed; checked to be the one the ONNX came from."""
    from models_export import tiny
    from models_export.onnx_export import diffusers_folder_sha256

    out = tmp_path_factory.mktemp("tiny-diffusers")
    tiny.build(out, seed=0, tokenizer_from=TINY_MODEL / "tokenizer")
    manifest = json.loads((TINY_MODEL / "sdfc.json").read_text())
    assert diffusers_folder_sha256(out) == manifest["source"]["sha256"], \
        "rebuilt tiny model differs from the committed ONNX fixture: run `make tiny-model`"
    return out


@pytest.fixture(scope="session")
def engine():
    from sdfc.engine import Engine
    return Engine(MODELS_DIR)
