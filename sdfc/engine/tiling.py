"""Seamless images (A1111's `tiling`): every 2-D convolution pads its input by wrapping around.

A1111 switches each `torch.nn.Conv2d` of the loaded model (UNet, VAE encoder and decoder; the text
encoder has none) to `padding_mode = 'circular'`. An ONNX graph has no padding mode to switch, so the
graph is rewritten when its session is created: each Conv with non-zero `pads` gets an explicit wrap-around
pad of its input (Slice + Concat per spatial axis) and then runs with pads 0.

Why Slice + Concat and not `Pad` with mode "wrap": that mode exists only from opset 19 on, our exports are
opset 18, and the two ops run on every execution provider for any opset and dtype (fp16 too).

Convolutions that already pad explicitly (the VAE encoder's downsamplers: a zero `Pad` then a Conv with
pads 0) stay as they are, as in A1111, where those Conv2d have padding 0 and the circular mode changes nothing.

Weights are not touched: the graph is read without its external data and handed to onnxruntime as bytes,
with the model's folder as the place to find `model.onnx_data`, so the tiled session maps the same file
as the normal one instead of reading the weights into memory a second time (a graph with embedded weights,
which sdfc's exports never are, would be copied whole into those bytes while its session loads). What the
tiled sessions do cost is onnxruntime's own prepacked copy of the Conv and MatMul weights, as any session's:
memory.py counts it (MemoryProfile.tiled_weights_bytes) once they are built or about to be.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# The model parts whose convolutions tiling makes circular (the text encoder has none).
TILED_COMPONENTS = ("unet", "vae_decoder", "vae_encoder")
INT64_MAX = np.iinfo(np.int64).max
# onnxruntime resolves external-data paths of a graph given as bytes relative to this folder.
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class TilingError(ValueError):
    """A graph that cannot be made seamless (a convolution whose padding is not explicit)."""


def _attribute(node, name: str, default=None):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _conv_pads(node) -> list[int] | None:
    """The (top, left, bottom, right) pads of a 2-D Conv that pads, or None when it does not pad."""
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(_attribute(node, "pads", []) or [])
    if auto_pad not in ("NOTSET", "VALID"):
        # SAME_* pads depend on the input size; the torch exporter always writes explicit pads.
        raise TilingError(f"Conv {node.name!r} uses auto_pad {auto_pad}: cannot make it seamless")
    if auto_pad == "VALID" or not any(pads):
        return None
    if len(pads) != 4:  # A1111 changes Conv2d only; 1-D and 3-D convolutions keep their zero padding
        return None
    return pads


class _GraphEditor:
    """New nodes, constants and unique names for one graph."""

    def __init__(self, graph):
        self.graph = graph
        self.names = {v for n in graph.node for v in (*n.input, *n.output, n.name)}
        self.names |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
        self.constants: dict[tuple, str] = {}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def int64s(self, *values: int) -> str:
        """A small int64 initializer (shared by every node that needs the same values)."""
        from onnx import numpy_helper

        if values not in self.constants:
            name = self.unique("tiling/const_" + "_".join(str(v) for v in values).replace("-", "m"))
            self.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
            self.constants[values] = name
        return self.constants[values]


def _wrap_axis(editor: _GraphEditor, nodes: list, x: str, axis: int, before: int, after: int, tag: str) -> str:
    """`x` with its last `before` entries along `axis` put in front and its first `after` entries appended."""
    from onnx import helper

    if not before and not after:
        return x
    parts = []
    if before:
        head = editor.unique(f"{tag}/wrap{axis}_before")
        nodes.append(helper.make_node("Slice", [x, editor.int64s(-before), editor.int64s(INT64_MAX),
                                                editor.int64s(axis)], [head], name=editor.unique(head)))
        parts.append(head)
    parts.append(x)
    if after:
        tail = editor.unique(f"{tag}/wrap{axis}_after")
        nodes.append(helper.make_node("Slice", [x, editor.int64s(0), editor.int64s(after), editor.int64s(axis)],
                                      [tail], name=editor.unique(tail)))
        parts.append(tail)
    out = editor.unique(f"{tag}/wrapped{axis}")
    nodes.append(helper.make_node("Concat", parts, [out], name=editor.unique(out), axis=axis))
    return out


def make_circular(model) -> int:
    """Rewrite `model` (an onnx.ModelProto) in place so that its 2-D convolutions pad circularly.

    Returns how many Conv nodes were changed. Padded inputs are shared by the Convs that read the same tensor
    with the same pads. Only the main graph is rewritten (the SD graphs have no subgraphs or functions).
    """
    from onnx import helper

    graph = model.graph
    editor = _GraphEditor(graph)
    padded: dict[tuple, str] = {}
    rewritten: list = []
    changed = 0
    for node in graph.node:
        pads = _conv_pads(node) if node.op_type == "Conv" and node.domain in ("", "ai.onnx") else None
        if pads is None:
            rewritten.append(node)
            continue
        top, left, bottom, right = pads
        key = (node.input[0], top, left, bottom, right)
        if key not in padded:
            tag = node.name or node.output[0]
            x = _wrap_axis(editor, rewritten, node.input[0], 3, left, right, tag)  # width (NCHW)
            padded[key] = _wrap_axis(editor, rewritten, x, 2, top, bottom, tag)   # then height
        conv = helper.make_node("Conv", [padded[key], *node.input[1:]], list(node.output), name=node.name)
        conv.attribute.extend(a for a in node.attribute if a.name != "pads")
        conv.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
        rewritten.append(conv)
        changed += 1
    del graph.node[:]
    graph.node.extend(rewritten)
    return changed


def circular_graph_bytes(path: Path) -> tuple[bytes, int]:
    """The seamless variant of the graph at `path`, serialized, and its number of changed convolutions.

    The graph is read without its external data: initializers keep pointing at the data file beside
    `path` (see EXTERNAL_DATA_FOLDER_KEY), so only the graph structure (kilobytes to a few MB) is copied.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = make_circular(model)
    return model.SerializeToString(), changed
