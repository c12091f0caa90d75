"""`sdfc export ... --target cuda` (issue 16, part 3): onnxruntime's transformer optimizer fuses the graphs offline
for its CUDA provider, the manifest says so, and the engine serves such graphs with online optimization off.

This machine has no GPU. GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and NhwcConv have CUDA kernels only,
so the numerical checks use the same optimization with those five left out (`cuda_only_fusions=False`), which
onnxruntime's CPU provider runs: fused attention (MultiHeadAttention, Attention), SkipLayerNormalization,
LayerNormalization and Gelu are then checked for real. What needs a GPU (the five CUDA-only kernels, packed
QKV attention, fp16 GroupNorm) is checked structurally only: the fused nodes are there, the fp32-only inputs
are fp32.

Plain graphs: the committed fixture, the fp32 export of the same weights (conftest's tiny_diffusers checks it).
Three exports of the tiny model, about 30 s each: the real cuda target in fp16 through the CLI, and its
CPU-runnable variant in fp32 and (slow) in fp16.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models_export.cuda_target import CUDA_ONLY_OPS, count_fused_ops
from models_export.onnx_export import ExportError, _check_target, export_diffusers
from sdfc.cli import main as sdfc_main
from sdfc.engine import Engine, GenerationRequest, InvalidRequestError, ModelLoadError
from sdfc.engine.models import OnnxModel, read_model_info

from .conftest import TINY_MODEL

FP32_TOLERANCE = 1e-4
GRAPHS = ("unet", "vae_decoder", "vae_encoder", "text_encoder")


def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "sdfc.json").read_text())


@pytest.fixture(scope="module")
def cuda_fp16(tiny_diffusers, tmp_path_factory) -> Path:
    """The export a GPU serves: --target cuda --precision fp16, every fusion on, through the CLI."""
    out = tmp_path_factory.mktemp("cuda-target") / "tiny-cuda"
    assert sdfc_main(["export", "diffusers", str(tiny_diffusers), "--out", str(out), "--target", "cuda",
                      "--precision", "fp16", "--no-validate", "--name", "tiny-cuda"]) == 0
    return out


@pytest.fixture(scope="module")
def cpu_check_fp32(tiny_diffusers, tmp_path_factory) -> Path:
    """The same optimization without the CUDA-only fusions, fp32: runnable on the CPU provider."""
    out = tmp_path_factory.mktemp("cuda-target-cpu") / "tiny-cuda-cpu"
    return export_diffusers(tiny_diffusers, out, name="tiny-cuda-cpu", target="cuda", cuda_only_fusions=False,
                            validate=False, clip_skip=True)


def _graph(model_dir: Path, component: str):
    return onnx.load(str(model_dir / component / "model.onnx"), load_external_data=False)


def _inputs() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(16)
    return {
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8)), "timestep": np.asarray(500.5),  # CFG batch of 2
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32))},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8))},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 64, 64))},
        "text_encoder": {"input_ids": rng.integers(0, 49407, (2, 77))},
    }


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    typed = {i.name: feeds[i.name].astype(dtypes[i.type]) for i in session.get_inputs()}
    return [out.astype(np.float32) for out in session.run(None, typed)]


# ---------------------------------------------------------------- the export for GPUs

def test_cuda_target_export_holds_the_fused_ops_and_its_manifest_says_so(cuda_fp16):
    data = manifest(cuda_fp16)
    assert data["target"] == "cuda" and data["graph_optimization"] == "offline"
    assert data["cuda_only_fusions"] is True and data["lora"] == "unsupported"
    assert data["precision"] == "fp16" and data["fp32_fallback"] == {"vae_decoder": "vae_decoder_fp32"}
    for component in (*GRAPHS, "vae_decoder_fp32"):
        graph = _graph(cuda_fp16, component)
        assert count_fused_ops(graph) == data["fused_ops"][component], component
        assert (cuda_fp16 / component / "model.onnx_data").is_file()  # weights memory-mapped beside the graph
    unet, vae, text = (data["fused_ops"][c] for c in ("unet", "vae_decoder", "text_encoder"))
    # Tiny UNet: 4 transformer blocks, each a self and a cross attention (packed QKV / KV in fp16).
    assert unet["MultiHeadAttention"] == 8 and "Attention" not in unet
    for op in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv", "SkipLayerNormalization"):
        assert unet.get(op, 0) > 0, op
    assert vae.get("GroupNorm", 0) > 0 and vae.get("NhwcConv", 0) > 0
    assert text.get("SkipLayerNormalization", 0) > 0
    # LoRAs are refused on these graphs: no weight maps that would point at fused-away initializers.
    assert not list(cuda_fp16.rglob("weights_map.json"))


def test_cuda_fp16_export_keeps_the_fp32_parts_fp32(cuda_fp16):
    from onnx import TensorProto

    unet = _graph(cuda_fp16, "unet")
    types = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    assert types == {"sample": TensorProto.FLOAT16, "timestep": TensorProto.FLOAT,
                     "encoder_hidden_states": TensorProto.FLOAT16}
    # The sinusoidal embedding runs in float32, cast to fp16 only in front of the time embedding's Linear.
    producers = {out: node for node in unet.graph.node for out in node.output}
    linear = next(n for n in unet.graph.node if n.name.startswith("/time_embedding/linear_1/"))
    cast = producers[linear.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT16
    assert producers[cast.input[0]].name.startswith("/time_proj/")
    # GroupNorm's CUDA kernel reads gamma and beta as float32; fp16 everywhere else.
    for component in ("unet", "vae_decoder"):
        graph = _graph(cuda_fp16, component)
        initializers = {t.name: t.data_type for t in graph.graph.initializer}
        norms = [n for n in graph.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
        assert norms and all(initializers[n.input[i]] == TensorProto.FLOAT for n in norms for i in (1, 2))
        assert next(o for o in graph.graph.output).type.tensor_type.elem_type == TensorProto.FLOAT16
    fallback = _graph(cuda_fp16, "vae_decoder_fp32")
    assert fallback.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_cuda_only_graphs_are_refused_on_cpu_with_the_op_named(cuda_fp16):
    with pytest.raises(ModelLoadError, match=r"cannot load .*(GroupNorm|NhwcConv|BiasSplitGelu|BiasAdd)"):
        OnnxModel(read_model_info(cuda_fp16), device="cpu")


def test_unsupported_targets_and_architectures_are_refused():
    for architecture in ("sdxl", "sdxl-refiner"):
        with pytest.raises(ExportError, match=r"--target cuda supports SD 1\.x and 2\.x.*--target cpu"):
            _check_target("cuda", architecture)
    _check_target("cuda", "sd2")  # SD 2.x: fused, with its UNet's attention kept fp32 in fp16 exports
    _check_target("cpu", "sdxl")
    with pytest.raises(ExportError, match="target must be one of cpu, cuda"):
        _check_target("tpu", "sd1")
    assert sdfc_main(["export", "tiny", "--out", "/nonexistent/x", "--target", "tpu"]) == 2


# ---------------------------------------------------------------- the optimized graphs equal the plain ones

def test_fp32_optimized_graphs_equal_the_plain_graphs_on_cpu(cpu_check_fp32):
    fused = manifest(cpu_check_fp32)["fused_ops"]
    assert manifest(cpu_check_fp32)["cuda_only_fusions"] is False
    assert not set(CUDA_ONLY_OPS) & {op for counts in fused.values() for op in counts}
    # What this check exercises: the attention fusions and the LayerNorm family in the UNet and text encoder.
    # (The VAE's fusions are all CUDA-only ones, and onnxruntime 1.31 does not match the mid-block attention
    # of this exporter's SDPA graph: its graphs here are the plain ones, compared all the same.)
    assert fused["unet"]["MultiHeadAttention"] > 0 and fused["unet"]["Attention"] > 0
    assert fused["unet"]["SkipLayerNormalization"] > 0 and fused["text_encoder"]["SkipLayerNormalization"] > 0
    for component, feeds in _inputs().items():
        plain = _run(TINY_MODEL / component / "model.onnx", feeds)
        optimized = _run(cpu_check_fp32 / component / "model.onnx", feeds)
        assert len(plain) == len(optimized)  # text encoder: hidden states, pooled output, CLIP-skip output
        for a, b in zip(plain, optimized):
            assert np.abs(a - b).max() <= FP32_TOLERANCE, component


@pytest.mark.slow
def test_fp16_optimized_graphs_stay_within_fp16_rounding_of_the_plain_fp32_graphs(tiny_diffusers, tmp_path):
    """fp16 on CPU: the CPU-runnable variant (fp16 attention, SkipLayerNorm, Gelu; the timestep embedding
    fp32). Not checkable here: fp16 GroupNorm / SkipGroupNorm / BiasSplitGelu / BiasAdd / NhwcConv and the
    packed-QKV attention kernels, which exist for CUDA only."""
    out = export_diffusers(tiny_diffusers, tmp_path / "tiny-cuda-cpu16", target="cuda", cuda_only_fusions=False,
                           precision="fp16", validate=False, clip_skip=True)
    for component, feeds in _inputs().items():
        plain = _run(TINY_MODEL / component / "model.onnx", feeds)
        optimized = _run(out / component / "model.onnx", feeds)
        for a, b in zip(plain, optimized):
            # fp16 keeps 11 significant bits: one unit in the last place at the output's largest magnitude m
            # is 2^(floor(log2 m) - 10), and every layer adds its own rounding. 4 such units: the plain graph
            # converted to fp16 without any fusion measured 2.6 units off here (text encoder), the optimized
            # one 2.8 at most (UNet 2.8e-3 at m = 1.1; the notes' optimum fp16 export: 1.6e-3 / 3.8e-3).
            ulp = 2.0 ** (np.floor(np.log2(np.abs(a).max())) - 10)
            assert np.abs(a - b).max() <= 4 * ulp, component


# ---------------------------------------------------------------- serving

def test_engine_serves_the_cuda_target_export_with_online_optimization_off(cpu_check_fp32, tmp_path):
    from safetensors.numpy import save_file

    models, embeddings = tmp_path / "models", tmp_path / "embeddings"
    models.mkdir()
    embeddings.mkdir()
    shutil.copytree(TINY_MODEL, models / "tiny-sd")
    shutil.copytree(cpu_check_fp32, models / "tiny-cuda-cpu")
    # A textual-inversion embedding too: it overrides the token table, whose initializer the fusions keep.
    vectors = np.random.default_rng(3).normal(0, 0.5, (2, 32)).astype(np.float32)
    save_file({"emb_params": vectors}, str(embeddings / "tinyemb.safetensors"))
    engine = Engine(models, embeddings_dir=embeddings)
    request = dict(prompt="a red house, tinyemb", negative_prompt="blurry", width=64, height=64, steps=8,
                   cfg_scale=7.0, sampler_name="Euler a", seed=10, batch_size=2)
    plain = engine.generate(GenerationRequest(model="tiny-sd", **request))
    optimized = engine.generate(GenerationRequest(model="tiny-cuda-cpu", **request))
    assert "tinyemb" in optimized.extra_generation_params["TI hashes"]
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain.float_images, optimized.float_images)) \
        <= FP32_TOLERANCE
    levels = {name: {c: s.get_session_options().graph_optimization_level
                     for c, s in engine.load(name).sessions.items()} for name in ("tiny-sd", "tiny-cuda-cpu")}
    assert set(levels["tiny-cuda-cpu"].values()) == {ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    assert set(levels["tiny-sd"].values()) == {ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def test_loras_and_tiling_are_refused_on_cuda_target_exports(cpu_check_fp32):
    model = OnnxModel(read_model_info(cpu_check_fp32))
    with pytest.raises(InvalidRequestError, match=r"LoRAs are not supported on model 'tiny-cuda-cpu'.*--target cpu"):
        model.weight_maps()
    with pytest.raises(InvalidRequestError, match=r"seamless tiling is not supported.*--target cpu"):
        model.tiled()

