"""Extra text-encoder outputs for A1111's "CLIP skip" (setting `CLIP_stop_at_last_layers`).

A1111 with CLIP skip N > 1 takes the text encoder's hidden state N layers from the end and applies the
final layer norm to it: `final_layer_norm(hidden_states[-N])`; N = 1 is the plain `last_hidden_state`.
A torch-free engine cannot apply that layer norm without its weights, so the exported graph gets one more
output per N, `clip_skip_N` for N = 2 .. number of layers, each a LayerNormalization node that shares the
final layer norm's weights. The existing outputs (`last_hidden_state`, `pooler_output`) are unchanged.

hidden_states[k] (k = 0 .. L) is the input of encoder layer k, i.e. of its first layer norm, found by the
weight it uses (`text_model.encoder.layers.{k}.layer_norm1.weight`, the state-dict name the exporter
keeps), and hidden_states[L] is the input of the final layer norm. The manifest maps N to the output name.
"""
from __future__ import annotations

import re
from pathlib import Path

from models_export.onnx_export import ExportError

FINAL_OUTPUT = "last_hidden_state"
LAYER_NORM1 = re.compile(r"text_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight")


def output_name(n: int) -> str:
    return FINAL_OUTPUT if n == 1 else f"clip_skip_{n}"


def add_clip_skip_outputs(model_path: Path) -> dict[int, str]:
    """Add the `clip_skip_N` outputs to a text encoder ONNX file in place; returns {N: output name}."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    graph = model.graph
    final = _final_layer_norm(graph, model_path)
    layer_inputs = _layer_inputs(graph)
    layers = len(layer_inputs)
    if sorted(layer_inputs) != list(range(layers)) or not layers:
        raise ExportError(f"{str(model_path)!r}: cannot find the inputs of every text encoder layer "
                          f"(found layers {sorted(layer_inputs)})")
    template = next(o for o in graph.output if o.name == FINAL_OUTPUT)
    outputs = {1: FINAL_OUTPUT}
    for n in range(2, layers + 1):
        hidden = layer_inputs[layers + 1 - n]  # hidden_states[-n] of the L + 1 hidden states
        name = output_name(n)
        graph.node.append(helper.make_node("LayerNormalization", [hidden, *final.input[1:]], [name],
                                           name=f"/clip_skip_{n}/LayerNormalization"))
        graph.node[-1].attribute.extend(final.attribute)
        value = graph.output.add()
        value.CopyFrom(template)
        value.name = name
        outputs[n] = name
    onnx.checker.check_model(model)
    onnx.save(model, str(model_path))
    return outputs


def _final_layer_norm(graph, model_path: Path):
    for node in graph.node:
        if FINAL_OUTPUT in node.output:
            if node.op_type != "LayerNormalization":
                raise ExportError(f"{str(model_path)!r}: {FINAL_OUTPUT} comes from {node.op_type}, "
                                  "not a LayerNormalization; cannot add CLIP-skip outputs")
            return node
    raise ExportError(f"{str(model_path)!r} has no {FINAL_OUTPUT} output")


def _layer_inputs(graph) -> dict[int, str]:
    """Encoder layer index -> name of the tensor entering it (the hidden state before that layer)."""
    found = {}
    for node in graph.node:
        if node.op_type == "LayerNormalization" and len(node.input) > 1:
            if m := LAYER_NORM1.fullmatch(node.input[1]):
                found[int(m[1])] = node.input[0]
    return found
