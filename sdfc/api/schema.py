"""Request models declared as plain data: validation with A1111's coercions, and their JSON Schema.

A1111 validates with pydantic v1 (FastAPI 0.94), whose coercions clients rely on: `"42"` → 42 and
`20.7` → 20 for ints, `7` → 7.0 for floats, numbers → str for strings, `"yes"` → True for bools, and an
explicit null accepted for every optional field. Type errors become FastAPI's 422 `detail` list with the
same `loc`/`msg`/`type` entries. Unknown fields are ignored.

Numeric strings (`"20"` for an int) are taken only where the OpenAPI document can say exactly which strings
are valid: integer fields bounded by their sign alone (seeds, `mask_blur`, ...), as at most 18 digits
(`string_pattern()`). JSON Schema cannot state a numeric range for a string, so a field with any other
bound (steps, sizes, batch counts, every float) takes numbers only; a string there is pydantic's
`type_error.integer`/`type_error.float`, and the document gives only the number branch.

Stricter than A1111 where A1111 would fail later (a 500 from the engine, or a response that is not valid
JSON): floats must be finite, every int fits a signed 64-bit integer unless its field says otherwise, and
fields may carry bounds (`ge`/`le`) or a fixed set of values; these are pydantic's own constraint errors
(`value_error.number.not_ge`, ...), declared in the OpenAPI document as `minimum`/`maximum`/`enum`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}
# Strings read as numbers: what `int()`/`float()` take, less their extras ("1_000", "nan", "٣"), so that
# the OpenAPI document can state exactly what is accepted (schemathesis checks that it does).
INT_PATTERN = r"^\s*[+-]?[0-9]+\s*$"
FLOAT_PATTERN = r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"
BOOL_PATTERN = r"^\s*(" + "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)
                                    for word in sorted(_TRUE | _FALSE)) + r")\s*$"
_INT_RE, _FLOAT_RE = re.compile(INT_PATTERN, re.ASCII), re.compile(FLOAT_PATTERN, re.ASCII)
# Numeric strings for integer fields bounded by their sign only. At most 18 digits: every such string is
# inside int64 (and the seeds' range), so the pattern is the whole rule. Whitespace is spelled out, not `\s`
# (ECMA and Python's unicode `\s` differ from what `int()` strips).
_WS = r"[\t\n\v\f\r ]*"
SIGN_PATTERNS = {
    "any": rf"^{_WS}[+-]?[0-9]{{1,18}}{_WS}$",
    "minus_one": rf"^{_WS}(-0*1|\+?[0-9]{{1,18}}){_WS}$",
    "non_negative": rf"^{_WS}\+?[0-9]{{1,18}}{_WS}$",
    "positive": rf"^{_WS}\+?0*[1-9][0-9]{{0,17}}{_WS}$",
}
_SIGN_RES = {kind: re.compile(pattern) for kind, pattern in SIGN_PATTERNS.items()}
_NO_UPPER = 10 ** 18  # an upper bound at or beyond this is no bound for an 18-digit string

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class Invalid(Exception):
    def __init__(self, msg: str, kind: str, ctx: dict | None = None, loc: tuple = ()):
        super().__init__(msg)
        self.msg, self.kind, self.ctx, self.loc = msg, kind, ctx, loc


def _to_int(v):
    if isinstance(v, bool):
        raise Invalid("value is not a valid integer", "type_error.integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise Invalid("value is not a valid integer", "type_error.integer")
        return int(v)
    if isinstance(v, str) and len(v) <= 64 and _INT_RE.match(v):  # longer: no int64 (and int() is quadratic)
        return int(v.strip())
    raise Invalid("value is not a valid integer", "type_error.integer")


def _to_float(v):
    if isinstance(v, bool):
        raise Invalid("value is not a valid float", "type_error.float")
    if isinstance(v, (int, float)):
        try:
            out = float(v)
        except OverflowError:  # an int beyond float range
            raise Invalid("ensure this value is a finite number", "value_error.number.not_finite_number") from None
    elif isinstance(v, str) and len(v) <= 64 and _FLOAT_RE.match(v):
        out = float(v.strip())
    else:
        raise Invalid("value is not a valid float", "type_error.float")
    if not math.isfinite(out):  # NaN/Infinity would poison the job and cannot be written back as JSON
        raise Invalid("ensure this value is a finite number", "value_error.number.not_finite_number")
    return out


def _to_str(v):
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise Invalid("str type expected", "type_error.str")


def _to_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
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


# What each coercion accepts, as JSON Schema: the OpenAPI document must not claim less than the server takes.
# Bounds and enums sit beside `anyOf` (they apply to numbers only), so the server limits docs.py adds apply.
# Numeric fields get their string branch from Field.string_pattern(), where they have one.
ACCEPTED_SCHEMAS = {
    "int": [{"type": "integer"}, {"type": "number"}],
    "float": [{"type": "number"}],
    "str": [{"type": "string"}, {"type": "number"}],
    "bool": [{"type": "boolean"}, {"type": "number", "enum": [0, 1]}, {"type": "string", "pattern": BOOL_PATTERN}],
}


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: Any = None
    description: str = ""
    required: bool = False
    items: str | None = None  # element type of a list, checked like the field itself
    ge: float | None = None   # bounds (ints default to the int64 range)
    le: float | None = None
    choices: tuple | None = None  # A1111's Literal[...] fields
    nullable: bool = True     # False: an explicit null is pydantic's "none is not an allowed value"
    # False: the server limits this field beyond ge/le (SDFC_MAX_*, pixel products), so no numeric string:
    # the document can state those limits for numbers only.
    strings: bool = True
    # A regex a "str" field must match (no number coercion then): a value the server keys on. Matched as
    # JSON Schema validators in Python do (re.search), so a `$` pattern admits one trailing newline: the
    # value kept is the matched text.
    pattern: str | None = None

    def string_pattern(self) -> str | None:
        """The numeric strings this field takes (a regex), or None: numbers only."""
        kind = self._sign_kind()
        return SIGN_PATTERNS[kind] if kind else None

    def _sign_kind(self) -> str | None:
        if self.type != "int" or self.choices is not None or not self.strings:
            return None
        ge, le = self.bounds()
        if le < _NO_UPPER:
            return None
        if ge <= -_NO_UPPER:
            return "any"
        return {-1: "minus_one", 0: "non_negative", 1: "positive"}.get(ge)

    def bounds(self) -> tuple[float | None, float | None]:
        if self.type == "int":
            return (INT64_MIN if self.ge is None else self.ge), (INT64_MAX if self.le is None else self.le)
        return self.ge, self.le

    def coerce(self, value):
        if value is None:
            if self.required or not self.nullable:
                raise Invalid("none is not an allowed value", "type_error.none.not_allowed")
            return None
        if self.choices is not None:  # as pydantic's Literal: the value itself, no coercion
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in self.choices:
                permitted = ", ".join(repr(c) for c in self.choices)
                raise Invalid(f"unexpected value; permitted: {permitted}", "value_error.const",
                              {"given": value, "permitted": list(self.choices)})
            return type(self.choices[0])(value)
        if isinstance(value, str) and self.type in ("int", "float"):
            kind = self._sign_kind()
            if kind is None or not _SIGN_RES[kind].match(value):
                raise Invalid(f"value is not a valid {'integer' if self.type == 'int' else 'float'}",
                              f"type_error.{'integer' if self.type == 'int' else 'float'}")
        if self.pattern is not None:
            match = re.search(self.pattern, value) if isinstance(value, str) else None
            if match is None:
                if not isinstance(value, str):
                    raise Invalid("str type expected", "type_error.str")
                raise Invalid(f'string does not match regex "{self.pattern}"', "value_error.str.regex",
                              {"pattern": self.pattern})
            return match.group(0)
        out = COERCE[self.type](value)
        if self.items:
            coerce_item = COERCE[self.items]
            for i, item in enumerate(out):
                try:
                    out[i] = coerce_item(item)
                except Invalid as exc:
                    raise Invalid(exc.msg, exc.kind, exc.ctx, (i,)) from None
        if self.type in ("int", "float"):
            self._check_number(out)
            if isinstance(value, float) and value != out:
                self._check_number(value)  # 1.5 is over le=1 although int() makes it 1
        return out

    def _check_number(self, out) -> None:
        ge, le = self.bounds()
        if ge is not None and out < ge:
            raise Invalid(f"ensure this value is greater than or equal to {ge}", "value_error.number.not_ge",
                          {"limit_value": ge})
        if le is not None and out > le:
            raise Invalid(f"ensure this value is less than or equal to {le}", "value_error.number.not_le",
                          {"limit_value": le})


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
                error = {"loc": ["body", f.name, *exc.loc], "msg": exc.msg, "type": exc.kind}
                if exc.ctx is not None:
                    error["ctx"] = exc.ctx
                errors.append(error)
        return values, errors

    def json_schema(self) -> dict:
        props = {}
        for f in self.fields:
            prop = {"title": f.name.replace("_", " ").title()}
            if f.pattern is not None:
                prop.update(type="string", pattern=f.pattern)
            elif f.type in ACCEPTED_SCHEMAS and f.choices is None:
                prop["anyOf"] = list(ACCEPTED_SCHEMAS[f.type])
                if f.string_pattern():
                    prop["anyOf"].append({"type": "string", "pattern": f.string_pattern()})
            elif f.type in JSON_TYPES:
                prop["type"] = "number" if f.choices is not None else JSON_TYPES[f.type]
            if f.items in JSON_TYPES:
                prop["items"] = {"type": JSON_TYPES[f.items]}
            ge, le = f.bounds() if f.type in ("int", "float") and f.choices is None else (None, None)
            if ge is not None:
                prop["minimum"] = ge
            if le is not None:
                prop["maximum"] = le
            if f.choices is not None:
                prop["enum"] = list(f.choices)
            if f.default is not None:
                prop["default"] = f.default
            if f.nullable and not f.required:
                prop["nullable"] = True
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
