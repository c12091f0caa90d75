"""Architecture is declared, detected and checked: the exporter names what it cannot handle, the engine refuses
a manifest it cannot run (instead of running it as SD 1.x ε), and the architecture table is what ModelInfo says.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models_export.architecture import detect_architecture
from models_export.onnx_export import ExportError
from sdfc.engine import Engine
from sdfc.engine.errors import ModelLoadError
from sdfc.engine.models import scan_models

from .conftest import TINY_MODEL
from .sd2_models import TOKENIZER, diffusers_model


def export(*args) -> int:
    from models_export.cli import main
    return main([str(a) for a in args])


# ---------------------------------------------------------------- detection from diffusers configs

@pytest.mark.parametrize("architecture,expected", [
    ("sd1", ("sd1", "epsilon")), ("inpaint", ("sd1", "epsilon")),
    ("sd2", ("sd2", "epsilon")), ("sd2-v", ("sd2", "v_prediction"))])
def test_tiny_models_are_detected(tmp_path_factory, architecture, expected):
    found = detect_architecture(diffusers_model(tmp_path_factory, architecture))
    assert (found["architecture"], found["prediction_type"], found["distilled"]) == (*expected, None)


def _configs(root: Path, *, index=None, unet=None, text=None, text_2=None, scheduler=None) -> Path:
    """A diffusers folder of configs only (detection reads nothing else), SD 1.5-shaped unless overridden."""
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                             "text_encoder": ["transformers", "CLIPTextModel"], **(index or {})},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 768,
                             **(unet or {})},
        "text_encoder/config.json": {"hidden_size": 768, "hidden_act": "quick_gelu", **(text or {})},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "prediction_type": "epsilon",
                                            **(scheduler or {})},
    }
    if text_2 is not None:
        files["text_encoder_2/config.json"] = text_2
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    return root


# SDXL 1.0's published widths: CLIP-L 768 + OpenCLIP-bigG 1280 (projection 1280), 256 features per time id.
SDXL_TEXT_2 = {"hidden_size": 1280, "projection_dim": 1280, "hidden_act": "gelu"}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256}


@pytest.mark.parametrize("overrides,expected", [
    ({}, ("sd1", "epsilon", None)),
    (dict(unet={"cross_attention_dim": 1024}, text={"hidden_size": 1024, "hidden_act": "gelu"},
          scheduler={"prediction_type": "v_prediction"}), ("sd2", "v_prediction", None)),
    (dict(scheduler={"_class_name": "LCMScheduler"}), ("sd1", "epsilon", "lcm")),
    (dict(unet={**SDXL_UNET, "projection_class_embeddings_input_dim": 1280 + 6 * 256},
          index={"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, text_2=SDXL_TEXT_2),
     ("sdxl", "epsilon", None)),
    (dict(unet={**SDXL_UNET, "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 1280 + 5 * 256},
          index={"text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
          text_2=SDXL_TEXT_2), ("sdxl-refiner", "epsilon", None)),
])
def test_full_size_configs_are_detected(tmp_path, overrides, expected):
    root = _configs(tmp_path, **overrides)
    if expected[0] == "sdxl-refiner":
        shutil.rmtree(root / "text_encoder")
    found = detect_architecture(root)
    assert (found["architecture"], found["prediction_type"], found["distilled"]) == expected


@pytest.mark.parametrize("overrides,words", [
    (dict(index={"transformer": ["diffusers", "FluxTransformer2DModel"], "_class_name": "FluxPipeline"}),
     ["transformer", "FluxTransformer2DModel", "FluxPipeline"]),
    (dict(unet={"_class_name": "UNet2DModel"}), ["UNet class", "'UNet2DModel'"]),
    (dict(unet={"in_channels": 8}), ["8 input channels"]),
    (dict(unet={"cross_attention_dim": 1024}), ["cross_attention_dim 1024", "fits no model family"]),
    (dict(text={"hidden_act": "gelu"}), ["768", "gelu", "fits no model family"]),
    (dict(text={"hidden_act": "relu"}), ["activation 'relu'"]),
    (dict(scheduler={"prediction_type": "sample"}), ["prediction type 'sample'"]),
    (dict(unet=SDXL_UNET | {"projection_class_embeddings_input_dim": 1280 + 7 * 256},
          index={"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, text_2=SDXL_TEXT_2),
     ["7 time ids"]),
])
def test_detection_refuses_what_it_cannot_handle(tmp_path, overrides, words):
    root = _configs(tmp_path, **overrides)
    with pytest.raises(ExportError) as caught:
        detect_architecture(root)
    message = str(caught.value)
    assert str(root) in message
    for word in words:
        assert word in message


def test_export_cli_refuses_a_transformer_model(tmp_path, capsys):
    root = _configs(tmp_path / "flux", index={"transformer": ["diffusers", "FluxTransformer2DModel"]})
    (root / "transformer").mkdir()
    assert export("diffusers", root, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "transformer" in err and "SD3, Flux" in err
    assert not (tmp_path / "out").exists()


def test_unknown_tiny_architecture_is_refused(tmp_path, capsys):
    assert export("tiny", "--architecture", "flux", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'flux'" in err and "sd2-v" in err
    from models_export import tiny
    with pytest.raises(ExportError, match="unknown architecture 'flux'"):
        tiny.build(tmp_path / "b", architecture="flux")
    assert not (tmp_path / "b").exists()


def test_unknown_distilled_flag_is_refused(tmp_path, capsys):
    assert export("tiny", "--distilled", "hyper", "--out", tmp_path / "out") == 2
    assert "invalid choice: 'hyper'" in capsys.readouterr().err


def test_distilled_flag_is_written_to_the_manifest(tmp_path):
    out = tmp_path / "turbo"
    assert export("tiny", "--out", out, "--tokenizer-from", TOKENIZER, "--no-validate", "--distilled", "turbo") == 0
    manifest = json.loads((out / "sdfc.json").read_text())
    assert (manifest["architecture"], manifest["distilled"]) == ("sd1", "turbo")
    assert scan_models(out)[0].distilled == "turbo"


# ---------------------------------------------------------------- the engine checks the manifest

def _with_manifest(root: Path, **changes) -> Path:
    """A models folder with a copy of the tiny model whose manifest has `changes`."""
    model = root / "tiny-sd"
    shutil.copytree(TINY_MODEL, model)
    manifest = json.loads((model / "sdfc.json").read_text())
    manifest.update(changes)
    (model / "sdfc.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("changes,words", [
    ({"architecture": "flux"}, ["architecture 'flux'", "sd1, sd2"]),
    ({"architecture": ["sdxl"]}, ["architecture ['sdxl']"]),
    ({"prediction_type": "sample"}, ["prediction type 'sample'", "epsilon, v_prediction"]),
    ({"distilled": "hyper"}, ["distilled flag 'hyper'", "lcm, turbo"]),
])
def test_engine_refuses_a_manifest_it_cannot_run(tmp_path, changes, words):
    root = _with_manifest(tmp_path, **changes)
    with pytest.raises(ModelLoadError) as caught:
        Engine(root)
    message = str(caught.value)
    assert str(root / "tiny-sd" / "sdfc.json") in message
    for word in words:
        assert word in message


def test_engine_checks_the_declared_architectures_components(tmp_path):
    root = _with_manifest(tmp_path)
    shutil.rmtree(root / "tiny-sd" / "vae_encoder")
    engine = Engine(root)  # scanning reads manifests only
    with pytest.raises(ModelLoadError, match="declared 'sd1' but lacks its component\\(s\\) vae_encoder"):
        engine.load()


def test_model_info_carries_the_architecture(engine):
    info = engine.current
    assert (info.architecture, info.arch.name, info.arch.default_size, info.distilled) == ("sd1", "sd1", 512, None)
    assert info.arch.components == ("text_encoder", "unet", "vae_decoder", "vae_encoder")
