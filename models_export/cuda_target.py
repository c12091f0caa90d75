"""`--target cuda`: ONNX Runtime's transformer optimizer run offline on an export, for serving on a GPU.

What it does, per component (facts from onnxruntime's Stable Diffusion demo, models/stable_diffusion in
onnxruntime.transformers, and its README):
- The fusions run on the fp32 graph, before any fp16 conversion: their patterns are the fp32 export's, and
  an fp16 trace no longer matches them. So a cuda-target export is exported fp32 and converted afterwards.
- UNet ("unet"): self and cross attention become MultiHeadAttention (Flash / memory-efficient attention on
  CUDA; in fp32 the self attention becomes Attention, with Q, K and V weights merged), LayerNorm + residual
  SkipLayerNormalization, GroupNorm (+ Add: SkipGroupNorm), bias + GEGLU BiasSplitGelu, bias + residual
  BiasAdd, NHWC convolutions (NhwcConv). Packed QKV / KV attention inputs only for fp16, as the demo does
  (the packed CUDA kernels are fp16 only).
- VAE ("vae"): GroupNorm, SkipGroupNorm, NhwcConv. Its mid-block attention is not fused: onnxruntime 1.31's
  VAE attention pattern does not match the graph torch 2.13 exports for diffusers 0.39's SDPA attention.
- Text encoder ("clip"): LayerNorm, SkipLayerNormalization, Gelu / QuickGelu; its causal attention is not
  matched either (the same SDPA export), and stays as plain ops.
- fp16 after fusion, through onnxruntime's converter (graph inputs and outputs fp16, as the demo, but for
  the UNet's timestep): the converter itself keeps GroupNorm's / SkipGroupNorm's gamma and beta and Resize's scales float32 (the CUDA kernels read them
  so); SD 2.x's UNet keeps MultiHeadAttention float32 (the demo's README: fp16 attention overflows there
  and gives black images); the UNet's sinusoidal timestep embedding stays float32 up to its first MatMul,
  as diffusers' fp16 pipeline computes it and as precision.py keeps it for the CPU fp16 export (fp16 would
  round fractional timesteps: 0.5 apart above 512).
- onnxruntime's own graph optimizations are not run here (the demo's opt_level 0): a graph optimized by an
  onnxruntime session is specific to that session's provider and machine. The engine loads these graphs
  with onnxruntime's basic level only (constant folding, redundant nodes: provider-independent, cheap) and
  skips the extended and layout levels that this offline pass replaces (manifest "graph_optimization":
  "offline", sdfc/engine/models.py).

GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and NhwcConv have CUDA kernels only. `cuda_only_fusions=False`
leaves those five out (and the packing, for the same reason): the same optimization otherwise, runnable on
onnxruntime's CPU provider, which is how the tests check the fused graphs against the plain ones on a machine
without a GPU.

LoRAs are not supported on a cuda-target export: fused graphs no longer hold each PyTorch weight as one
initializer in its layout (packed QKV concatenates three, NhwcConv transposes convolution weights), so no
weights_map.json is written and the engine refuses a LoRA on such a model with a message saying why.
SDXL exports are refused for now (their second text encoder and fp32 VAE rules are not handled here).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from models_export.external_data import move_weights_to_external_data
from models_export.precision import FP32_VAE_DECODER

log = logging.getLogger("sdfc.export")

TARGETS = ("cpu", "cuda")
# The optimizer's model type for each component folder (the demo's mapping).
MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip"}
# Contrib ops with CUDA kernels only (onnxruntime 1.31 has no CPU kernel for them).
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")
# The fused ops counted per component in the manifest ("fused_ops").
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd",
             "NhwcConv", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "Gelu", "QuickGelu",
             "FastGelu")
# Ops that stay float32 in an fp16 conversion, per architecture and component (see the module docstring).
FP32_OPS = {("sd2", "unet"): ["MultiHeadAttention"]}
SUPPORTED_ARCHITECTURES = ("sd1", "sd2")  # an inpainting UNet is "sd1" with 9 input channels


class CudaTargetError(ValueError):
    """A model this optimization does not handle (the export turns it into an ExportError)."""


def check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CudaTargetError(f"--target cuda supports SD 1.x and 2.x exports, not {architecture!r} yet; "
                              "export this model with --target cpu (its ONNX graphs run on CUDA as well, "
                              "without the offline fusions)")


def fusion_options(model_type: str, fp16: bool, cuda_only_fusions: bool = True):
    """onnxruntime's FusionOptions for `model_type`, as the demo sets them, optionally without CUDA-only ops."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if model_type == "unet":
        # Packed inputs only for fp16 (the demo): the packed attention kernels exist for fp16 alone.
        options.enable_packed_qkv = options.enable_packed_kv = fp16 and cuda_only_fusions
    if not cuda_only_fusions and model_type in ("unet", "vae"):
        options.enable_group_norm = options.enable_skip_group_norm = False
        options.enable_bias_splitgelu = options.enable_bias_add = options.enable_nhwc_conv = False
    return options


def optimize_component(path: Path, model_type: str, *, fp16: bool, cuda_only_fusions: bool = True,
                       fp32_ops: list[str] | None = None) -> dict[str, int]:
    """Fuse the fp32 graph at `path` in place (weights embedded; external_data.py moves them out later),
    convert it to fp16 when asked; returns how many nodes of each FUSED_OPS type it has."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    path = Path(path)
    with _numpy2_head_count(), _quiet_optimizer():
        optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=fusion_options(model_type, fp16, cuda_only_fusions),
                                   use_gpu=True)
    if fp16:
        blocked_nodes = _timestep_embedding_nodes(optimized.model.graph) if model_type == "unet" else []
        with _quiet_optimizer():
            # keep_io_types: only the timestep, whose embedding nodes stay float32 (blocked_nodes).
            optimized.convert_float_to_float16(keep_io_types=["timestep"] if model_type == "unet" else False,
                                               op_block_list=list(fp32_ops or []), node_block_list=blocked_nodes)
        if model_type == "unet":
            _float32_timestep_input(optimized.model.graph)
    # The demo's rule: weights beside the graph only past protobuf's 2 GB (a full-size UNet); in both cases
    # external_data.py then writes them page-aligned into model.onnx_data, as for every export.
    size = optimized.model.ByteSize()
    external = size <= 0 or size >= onnx.checker.MAXIMUM_PROTOBUF
    for stale in (path.with_name(path.name + "_data"), path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)  # the plain graph's weights are all in memory now
    with _quiet_optimizer():
        optimized.save_model_to_file(str(path), use_external_data_format=external)
    if external:
        move_weights_to_external_data(path)
        path.with_name(path.name + ".data").unlink()
    onnx.checker.check_model(str(path))
    return count_fused_ops(onnx.load(str(path), load_external_data=False))


def count_fused_ops(model) -> dict[str, int]:
    counts = {op: 0 for op in FUSED_OPS}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return {op: n for op, n in counts.items() if n}


def optimize_export(folder: Path, architecture: str, component_precision: dict[str, str], *,
                    cuda_only_fusions: bool = True) -> dict:
    """Optimize every component of the fp32 export `folder` in place, each to its precision in
    `component_precision` (fp16 parts are converted after fusion; an fp16 VAE decoder keeps its optimized
    fp32 twin in vae_decoder_fp32/ as the engine's overflow fallback). Returns the manifest entries."""
    import shutil

    from models_export.progress import step

    check_architecture(architecture)
    folder = Path(folder)
    fused: dict[str, dict[str, int]] = {}
    extra: dict = {}
    for component, model_type in MODEL_TYPES.items():
        graph = folder / component / "model.onnx"
        if not graph.is_file():
            continue
        fp16 = component_precision.get(component) == "fp16"
        if component == "vae_decoder" and fp16:  # the fp32 fallback: the same optimization, not converted
            twin = folder / FP32_VAE_DECODER
            shutil.copytree(folder / component, twin)
            with step("optimizing the fp32 fallback decoder for CUDA"):
                fused[FP32_VAE_DECODER] = optimize_component(twin / "model.onnx", model_type, fp16=False,
                                                             cuda_only_fusions=cuda_only_fusions)
            extra["fp32_fallback"] = {"vae_decoder": FP32_VAE_DECODER}
        with step(f"optimizing {component} for CUDA ({'fp16' if fp16 else 'fp32'})"):
            fused[component] = optimize_component(graph, model_type, fp16=fp16, cuda_only_fusions=cuda_only_fusions,
                                                  fp32_ops=FP32_OPS.get((architecture, component)))
    return {"target": "cuda", "graph_optimization": "offline", "cuda_only_fusions": cuda_only_fusions,
            "fused_ops": fused, "lora": "unsupported", **extra}


def _timestep_embedding_nodes(graph) -> list[str]:
    """The nodes from the `timestep` input up to the time embedding's first MatMul/Gemm (excluded): the
    sinusoidal embedding, which stays float32 in an fp16 UNet (diffusers computes it so)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names, pending, seen = [], ["timestep"], {"timestep"}
    while pending:
        for node in consumers.get(pending.pop(), []):
            if node.op_type in ("MatMul", "Gemm") or not node.name or node.name in names:
                continue
            names.append(node.name)
            for output in node.output:
                if output not in seen:
                    seen.add(output)
                    pending.append(output)
    return names


def _float32_timestep_input(graph) -> None:
    from onnx import TensorProto

    for value in graph.input:
        if value.name == "timestep" and value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            raise CudaTargetError("the fp16 conversion made the UNet's timestep input float16")


@contextlib.contextmanager
def _numpy2_head_count():
    """onnxruntime 1.31's UNet attention fusion reads the head count with int() on a one-element array,
    which numpy 2 refuses (TypeError): read it with .item() instead, for the duration of the fusion."""
    import sys

    import numpy as np
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path, as it imports itself)

    # The optimizer imports its modules by their bare names: patch the class it uses, not a second copy.
    FusionAttentionUnet = sys.modules["fusion_attention_unet"].FusionAttentionUnet
    original = FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:  # Reshape(q, Concat(batch, length, heads, head size))
            shape = self.model.get_parent(reshape_q, 1)
            if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
                return 0
            value = self.model.get_constant_value(shape.input[2])
        else:  # Reshape(q, [0, 0, heads, head size])
            value = self.model.get_constant_value(reshape_q.input[1])
            value = value[2:3] if isinstance(value, np.ndarray) and value.shape == (4,) else None
        heads = int(value.item()) if isinstance(value, np.ndarray) and value.size == 1 else 0
        return max(heads, 0)

    FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        FusionAttentionUnet.get_num_heads = original


@contextlib.contextmanager
def _quiet_optimizer():
    """The optimizer logs every fusion step at INFO, under its bare module names: keep the console to our
    progress lines by dropping its records below WARNING at the root handlers (warnings still show)."""
    import onnxruntime.transformers

    folder = str(Path(onnxruntime.transformers.__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(folder)

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)
