"""Read a `.safetensors` file with numpy only (no torch, and no pickle: the format is a JSON header and raw
little-endian tensors, so reading it runs no code). Used for embeddings and LoRAs.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}
MAX_HEADER_BYTES = 1 << 24


class SafetensorsError(ValueError):
    pass


def _read_header(f) -> dict:
    """The JSON header of an open safetensors file (8-byte little-endian size, then the JSON); `f` is left at
    the start of the tensor data."""
    raw = f.read(8)
    if len(raw) != 8:
        raise SafetensorsError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw)
    if size > MAX_HEADER_BYTES:
        raise SafetensorsError(f"safetensors header of {size} bytes is too large")
    try:
        header = json.loads(f.read(size))
    except ValueError:
        raise SafetensorsError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsError("not a safetensors file (its header is not an object)")
    return header


def _metadata_of(header: dict) -> dict[str, str]:
    metadata = header.get("__metadata__")
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        return _metadata_of(_read_header(f))


def data_sha256(path: Path) -> str:
    """sha256 of the tensor data after the header (kohya's / A1111's LoRA hash: metadata edits keep it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _read_header(f)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, __metadata__) of a safetensors file: 8-byte little-endian header size, JSON header, data."""
    with open(path, "rb") as f:
        header = _read_header(f)
        data = f.read()
    metadata = _metadata_of(header)
    header.pop("__metadata__", None)
    tensors = {}
    for name, spec in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[spec["dtype"]]
            start, end = (int(v) for v in spec["data_offsets"])
            shape = [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"tensor {name!r}: unsupported dtype or malformed entry") from None
        if not 0 <= start <= end <= len(data):
            raise SafetensorsError(f"tensor {name!r} lies outside the file")
        if dtype == "bf16":  # bfloat16 is the upper half of a float32
            halves = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
            array = halves.view(np.float32)
        else:
            array = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        if array.size != int(np.prod(shape)):
            raise SafetensorsError(f"tensor {name!r} holds {array.size} values for shape {shape}")
        tensors[name] = array.reshape(shape).astype(np.float32)
    return tensors, metadata
