"""schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

One `before_call` hook (it runs in every phase, coverage included) that keeps generated jobs small and gives
schema-valid cases what JSON Schema cannot say:
- sizes and step counts that are valid are lowered to at most 64 px and 2 steps (A1111's defaults, 512²
  and 50 steps, take seconds to minutes per job on a loaded CPU); values the document forbids are left
  alone, so invalid cases stay invalid and must be refused;
- img2img cases run at least one denoising step (int(min(denoising_strength, 0.999) × steps) ≥ 1, which
  timestep samplers need and the document states in words);
- hires fix cases (enable_hr) get hr_scale 2 and no hr_resize_x/y, and a second pass of 2 steps: the final
  size is then a multiple of the size step within the pixel limit, and a timestep sampler runs a step (the
  cross-field rules the document states in words);
- image fields hold base64 images: in schema-valid cases they get a real 16×16 PNG (invalid cases keep
  what schemathesis made of them, which the server must refuse); a non-empty `mask` gets a 16×16 mask PNG,
  and with resize_mode 3 (latent upscale, where a mask needs init images of the job's size, as the document
  says in words) inpaint_full_res on; a non-empty `latent_mask` gets a mask PNG of the job's size (the
  masked-content fill needs that size, as the document says in words).
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


def _mask_png() -> str:
    buffer = io.BytesIO()
    mask = Image.new("L", (16, 16))
    mask.paste(255, (4, 4, 12, 12))
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


MASK_PNG = _mask_png()


def _with_mask(body: dict) -> None:
    if body.get("mask") in (None, ""):
        return
    body["mask"] = MASK_PNG
    if isinstance(body.get("resize_mode"), (int, float)) and not isinstance(body["resize_mode"], bool) \
            and int(body["resize_mode"]) == 3:
        body["inpaint_full_res"] = True


def _with_latent_mask(body: dict) -> None:
    if body.get("latent_mask") in (None, ""):
        return
    size = [int(body[k]) if isinstance(body.get(k), (int, float)) and not isinstance(body[k], bool) else 512
            for k in ("width", "height")]
    buffer = io.BytesIO()
    Image.new("L", tuple(size), 255).save(buffer, format="PNG")
    body["latent_mask"] = base64.b64encode(buffer.getvalue()).decode("ascii")


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


_OFF = (None, False, 0, "0", "off", "f", "false", "n", "no")


def _with_hires_sizes(operation, body: dict) -> None:
    if isinstance(body.get("enable_hr"), str) and body["enable_hr"].strip().lower() in _OFF:
        return
    for key, value in (("hr_scale", 2), ("hr_resize_x", 0), ("hr_resize_y", 0), ("hr_second_pass_steps", 2)):
        if body.get(key) is None or _valid(operation, key, body[key]):
            body[key] = value
    for key in ("width", "height"):  # null is A1111's 512: twice that would be over the pixel limit
        if body.get(key) is None:
            body[key] = SMALL[key]


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
            _with_mask(body)
            _with_latent_mask(body)
        if path in ("/sdapi/v1/txt2img", "/sdapi/v2/tasks/txt2img") and body.get("enable_hr") not in _OFF:
            _with_hires_sizes(case.operation, body)
        if path in SINGLE_IMAGE:
            body["image"] = PNG
        if path == "/sdapi/v1/extra-batch-images" and body.get("imageList"):
            body["imageList"] = [{"data": PNG, "name": "a.png"}]
        if path == "/sdapi/v1/train/embedding":  # square only, a rule across two fields the schema cannot state
            body["training_height"] = body.get("training_width")
    case.body = body
