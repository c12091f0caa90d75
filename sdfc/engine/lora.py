"""LoRAs as A1111's built-in Lora extension uses them: `<lora:name:weight>` in a prompt, merged into the weights.

A prompt's extra-network tags (`<lora:name:te:unet>`, `<lora:name:1:unet=0.5>`) are removed from its text and,
as A1111 1.10 does, those of the batch's first prompt are applied to the whole batch. Each LoRA module adds
`multiplier · scale · up·down` to one weight (scale = alpha / rank, or 1 without alpha); the sum over the LoRAs
is merged into the matching ONNX initializers when a session is made, through onnxruntime's initializer
override (the graph file is not rewritten). The export's `weights_map.json` says which initializer holds each
PyTorch weight, and whether transposed (models_export/weight_map.py). Sessions are kept per (model, LoRA set)
for the last few sets used.

Key layouts read: kohya/A1111 (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_…`
for the text encoder; LoCon conv layers), PEFT/diffusers (`unet.<module>.lora_A.weight`, `.lora_B.weight`,
`text_encoder.…`). A key that matches no weight of the model, or a shape that differs, is refused with the
names it concerns (a LoRA made for another architecture). LoHa/LoKr/DoRA and kohya's LDM-style names
(`lora_unet_input_blocks_…`) are refused the same way.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError
from .safetensors_file import SafetensorsError, data_sha256, read_metadata, read_safetensors

log = logging.getLogger("sdfc.engine")

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax
WEIGHTS_MAP = "weights_map.json"
PREFIXES = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te_", "text_encoder.")}
SESSION_SETS_KEPT = 2  # LoRA session sets per model (each holds a copy of the weights it changes)
MAX_NETWORKS = 16
MAX_MULTIPLIER = 100.0


class LoraError(InvalidRequestError):
    """A LoRA the request names that cannot be applied (missing, unreadable, made for another model)."""


@dataclass(frozen=True)
class NetworkUse:
    name: str
    te: float
    unet: float


def strip_extra_networks(prompt: str) -> str:
    return EXTRA_NETWORK.sub("", prompt)


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"{tag}: {text!r} is not a number") from None
    if not np.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise LoraError(f"{tag}: the multiplier must be finite and within ±{MAX_MULTIPLIER:g}")
    return value


def parse_networks(prompt: str) -> list[NetworkUse]:
    """The `<lora:…>` tags of one prompt, with A1111's argument rules: `name[:te[:unet]]`, or named `te=`,
    `unet=`; unet defaults to te, te to 1. Other extra networks (hypernet, …) are refused: sdfc has none."""
    uses = []
    for match in EXTRA_NETWORK.finditer(prompt):
        kind, args = match.group(1), match.group(2)
        tag = match.group(0)[:80]
        if kind not in ("lora", "lyco"):
            raise LoraError(f"{tag}: extra network type {kind!r} is not supported (only lora)")
        items = args.split(":")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        unknown = set(named) - {"te", "unet", "dyn"}
        if unknown or not positional or not positional[0].strip():
            raise LoraError(f"{tag}: expected <lora:name:weight> (named arguments te=, unet=)")
        te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
        unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
        uses.append(NetworkUse(positional[0].strip(), te, unet))
    if len(uses) > MAX_NETWORKS:
        raise LoraError(f"a prompt may use at most {MAX_NETWORKS} LoRAs, got {len(uses)}")
    return uses


def addnet_hash(path: Path) -> str:
    """kohya's / A1111's LoRA hash: sha256 of the file after its safetensors header (metadata edits keep it)."""
    return data_sha256(path)


@dataclass
class LoraFile:
    name: str
    path: Path
    metadata: dict

    @functools.cached_property
    def hash(self) -> str:
        # Read on first use, not for every file of the folder when the engine starts (LoRAs are often GBs on NAS).
        return addnet_hash(self.path)

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def listing(self) -> dict:
        """A1111's /sdapi/v1/loras entry (the path relative to the LoRA folder: no server paths leak)."""
        return {"name": self.name, "alias": self.alias, "path": self.path.name, "metadata": self.metadata}


class LoraLibrary:
    """The `.safetensors` LoRAs of one folder (sub-folders too), read again on `refresh`."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.files: dict[str, LoraFile] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        files = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*.safetensors")):
                if any(part.startswith(".") for part in path.relative_to(self.folder).parts):
                    continue
                try:
                    files[path.stem] = LoraFile(path.stem, path, read_metadata(path))
                except (OSError, SafetensorsError) as exc:
                    log.warning("LoRA %s skipped: %s", path.name, exc)
        with self._lock:
            self.files = files

    def find(self, name: str) -> LoraFile:
        files = self.files
        found = files.get(name) or next((f for f in files.values() if f.alias == name), None)
        if found is None:
            raise LoraError(f"LoRA {name!r} not found (available: {', '.join(sorted(files)) or 'none'}; "
                            "POST /sdapi/v1/refresh-loras after adding files)")
        return found


@dataclass
class _Module:
    component: str
    weight: str          # the PyTorch weight it changes, e.g. "down_blocks.0….to_q.weight"
    down: np.ndarray
    up: np.ndarray
    alpha: float | None


def _modules(tensors: dict[str, np.ndarray], maps: dict[str, dict], lora: str) -> list[_Module]:
    """Group a LoRA file's tensors by module and find each module's weight in the model."""
    kohya = {component: {prefixes[0] + w[: -len(".weight")].replace(".", "_"): w
                         for w in maps.get(component, {}) if w.endswith(".weight")}
             for component, prefixes in PREFIXES.items()}
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        for suffix, role in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
                             (".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                break
        else:
            unmatched.append(key)
            continue
        target = None
        for component, (kohya_prefix, peft_prefix) in PREFIXES.items():
            if module in kohya[component]:
                target = (component, kohya[component][module])
            elif module.startswith(peft_prefix) and f"{module[len(peft_prefix):]}.weight" in maps.get(component, {}):
                target = (component, f"{module[len(peft_prefix):]}.weight")
        if target is None:
            unmatched.append(key)
            continue
        groups.setdefault(target, {})[role] = tensor
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:4])
        raise LoraError(f"LoRA {lora!r} does not fit this model: {len(unmatched)} keys match none of its weights "
                        f"({shown}{', …' if len(unmatched) > 4 else ''}); it may be made for another architecture")
    modules = []
    for (component, weight), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"LoRA {lora!r}: module for {weight} lacks its up or down matrix")
        alpha = float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts else None
        modules.append(_Module(component, weight, parts["down"], parts["up"], alpha))
    return modules


def _delta(module: _Module, shape: tuple[int, ...], lora: str) -> np.ndarray:
    """up·down in the weight's own (PyTorch) layout: Linear (out, in), Conv (out, in, kh, kw)."""
    down, up = module.down.astype(np.float32), module.up.astype(np.float32)
    rank = down.shape[0]
    if up.ndim not in (2, 4) or up.shape[1] != rank:
        raise LoraError(f"LoRA {lora!r}: {module.weight} has up {list(up.shape)} for down {list(down.shape)}")
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    if product.size != int(np.prod(shape)) or product.shape[0] != shape[0]:
        raise LoraError(f"LoRA {lora!r} does not fit this model: {module.weight} is {list(shape)}, the LoRA "
                        f"gives {[up.shape[0], *down.shape[1:]]}")
    scale = module.alpha / rank if module.alpha is not None and rank else 1.0  # as A1111's calc_scale
    return product.reshape(shape) * np.float32(scale)


class LoraSessions:
    """Per model: the LoRA-merged UNet/text-encoder sessions of the last few LoRA sets, made on demand."""

    def __init__(self):
        self._sets: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def model_with(self, model, uses: list[NetworkUse], library: LoraLibrary, circular: bool = False):
        """A view of `model` (OnnxModel) with these LoRAs merged, and the infotext entry for them. `circular`:
        the UNet is the seamless one (tiling); the text encoder keeps the model's embeddings."""
        files = [(use, library.find(use.name)) for use in uses]
        embeddings = model.embeddings.db.signature if model.embeddings else ()
        key = (tuple((f.hash, use.te, use.unet) for use, f in files), circular, embeddings)
        with self._lock:
            sessions = self._sets.get(key)
            if sessions is None:
                sessions = _merged_sessions(model, files, circular)
                self._sets[key] = sessions
                while len(self._sets) > SESSION_SETS_KEPT:
                    self._sets.popitem(last=False)
            self._sets.move_to_end(key)
        return model.with_sessions(sessions), hashes_infotext(files)

    def resident_bytes(self, model_path: Path) -> int:
        """What the kept sets hold (counted by the model cache): each merged session has its own copy of its
        component's weights, the merged ones in its initializer arrays, the others read again from the file."""
        from .memory import component_weights_bytes

        with self._lock:
            components = [component for sessions in self._sets.values() for component in sessions]
        return sum(component_weights_bytes(model_path, component) for component in components)


def hashes_infotext(files: list[tuple[NetworkUse, LoraFile]]) -> dict:
    """A1111's "Lora hashes" entry: `alias: shorthash` per LoRA used."""
    parts = [f"{f.alias.replace(':', '').replace(',', '')}: {f.shorthash}" for _, f in files]
    return {"Lora hashes": ", ".join(dict.fromkeys(parts))} if parts else {}


def _merged_sessions(model, files: list[tuple[NetworkUse, LoraFile]], circular: bool) -> dict:
    from .onnx_tensors import read_initializer

    maps = model.weight_maps()
    if not maps:
        raise LoraError(f"model {model.info.name!r} has no {WEIGHTS_MAP} (exported before LoRA support): "
                        "export it again with `sdfc export` to use LoRAs")
    bases: dict[tuple[str, str], np.ndarray] = {}
    sums: dict[tuple[str, str], np.ndarray] = {}
    for use, lora in files:
        try:
            tensors, _ = read_safetensors(lora.path)
        except SafetensorsError as exc:
            raise LoraError(f"LoRA {lora.name!r} cannot be read: {exc}") from None
        for module in _modules(tensors, maps, lora.name):
            multiplier = use.te if module.component == "text_encoder" else use.unet
            if multiplier == 0:  # nothing to add: the model's own session serves, bit for bit
                continue
            entry = maps[module.component][module.weight]
            key = (module.component, entry["initializer"])
            if key not in bases:
                bases[key] = read_initializer(model.info.path / module.component / "model.onnx", key[1])
            shape = bases[key].shape[::-1] if entry["transpose"] else bases[key].shape
            delta = _delta(module, tuple(shape), lora.name) * np.float32(multiplier)
            delta = delta.T if entry["transpose"] else delta  # into the initializer's layout
            sums[key] = sums[key] + delta if key in sums else delta
    overrides: dict[str, dict[str, np.ndarray]] = {}
    for (component, initializer), delta in sums.items():
        base = bases[(component, initializer)]
        merged = (base.astype(np.float32) + delta).astype(base.dtype)
        overrides.setdefault(component, {})[initializer] = np.ascontiguousarray(merged)
    log.info("LoRA set %s merged into %d weights of %s", [f.name for _, f in files],
             sum(len(v) for v in overrides.values()), model.info.name)
    return {component: model.session_with_initializers(component, values, circular=circular and component == "unet")
            for component, values in overrides.items()}
