"""The export tooling: the tiny model regenerates the committed fixture, single-file checkpoints round-trip
exactly, fp16 stays close to fp32, and bad input gets a clear error.

Three ONNX exports run here (tiny via the CLI, the single-file round trip, fp16); they share one tiny
diffusers build through module-scoped fixtures.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sdfc.cli import main as sdfc_main

from .conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
FIXTURE_TOKENIZER = TINY_MODEL / "tokenizer"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# What the engine reads by name (docs/onnx-notes.md).
ENGINE_IO = {
    "text_encoder": (["input_ids"], "last_hidden_state"),
    "unet": (["sample", "timestep", "encoder_hidden_states"], "out_sample"),
    "vae_decoder": (["latent_sample"], "sample"),
    "vae_encoder": (["sample"], "latent_parameters"),
}


def export(*args: str | Path) -> int:
    return sdfc_main(["export", *map(str, args)])


def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "sdfc.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def component_inputs(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Fixed random inputs at the tiny model's sizes (64x64 images, 8x8 latents, hidden size 32)."""
    rng = np.random.default_rng(seed)
    return {
        "text_encoder": {"input_ids": rng.integers(0, 49408, (2, 77)).astype(np.int64)},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                 "timestep": np.array(500.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)},
    }


def run_component(model_dir: Path, component: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of one ONNX component, as float32; inputs are cast to the model's float type."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / component / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    typed = {}
    for spec in session.get_inputs():
        value = feed[spec.name]
        typed[spec.name] = value.astype(np.float16) if spec.type == "tensor(float16)" else value
    names = [o.name for o in session.get_outputs()]
    return {n: r.astype(np.float32) for n, r in zip(names, session.run(None, typed))}


def max_output_diffs(a: Path, b: Path) -> dict[str, tuple[float, float]]:
    """'component/output' -> (max abs difference, max abs value in a) over fixed random inputs."""
    diffs = {}
    for component, feed in component_inputs().items():
        out_a, out_b = run_component(a, component, feed), run_component(b, component, feed)
        assert out_a.keys() == out_b.keys()
        for name in out_a:
            diffs[f"{component}/{name}"] = (float(np.abs(out_a[name] - out_b[name]).max()),
                                            float(np.abs(out_a[name]).max()))
    return diffs


# ---------------------------------------------------------------- shared exports

@pytest.fixture(scope="module")
def cli_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """`sdfc export tiny` through the top-level CLI: (ONNX folder, the diffusers build it kept)."""
    root = tmp_path_factory.mktemp("cli-tiny")
    onnx_dir, diffusers_dir = root / "tiny-sd", root / "tinysd"
    # No optimum validation here: the test compares the ONNX bytes with the committed fixture instead.
    rc = export("tiny", "--out", onnx_dir, "--keep-diffusers", diffusers_dir,
                "--tokenizer-from", FIXTURE_TOKENIZER, "--no-validate")
    assert rc == 0
    return onnx_dir, diffusers_dir


@pytest.fixture(scope="module")
def round_trip(cli_tiny, tmp_path_factory) -> tuple[Path, Path, str]:
    """tiny diffusers -> single file -> ONNX: (checkpoint file, ONNX folder, the export's log)."""
    _, diffusers_dir = cli_tiny
    root = tmp_path_factory.mktemp("round-trip")
    ckpt, onnx_dir = root / "tiny-roundtrip.safetensors", root / "tiny-roundtrip"
    assert export("to-checkpoint", diffusers_dir, "--out", ckpt) == 0
    # A separate process with the hub switched off and its address pointing nowhere: any hub access fails.
    # It keeps optimum's validation on, the default a user gets.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sdfc.cli", "export", "checkpoint", str(ckpt),
                           "--out", str(onnx_dir), "--config", "tiny",
                           "--tokenizer-from", str(FIXTURE_TOKENIZER)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, onnx_dir, proc.stderr


# ---------------------------------------------------------------- the tiny model and the fixture

def test_tiny_cli_regenerates_the_committed_fixture(cli_tiny):
    onnx_dir, _ = cli_tiny
    ours, committed = manifest(onnx_dir), manifest(TINY_MODEL)
    # The source hash is over the diffusers weights: equal means `make tiny-model` rebuilds the same model.
    assert ours["source"]["sha256"] == committed["source"]["sha256"] \
        == "e8b3bb4a7a671332960af02a01e12485be76551c4eedc4e8bf512789ab02cc88"
    for field in ("name", "architecture", "prediction_type", "precision", "format_version"):
        assert ours[field] == committed[field], field
    assert ours["source"] == committed["source"]
    # The exporter is deterministic: same weights, same ONNX bytes, same tokenizer.
    for component in COMPONENTS:
        for name in ("model.onnx", "model.onnx_data"):
            assert sha256(onnx_dir / component / name) == sha256(TINY_MODEL / component / name), name
    assert sha256(onnx_dir / "tokenizer" / "tokenizer.json") == sha256(FIXTURE_TOKENIZER / "tokenizer.json")


def test_export_records_no_local_paths(cli_tiny):
    onnx_dir, diffusers_dir = cli_tiny
    for config in onnx_dir.rglob("*.json"):
        text = config.read_text()
        assert "_name_or_path" not in text and str(diffusers_dir) not in text, config


@pytest.mark.parametrize("model_dir", ["fixture", "cli"])
def test_exported_model_layout_manifest_and_modes(model_dir, cli_tiny):
    model_dir = TINY_MODEL if model_dir == "fixture" else cli_tiny[0]
    expected = {"sdfc.json", "model_index.json", "scheduler/scheduler_config.json",
                "tokenizer/tokenizer.json"}
    expected |= {f"{c}/{f}" for c in COMPONENTS for f in ("model.onnx", "model.onnx_data", "config.json")}
    present = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert expected <= present
    # Only the fast tokenizer is kept (the engine loads tokenizer.json; vocab + merges would be dead weight).
    assert not {"tokenizer/vocab.json", "tokenizer/merges.txt"} & present
    info = manifest(model_dir)
    assert info["format_version"] == 1 and info["architecture"] == "sd1"
    assert info["prediction_type"] == "epsilon" and info["precision"] == "fp32"
    assert info["source"]["short_hash"] == info["source"]["sha256"][:10]
    assert len(info["source"]["sha256"]) == 64
    assert {"torch", "diffusers", "optimum", "onnx"} <= info["exporter"].keys()
    # A server running as another user must read every file and enter every folder.
    for p in [model_dir, *model_dir.rglob("*")]:
        mode = p.stat().st_mode
        assert mode & stat.S_IROTH, p
        if p.is_dir():
            assert mode & stat.S_IXOTH, p


@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_names_the_engine_relies_on(component):
    import onnx

    graph = onnx.load(str(TINY_MODEL / component / "model.onnx"), load_external_data=False).graph
    inputs, output = ENGINE_IO[component]
    assert [i.name for i in graph.input] == inputs
    assert output in [o.name for o in graph.output]


@pytest.mark.parametrize("component", COMPONENTS)
def test_weights_sit_beside_the_graph_at_page_aligned_offsets(component):
    import onnx
    from models_export.external_data import ALIGN_FROM, EMBED_BELOW, PAGE

    path = TINY_MODEL / component / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    data_size = (path.parent / "model.onnx_data").stat().st_size
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no weight moved out of the graph"
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            assert len(tensor.raw_data) < EMBED_BELOW, tensor.name  # only shapes and scalars stay
            continue
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert info["location"] == "model.onnx_data" and offset + length <= data_size
        if length >= ALIGN_FROM:
            assert offset % PAGE == 0, (tensor.name, offset)  # onnxruntime maps only aligned offsets
    # Everything of any size is outside: the graph file is small next to its data.
    assert path.stat().st_size < data_size / 4


def test_optimum_pipeline_loads_the_export_as_it_is():
    """The folder works for the ecosystem too: fast tokenizer named in model_index.json, external data found."""
    code = textwrap.dedent(f"""
        from optimum.onnxruntime import ORTStableDiffusionPipeline
        pipe = ORTStableDiffusionPipeline.from_pretrained({str(TINY_MODEL)!r}, provider="CPUExecutionProvider")
        print("TOKENIZER", type(pipe.tokenizer).__name__)
        image = pipe("a red cube", num_inference_steps=2, height=64, width=64).images[0]
        print("SIZE", image.size)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENIZER CLIPTokenizerFast" in proc.stdout and "SIZE (64, 64)" in proc.stdout


def test_mid_size_unet_is_over_50m_parameters_and_tiny_under_1m():
    from models_export import tiny

    # Counted on the meta device: building the mid model is for benchmarks, not tests.
    assert tiny.unet_parameter_count("mid") > 50_000_000
    assert tiny.unet_parameter_count("tiny") < 1_000_000


# ---------------------------------------------------------------- single-file checkpoints

def test_single_file_round_trip_gives_the_same_onnx_outputs(round_trip):
    _, onnx_dir, _ = round_trip
    diffs = max_output_diffs(TINY_MODEL, onnx_dir)
    assert set(diffs) >= {f"{c}/{ENGINE_IO[c][1]}" for c in COMPONENTS}
    worst = {k: d for k, (d, _) in diffs.items() if d > 1e-6}
    assert not worst, worst


def test_single_file_manifest_carries_the_a1111_model_hash(round_trip):
    ckpt, onnx_dir, _ = round_trip
    source = manifest(onnx_dir)["source"]
    digest = sha256(ckpt)
    assert source == {"kind": "single-file", "name": ckpt.name, "sha256": digest, "short_hash": digest[:10]}
    assert manifest(onnx_dir)["name"] == ckpt.stem


def test_single_file_has_the_original_layout(round_trip):
    from safetensors import safe_open

    ckpt, _, _ = round_trip
    with safe_open(str(ckpt), framework="pt") as fh:
        keys = set(fh.keys())
    prefixes = {k.split(".", 1)[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
            "model.diffusion_model.middle_block.1.proj_in.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight",
            "first_stage_model.encoder.down.0.block.0.norm1.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= keys


def test_long_steps_log_their_progress_and_elapsed_time(round_trip):
    import re

    _, _, log = round_trip
    for step in ("checking the weights of", "single-file loader", "exporting", "hashing"):
        assert re.search(rf"{step}.*: done in \d+\.\d s", log), step


def test_ckpt_file_converts_back_to_identical_weights(cli_tiny, tmp_path):
    import torch

    from models_export.checkpoint import checkpoint_to_diffusers, diffusers_state_dicts, write_checkpoint

    _, diffusers_dir = cli_tiny
    ckpt = write_checkpoint(diffusers_dir, tmp_path / "tiny.ckpt")
    back, config = checkpoint_to_diffusers(ckpt, tmp_path / "back", tokenizer_from=FIXTURE_TOKENIZER)
    assert config == "tiny"  # chosen automatically: the weights do not fit sd15
    original, converted = diffusers_state_dicts(diffusers_dir), diffusers_state_dicts(back)
    for component, (weights, _) in original.items():
        again = converted[component][0]
        assert weights.keys() == again.keys(), component
        assert all(torch.equal(weights[k], again[k]) for k in weights), component


@pytest.mark.parametrize("config", ["sd15", "tiny", "mid"])
def test_ldm_names_agree_with_the_diffusers_single_file_converter(config):
    """Our diffusers->LDM names, read back by diffusers' own converter, land on the same weights.

    The tiny round trip cannot see every rule (its only upsampler sits in a block without attention);
    SD 1.5's and the mid model's structures do. Meta tensors: no memory even for SD 1.5.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from models_export import ldm_keys, tiny
    from models_export.checkpoint import resolve_config

    if config == "mid":
        unet_cfg, vae_cfg = dict(UNet2DConditionModel.load_config(resolve_config("sd15") / "unet")), \
            dict(AutoencoderKL.load_config(resolve_config("sd15") / "vae"))
        unet_cfg.update(tiny.unet_config("mid"))
        vae_cfg.update(tiny.vae_config("mid"))
    else:
        unet_cfg = UNet2DConditionModel.load_config(resolve_config(config) / "unet")
        vae_cfg = AutoencoderKL.load_config(resolve_config(config) / "vae")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
    for model, namer, convert in ((unet, ldm_keys.unet_name, convert_ldm_unet_checkpoint),
                                  (vae, ldm_keys.vae_name, convert_ldm_vae_checkpoint)):
        weights = model.state_dict()
        ldm = {namer(k, model.config): torch.empty(ldm_keys.ldm_shape(namer(k, model.config), tuple(v.shape)),
                                                   device="meta") for k, v in weights.items()}
        assert len(ldm) == len(weights)
        back = convert(ldm, dict(model.config))
        assert back.keys() == weights.keys()
        for key, value in weights.items():
            name = namer(key, model.config)
            assert tuple(back[key].shape) == tuple(value.shape), key
            if not ldm_keys.is_vae_attention_matrix(name):  # those the converter squeezes to a matrix
                assert back[key] is ldm[name], key  # the very tensor we named, not a same-shaped neighbour


def test_sd15_config_has_the_public_parameter_counts():
    from models_export.checkpoint import expected_shapes, resolve_config

    shapes = expected_shapes(resolve_config("sd15"))
    count = {prefix: sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))
             for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    # The widely quoted sizes of SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder.
    assert count == {"model.diffusion_model.": 859_520_964, "first_stage_model.": 83_653_863,
                     "cond_stage_model.": 123_060_480}


# ---------------------------------------------------------------- CLIP skip

@pytest.fixture(scope="module")
def fixture_with_clip_skip(tmp_path_factory) -> Path:
    """The committed fixture: exported with the CLIP-skip outputs (the default)."""
    assert manifest(TINY_MODEL)["clip_skip_outputs"] == {"1": "last_hidden_state", "2": "clip_skip_2"}
    return TINY_MODEL


def test_clip_skip_outputs_are_a1111s_final_norm_of_earlier_layers(fixture_with_clip_skip, cli_tiny):
    import torch
    from transformers import CLIPTextModel

    ids = component_inputs()["text_encoder"]
    ours = run_component(fixture_with_clip_skip, "text_encoder", ids)
    model = CLIPTextModel.from_pretrained(str(cli_tiny[1] / "text_encoder")).eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids["input_ids"]), output_hidden_states=True).hidden_states
        reference = model.text_model.final_layer_norm(hidden[-2]).numpy()
    # ONNX vs PyTorch float32 on this model: 2e-6 measured, as for last_hidden_state itself.
    assert np.abs(ours["clip_skip_2"] - reference).max() <= 1e-5
    assert np.abs(ours["clip_skip_2"] - ours["last_hidden_state"]).max() > 0.1  # really another layer


# ---------------------------------------------------------------- fp16

def test_fp16_export_stays_close_to_fp32(cli_tiny, fixture_with_clip_skip, tmp_path):
    _, diffusers_dir = cli_tiny
    out = tmp_path / "tiny-fp16"
    assert export("diffusers", diffusers_dir, "--out", out, "--precision", "fp16", "--name", "tiny-fp16",
                  "--no-validate") == 0
    info = manifest(out)
    assert info["precision"] == "fp16" and info["name"] == "tiny-fp16"
    assert info["source"]["sha256"] == manifest(TINY_MODEL)["source"]["sha256"]
    assert info["clip_skip_outputs"] == {"1": "last_hidden_state", "2": "clip_skip_2"}
    diffs = max_output_diffs(fixture_with_clip_skip, out)
    assert "text_encoder/clip_skip_2" in diffs
    # fp16 keeps 10 mantissa bits (epsilon 2**-10, about 9.8e-4). Inputs are rounded to fp16 and each
    # layer adds roundings, but normalisations keep activations O(1), so errors stay a few epsilons of
    # the output's scale: measured worst 1.96e-3 x scale (text encoder; UNet 1.4e-3, VAE decoder 1.7e-3,
    # i.e. 1.5e-3 and 4.4e-3 absolute, as in onnx-notes). Bound: 3 epsilons of the scale, a 1.5x margin.
    # A wrong cast or a broken layer errs by the order of the scale itself, hundreds of times more.
    bound = 3 * 2.0 ** -10
    for name, (diff, scale) in diffs.items():
        assert diff <= bound * scale, (name, diff, scale)
    # Whole images through the engine: 20 steps of fp16 rounding, decoded. Measured worst 1.2e-3 (Euler a)
    # on [0, 1] pixels; the bound is one 8-bit level (1/255 = 3.9e-3): a served PNG differs by at most one
    # count from the fp32 one, which no one can see, while a precision bug moves pixels by tenths.
    from sdfc.engine import Engine, GenerationRequest
    fp32, fp16 = Engine(TINY_MODEL), Engine(out)
    for sampler in ("Euler a", "DPM++ 2M", "DDIM"):
        req = GenerationRequest(prompt="a red house", width=64, height=64, steps=20, sampler_name=sampler, seed=3)
        a, b = fp32.generate(req).float_images[0], fp16.generate(req).float_images[0]
        assert np.abs(a - b).max() <= 1 / 255, sampler


# ---------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, cli_tiny) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    (root / "a-file.txt").write_text("not a model")
    (root / "not-diffusers").mkdir()
    (root / "not-diffusers" / "readme.txt").write_text("hello")
    (root / "empty").mkdir()
    (root / "garbage.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    # A real tiny checkpoint without its VAE: not a usable SD 1.x model.
    full = root / "full.safetensors"
    assert export("to-checkpoint", cli_tiny[1], "--out", full) == 0
    weights = load_file(str(full))
    save_file({k: v for k, v in weights.items() if not k.startswith("first_stage_model.")},
              str(root / "no-vae.safetensors"))
    save_file({**weights, "cond_stage_model.model.positional_embedding": weights[
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].clone()},
        str(root / "sd2.safetensors"))
    save_file({"lora_unet_down_blocks_0.alpha": weights["model.diffusion_model.out.2.bias"]},
              str(root / "lora.safetensors"))
    # Keyed by identifier-like names: ERROR_CASES refers to them as {name} in str.format templates.
    return {p.name.split(".")[0].replace("-", ""): p for p in root.iterdir()} | {"root": root}


ERROR_CASES = {
    # argv, then the texts the message must contain ({name} stands for a path from bad_inputs)
    "missing diffusers folder": (["diffusers", "{root}/nowhere", "--out", "{root}/o"],
                                 ["{root}/nowhere", "does not exist"]),
    "file instead of folder": (["diffusers", "{afile}", "--out", "{root}/o"], ["{afile}", "not a folder"]),
    "folder not diffusers": (["diffusers", "{notdiffusers}", "--out", "{root}/o"],
                             ["{notdiffusers}", "model_index.json"]),
    "output not empty": (["tiny", "--out", "{notdiffusers}"], ["{notdiffusers}", "not empty"]),
    "output is a file": (["tiny", "--out", "{afile}"], ["{afile}", "is a file"]),
    "tokenizer without tokenizer.json": (["tiny", "--out", "{root}/o", "--tokenizer-from", "{empty}"],
                                         ["{empty}", "tokenizer.json"]),
    "unknown config": (["checkpoint", "{full}", "--out", "{root}/o", "--config", "sd99"],
                       ["'sd99'", "sd15, tiny"]),
    "missing checkpoint": (["checkpoint", "{root}/none.safetensors", "--out", "{root}/o"],
                           ["{root}/none.safetensors", "does not exist"]),
    "folder as checkpoint": (["checkpoint", "{empty}", "--out", "{root}/o"], ["{empty}", "is a folder"]),
    "wrong suffix": (["checkpoint", "{afile}", "--out", "{root}/o"], ["{afile}", ".safetensors nor .ckpt"]),
    "unreadable checkpoint": (["checkpoint", "{garbage}", "--out", "{root}/o"], ["{garbage}", "cannot read"]),
    "missing keys": (["checkpoint", "{novae}", "--out", "{root}/o", "--config", "tiny"],
                     ["{novae}", "not an SD 1.x model", "missing (e.g. first_stage_model."]),
    "wrong config": (["checkpoint", "{full}", "--out", "{root}/o", "--config", "sd15"],
                     ["{full}", "'sd15'", "other shapes"]),
    "sd2 checkpoint": (["checkpoint", "{sd2}", "--out", "{root}/o"], ["{sd2}", "SD 2.x"]),
    "not sd at all": (["checkpoint", "{lora}", "--out", "{root}/o"], ["{lora}", "not a Stable Diffusion"]),
    "to-checkpoint of a non-model": (["to-checkpoint", "{notdiffusers}", "--out", "{root}/x.safetensors"],
                                     ["{notdiffusers}", "model_index.json"]),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_cli_errors_name_the_offending_input(case, bad_inputs, capsys):
    argv, expected = ERROR_CASES[case]
    paths = {name: str(path) for name, path in bad_inputs.items()}
    capsys.readouterr()
    assert export(*[a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for text in expected:
        assert text.format(**paths) in err, (text, err)
    assert "Traceback" not in err
    assert not (bad_inputs["root"] / "o").exists()


def test_cli_usage_errors_return_2(capsys):
    assert export("tiny", "--out", "x", "--size", "huge") == 2
    assert "huge" in capsys.readouterr().err
    assert export("checkpoint") == 2  # FILE and --out missing
    assert "--out" in capsys.readouterr().err


def test_to_checkpoint_refuses_another_file_type(cli_tiny, tmp_path, capsys):
    assert export("to-checkpoint", cli_tiny[1], "--out", tmp_path / "model.bin") == 2
    assert "model.bin" in capsys.readouterr().err
