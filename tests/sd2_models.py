"""Tiny SD 2.x models for the tests: built from a seed in diffusers form and exported, once per test session.

Several test files use them; the builds are cached under the session's base temp folder by name, so a session
builds each model once whichever file asks first. Nothing here is committed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import TINY_MODEL

TOKENIZER = TINY_MODEL / "tokenizer"  # the real CLIP vocabulary, without a download


def diffusers_model(tmp_path_factory, architecture: str, seed: int = 0) -> Path:
    """The tiny diffusers model of `architecture` (tiny.TINY_ARCHITECTURES), built on first use."""
    from models_export import tiny

    out = tmp_path_factory.getbasetemp() / "tiny-diffusers" / f"{architecture}-seed{seed}"
    if not (out / "model_index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        tiny.build(out, seed=seed, tokenizer_from=TOKENIZER, architecture=architecture)
    return out


def exported_model(tmp_path_factory, architecture: str, distilled: str | None = None,
                   scheduler: dict | None = None) -> Path:
    """The tiny model of `architecture` exported to ONNX in a models folder of its own kind; `scheduler`
    replaces scheduler_config.json entries before the export (e.g. an LCMScheduler class)."""
    from models_export.onnx_export import export_diffusers

    tag = architecture + (f"-{distilled}" if distilled else "") + ("-custom" if scheduler else "")
    out = tmp_path_factory.getbasetemp() / "tiny-onnx" / tag
    if (out / "sdfc.json").is_file():
        return out
    src = diffusers_model(tmp_path_factory, architecture)
    if scheduler:
        copy = tmp_path_factory.getbasetemp() / "tiny-diffusers" / tag
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        config_path = copy / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **scheduler}))
        if "_class_name" in scheduler:  # the pipeline loads the class model_index.json names
            index_path = copy / "model_index.json"
            index = json.loads(index_path.read_text())
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
            index_path.write_text(json.dumps(index))
        src = copy
    export_diffusers(src, out, name=f"tiny-{tag}", validate=False, clip_skip=True, distilled=distilled)
    return out
