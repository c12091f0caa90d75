"""Read one initializer of an ONNX file without the `onnx` package (not a serving dependency).

An ONNX file is a protobuf ModelProto: graph (field 7) → initializer (field 5, TensorProto) → dims (1),
data_type (2), name (8), raw_data (9) or typed data (float_data 4, int64 10, …), external_data (13: key/value
pairs location, offset, length) with data_location (14) = 1. Only the wire format is walked: the file is
memory-mapped and just the wanted tensor's bytes are copied.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

# TensorProto.DataType → numpy dtype, for the types initializers of SD models use.
DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 16: None}  # 16: bfloat16
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class OnnxFormatError(ValueError):
    pass


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxFormatError("varint too long")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) for each field."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _BYTES:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise OnnxFormatError("field runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")


def _packed_varints(buf, span) -> list[int]:
    values, pos = [], span[0]
    while pos < span[1]:
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def read_initializer(model_path: str | Path, name: str) -> np.ndarray:
    """The initializer `name` of the ONNX file at `model_path` as a numpy array (a copy)."""
    model_path = Path(model_path)
    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = next((v for n, w, v in _fields(buf, 0, len(buf)) if n == 7 and w == _BYTES), None)
        if graph is None:
            raise OnnxFormatError(f"{model_path} has no graph")
        for number, wire, span in _fields(buf, *graph):
            if number == 5 and wire == _BYTES:
                tensor = _tensor_if_named(buf, span, name, model_path.parent)
                if tensor is not None:
                    return tensor
    raise KeyError(f"{model_path} has no initializer {name!r}")


def _tensor_if_named(buf, span, wanted: str, folder: Path) -> np.ndarray | None:
    dims, data_type, raw, floats, external, tensor_name = [], 1, None, None, {}, None
    for number, wire, value in _fields(buf, *span):
        if number == 8 and wire == _BYTES:
            tensor_name = bytes(buf[value[0]:value[1]]).decode("utf-8")
            if tensor_name != wanted:
                return None
        elif number == 1:
            dims.extend(_packed_varints(buf, value) if wire == _BYTES else [value])
        elif number == 2 and wire == _VARINT:
            data_type = value
        elif number == 9 and wire == _BYTES:
            raw = value
        elif number == 4 and wire == _BYTES:
            floats = value
        elif number == 13 and wire == _BYTES:
            entry = {k: bytes(buf[v[0]:v[1]]).decode("utf-8") for k, _, v in _fields(buf, *value) if k in (1, 2)}
            external[entry.get(1, "")] = entry.get(2, "")
    if tensor_name != wanted:
        return None
    dtype = DTYPES.get(data_type)
    if dtype is None:
        raise OnnxFormatError(f"initializer {wanted!r} has data type {data_type}, which this reader does not handle")
    count = int(np.prod(dims)) if dims else 1
    if external:
        location = folder / external["location"]
        if folder.resolve() not in location.resolve().parents:
            raise OnnxFormatError(f"external data of {wanted!r} points outside the model folder")
        offset = int(external.get("offset", 0))
        data = np.fromfile(location, dtype=dtype, count=count, offset=offset)
    elif raw is not None:
        data = np.frombuffer(buf[raw[0]:raw[1]], dtype=dtype).copy()
    elif floats is not None and dtype == np.float32:
        data = np.frombuffer(buf[floats[0]:floats[1]], dtype="<f4").copy()
    else:
        raise OnnxFormatError(f"initializer {wanted!r} stores its data in a field this reader does not handle")
    if data.size != count:
        raise OnnxFormatError(f"initializer {wanted!r} holds {data.size} values for shape {dims}")
    return data.reshape(dims)
