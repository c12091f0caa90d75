"""Per-component precision of an export: which parts are fp16, the UNet's float32 timestep, the fp32 VAE.

optimum's fp16 export (main_export dtype="fp16") casts every float input of every part to fp16, the UNet's
`timestep` included. fp16 spaces its values 0.5 apart between 512 and 1024 (0.25 from 256), so the
fractional timesteps k-diffusion samplers ask for (sigma -> t interpolates between integers) reach the
UNet rounded. diffusers' own fp16 pipeline keeps the timestep float32 up to the sinusoidal embedding, which
it computes in float32 and only then casts to the model dtype: `keep_timestep_float32` makes the exported
graph do the same (float32 input, float32 up to the graph's own cast to float32, fp16 after).

The VAE may be exported at another precision than the rest (`--vae-precision`): its fp32 parts come from a
second optimum export of the VAE alone (the same graphs a fp32 export writes). An fp16 VAE decoder gets an
fp32 twin in `vae_decoder_fp32/`, which the engine decodes with when the fp16 one overflows (A1111's
automatic VAE revert, option auto_vae_precision).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

PRECISIONS = ("fp32", "fp16")
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
FP32_VAE_DECODER = "vae_decoder_fp32"  # the fallback decoder's folder (manifest: "fp32_fallback")
# Tensor-moving ops the timestep passes through on its way to the embedding's float32 cast: they work on any
# element type, so the float32 timestep can flow through them unchanged.
_TYPE_AGNOSTIC_OPS = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Identity", "Flatten"}
_NOT_VAE_PARTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")


def default_vae_precision(architecture: str, precision: str) -> str:
    """The VAE's precision when --vae-precision is not given.

    fp32 exports are fp32 throughout. SDXL's VAE overflows fp16 on ordinary images (its activations exceed
    65504; hence the separately trained "sdxl-vae-fp16-fix"), so SDXL exports keep it fp32. SD 1.x/2.x VAEs
    overflow only rarely (large, high-contrast images): they stay fp16 like A1111's default half VAE, for
    half the VAE's memory and time, and the fp32 fallback decoder written beside them catches the rare
    overflow as A1111's automatic revert does.
    """
    if precision == "fp32":
        return "fp32"
    return "fp32" if architecture.startswith("sdxl") else "fp16"


def component_precisions(components: list[str], precision: str, vae_precision: str) -> dict[str, str]:
    return {c: vae_precision if c in VAE_COMPONENTS else precision for c in sorted(components)}


def apply(src: Path, out: Path, vae_precision: str, trace_shapes: dict) -> dict:
    """After an fp16 export of `src` into `out`: float32 timestep, the VAE at `vae_precision` (fp32 parts from
    an fp32 export of the VAE alone), and an fp32 fallback decoder beside an fp16 one. Returns the manifest
    entries this adds ({"fp32_fallback": {...}} or {})."""
    from models_export.progress import step

    with step("keeping the UNet's timestep input float32"):
        keep_timestep_float32(out / "unet" / "model.onnx")
    with tempfile.TemporaryDirectory(prefix="sdfc-vae-fp32-") as tmp:
        fp32 = Path(tmp)
        with step("exporting the VAE in fp32"):
            export_fp32_vae(src, fp32, trace_shapes)
        if vae_precision == "fp32":
            for component in VAE_COMPONENTS:
                shutil.rmtree(out / component)
                shutil.move(str(fp32 / component), str(out / component))
            return {}
        shutil.move(str(fp32 / "vae_decoder"), str(out / FP32_VAE_DECODER))
    return {"fp32_fallback": {"vae_decoder": FP32_VAE_DECODER}}


def export_fp32_vae(src: Path, out: Path, trace_shapes: dict) -> None:
    """optimum's fp32 export of `src`'s VAE only (vae_encoder/, vae_decoder/ under `out`): the pipeline is
    loaded without its UNet and text encoders, so their fp32 weights are neither loaded nor traced."""
    import torch
    from diffusers import DiffusionPipeline
    from optimum.exporters.onnx import onnx_export_from_model

    index = json.loads((src / "model_index.json").read_text())
    skipped = {part: None for part in _NOT_VAE_PARTS if part in index}
    pipeline = DiffusionPipeline.from_pretrained(str(src), torch_dtype=torch.float32, **skipped)
    onnx_export_from_model(pipeline, output=str(out), task="text-to-image", do_validation=False, device="cpu",
                           **trace_shapes)


def keep_timestep_float32(unet_path: Path) -> int:
    """Make the UNet graph's `timestep` input float32 where it is float16; returns how many Casts changed.

    From the input, the float32 value flows through type-agnostic ops; a Cast to float16 on that path
    becomes a Cast to float32, and the walk ends at a Cast to float32 (the embedding's own), which then
    casts nothing. Any other consumer gets a Cast to float16 in front of it, so the graph stays valid
    whatever the exporter traced. Only the graph file is rewritten; its weights file is left as it is.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(unet_path), load_external_data=False)
    graph = model.graph
    timestep = next((i for i in graph.input if i.name == "timestep"), None)
    if timestep is None or timestep.type.tensor_type.elem_type != TensorProto.FLOAT16:
        return 0
    timestep.type.tensor_type.elem_type = TensorProto.FLOAT
    retyped, pending, changed, new_nodes = {"timestep"}, ["timestep"], 0, []
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    while pending:
        tensor = pending.pop()
        for node in consumers.get(tensor, []):
            to = next((a for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
            if node.op_type in _TYPE_AGNOSTIC_OPS and node.input[0] == tensor:
                follow = True
            elif to is not None and to.i == TensorProto.FLOAT16:
                to.i, follow = TensorProto.FLOAT, True
                changed += 1
            elif to is not None:
                follow = False  # a cast to float32 (or an integer type) takes float32 input as it is
            else:  # an fp16 op reads the value: give it fp16, as before
                half = f"{tensor}_float16"
                if half not in retyped:
                    new_nodes.append(helper.make_node("Cast", [tensor], [half], to=TensorProto.FLOAT16,
                                                      name=f"{tensor}_to_float16"))
                    retyped.add(half)
                node.input[:] = [half if i == tensor else i for i in node.input]
                continue
            if follow:
                for output in node.output:
                    if output not in retyped:
                        retyped.add(output)
                        pending.append(output)
    for info in list(graph.value_info) + list(graph.output):
        if info.name in retyped and info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    # A graph's nodes must stay topologically sorted: each new Cast goes right after its input's producer.
    for cast in new_nodes:
        producer = next((k for k, n in enumerate(graph.node) if cast.input[0] in n.output), -1)
        graph.node.insert(producer + 1, cast)
    onnx.save_model(model, str(unet_path))
    onnx.checker.check_model(str(unet_path))  # by path: the checker then finds the weights file beside it
    return changed
