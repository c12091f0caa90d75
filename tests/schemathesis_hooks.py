"""schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

One `before_call` hook (it runs in every phase, coverage included) that keeps generated jobs small and gives
schema-valid cases what JSON Schema cannot say:
- sizes and step counts that are valid are lowered to at most 64 px and 2 steps (A1111's defaults, 512²
  and 50 steps, take seconds to minutes per job on a loaded CPU); values the document forbids are left
  alone, so invalid cases stay invalid and must be refused;
- img2img cases run at least one denoising step (int(min(denoising_strength, 0.999) × steps) ≥ 1, which
  timestep samplers need and the document states in words);
- image fields hold base64 images: in schema-valid cases they get a real 16×16 PNG (invalid cases keep
  what schemathesis made of them, which the server must refuse).
Nothing else is changed and no check is skipped.
"""
from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image

SMALL = {"width": 64, "height": 64, "steps": 2}
CLAMP = {"width": 64, "height": 64, "steps": 2, "seed_resize_from_w": 64, "seed_resize_from_h": 64,
         "hr_second_pass_steps": 2, "upscaling_resize_w": 64, "upscaling_resize_h": 64}
GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v2/tasks/txt2img", "/sdapi/v2/tasks/img2img")
IMG2IMG = ("/sdapi/v1/img2img", "/sdapi/v2/tasks/img2img")
SINGLE_IMAGE = ("/sdapi/v1/png-info", "/sdapi/v1/extra-single-image")


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PNG = _png()


def _valid(operation, name: str, value) -> bool:
    """Whether `value` is a number the document admits for body property `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    schema = _body_schema(operation).get("properties", {}).get(name, {})
    low, high, step = schema.get("minimum"), schema.get("maximum"), schema.get("multipleOf")
    return (low is None or value >= low) and (high is None or value <= high) and (not step or value % step == 0)


def _body_schema(operation) -> dict:
    raw = operation.definition.raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    ref = raw.get("schema", {}).get("$ref", "")
    return operation.schema.raw_schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})


def _with_img2img_steps(body: dict) -> None:
    """img2img runs int(min(denoising_strength, 0.999) × steps) steps; a timestep sampler needs at least one
    (a cross-field rule the document states in words only): a valid case gets one, with any sampler."""
    steps, strength = body.get("steps"), body.get("denoising_strength")
    if not isinstance(steps, (int, float)) or isinstance(steps, bool):
        return
    strength = 0.75 if strength is None else strength
    if isinstance(strength, (int, float)) and not isinstance(strength, bool) and int(min(strength, 0.999) * int(steps)) < 1:
        body["steps"], body["denoising_strength"] = max(2, int(steps)), max(float(strength), 0.5)


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    if not isinstance(case.body, dict) or case.method.upper() != "POST":
        return
    body = dict(case.body)
    if path in GENERATION:
        for key, value in SMALL.items():
            body.setdefault(key, value)
    for key, small in CLAMP.items():
        value = body.get(key)
        if _valid(case.operation, key, value) and value > small:
            step = _body_schema(case.operation)["properties"][key].get("multipleOf") or 1
            body[key] = max(step, small // step * step)  # an int: what the field holds after coercion
    if case.meta is not None and case.meta.generation.mode.is_positive:
        if path in IMG2IMG:
            body["init_images"] = [PNG]
            _with_img2img_steps(body)
        if path in SINGLE_IMAGE:
            body["image"] = PNG
        if path == "/sdapi/v1/extra-batch-images" and body.get("imageList"):
            body["imageList"] = [{"data": PNG, "name": "a.png"}]
    case.body = body
