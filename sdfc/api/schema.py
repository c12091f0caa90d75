"""Request models declared as plain data: validation with A1111's coercions, and their JSON Schema.

A1111 validates with pydantic v1 (FastAPI 0.94), whose coercions clients rely on: `"42"` → 42 and
`20.7` → 20 for ints, `7` → 7.0 for floats, numbers → str for strings, `"yes"` → True for bools, and an
explicit null accepted for every optional field. Type errors become FastAPI's 422 `detail` list with the
same `loc`/`msg`/`type` entries. Unknown fields are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class Invalid(Exception):
    def __init__(self, msg: str, kind: str):
        super().__init__(msg)
        self.msg, self.kind = msg, kind


def _to_int(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise Invalid("value is not a valid integer", "type_error.integer")
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise Invalid("value is not a valid integer", "type_error.integer")


def _to_float(v):
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise Invalid("value is not a valid float", "type_error.float")


def _to_str(v):
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise Invalid("str type expected", "type_error.str")


def _to_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise Invalid("value could not be parsed to a boolean", "type_error.bool")


def _to_list(v):
    if isinstance(v, (list, tuple)):
        return list(v)
    raise Invalid("value is not a valid list", "type_error.list")


def _to_dict(v):
    if isinstance(v, dict):
        return v
    raise Invalid("value is not a valid dict", "type_error.dict")


def _any(v):
    return v


COERCE = {"int": _to_int, "float": _to_float, "str": _to_str, "bool": _to_bool, "list": _to_list,
          "dict": _to_dict, "any": _any}
JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "list": "array",
              "dict": "object"}


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: Any = None
    description: str = ""
    required: bool = False
    items: str | None = None  # element type of a list, checked like the field itself

    def coerce(self, value):
        if value is None:
            return None
        out = COERCE[self.type](value)
        if self.items:
            out = [COERCE[self.items](v) for v in out]
        return out


@dataclass(frozen=True)
class Model:
    name: str
    fields: tuple[Field, ...]
    description: str = ""
    extra: dict = field(default_factory=dict)

    def parse(self, body: Any) -> tuple[dict, list[dict]]:
        """Coerced values for every field (defaults filled, schema order) and a 422 error list."""
        if not isinstance(body, dict):
            return {}, [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
        values, errors = {}, []
        for f in self.fields:
            if f.name not in body:
                if f.required:
                    errors.append({"loc": ["body", f.name], "msg": "field required", "type": "value_error.missing"})
                values[f.name] = f.default
                continue
            try:
                values[f.name] = f.coerce(body[f.name])
            except Invalid as exc:
                errors.append({"loc": ["body", f.name], "msg": exc.msg, "type": exc.kind})
        return values, errors

    def json_schema(self) -> dict:
        props = {}
        for f in self.fields:
            prop = {"title": f.name.replace("_", " ").title()}
            if f.type in JSON_TYPES:
                prop["type"] = JSON_TYPES[f.type]
            if f.items in JSON_TYPES:
                prop["items"] = {"type": JSON_TYPES[f.items]}
            if f.default is not None:
                prop["default"] = f.default
            if f.description:
                prop["description"] = f.description
            props[f.name] = prop
        schema = {"title": self.name, "type": "object", "properties": props}
        required = [f.name for f in self.fields if f.required]
        if required:
            schema["required"] = required
        if self.description:
            schema["description"] = self.description
        return schema
