"""Where each PyTorch weight of the UNet and text encoder ended up in its ONNX graph: `<component>/weights_map.json`.

torch.onnx keeps a parameter's name only where the graph uses it as is (Conv weights); a Linear weight is
folded into a transposed constant with a generated name (`onnx::MatMul_1629`). The engine needs the link to
merge a LoRA's `W + w·ΔW` into the right initializer (sdfc/engine/lora.py), so the export records it: each
weight is found among the initializers by its exact values, as is or transposed, in the export's precision.
A weight whose values are not unique (all-ones norms, zero biases) is left out; LoRAs target none of those.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MAP_FILE = "weights_map.json"
FORMAT = 1
COMPONENTS = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel"}


def _key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest()


def initializers(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_map(state_dict: dict[str, np.ndarray], graph_initializers: dict[str, np.ndarray]) -> dict[str, dict]:
    by_values: dict[tuple, list[str]] = {}
    for name, array in graph_initializers.items():
        if array.ndim >= 2:
            by_values.setdefault(_key(array), []).append(name)
    found = {}
    dtype = _dtype_of(graph_initializers, np.float32)
    for name, weight in state_dict.items():
        if weight.ndim < 2:
            continue
        for transpose, candidate in ((False, weight), (True, weight.T if weight.ndim == 2 else None)):
            if candidate is None:
                continue
            names = by_values.get(_key(candidate.astype(dtype)), [])
            if len(names) == 1:
                found[name] = {"initializer": names[0], "transpose": transpose}
                break
    return found


def _dtype_of(graph_initializers: dict[str, np.ndarray], fallback):
    # The export's precision: the dtype most 2-D+ initializers have (fp16 exports keep a few fp32 constants).
    dtypes = [a.dtype for a in graph_initializers.values() if a.ndim >= 2]
    return max(set(dtypes), key=dtypes.count) if dtypes else fallback


def write_weight_maps(src: Path, out: Path) -> None:
    """Write `weights_map.json` beside the UNet and text encoder graphs of the export `out` of `src`."""
    import diffusers
    import transformers

    for component, class_name in COMPONENTS.items():
        module_class = getattr(diffusers, class_name, None) or getattr(transformers, class_name)
        module = module_class.from_pretrained(str(Path(src) / component))
        state = {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
        mapping = weight_map(state, initializers(Path(out) / component / "model.onnx"))
        (Path(out) / component / MAP_FILE).write_text(
            json.dumps({"format": FORMAT, "weights": mapping}, indent=0, sort_keys=True) + "\n")
