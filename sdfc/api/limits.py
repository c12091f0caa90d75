"""Request limits, checked before a job queues: fixed ones (steps, images, prompt bytes) and memory.

Memory: the model's MemoryProfile (sdfc/engine/memory.py) estimates what a job needs from its size, batch,
AND sub-prompts, prompt length and init images; a job over the budget (SDFC_MEMORY_BUDGET, or a share of
the memory measured free once a model is loaded) is refused with a 400 instead of failing inside
onnxruntime. The default pixel limit (SDFC_MAX_PIXELS unset) is the largest image that budget admits.
Request images are checked from their headers (count and pixels) before any pixel is decoded, and only
the ones the job uses are decoded.
"""
from __future__ import annotations

import math
import re

from PIL import Image

from ..engine import GenerationRequest
from ..engine.hires import limits_request as hires_limits_request
from ..engine.memory import MemoryProfile
from ..engine.models import ModelInfo
from .errors import ApiError
from .images import MAX_IMAGE_PIXELS, ImageDecodeError, load_image, open_image_header
from .state import ApiState

# Used where no memory figure exists (SDFC_MEMORY_BUDGET=0, or a GPU without nvidia-smi).
FALLBACK_MAX_PIXELS = 1024 * 1024
CLIP_CHUNK_TOKENS, CLIP_CONTEXT = 75, 77

_AND_RE = re.compile(r"\bAND\b")


def _limit_error(message: str) -> ApiError:
    return ApiError(400, message, error="LimitExceeded")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class MemoryLimits:
    """The memory budget and pixel limit for one model, as this server's settings and machine give them."""

    def __init__(self, state: ApiState, info: ModelInfo, tiling: bool = False):
        settings = state.settings
        self.profile: MemoryProfile = info.memory
        if settings.memory_budget is not None:
            self.budget = settings.memory_budget or None  # 0: no memory check
            self.budget_source = "SDFC_MEMORY_BUDGET"
        else:
            self.budget = state.engine.memory_budget(info, tiling)  # tiling: its seamless sessions too
            self.budget_source = "measured free memory; set SDFC_MEMORY_BUDGET to change"
        if settings.max_pixels is not None:
            self.max_pixels, self.pixels_source = settings.max_pixels, "SDFC_MAX_PIXELS"
        elif self.budget:
            self.max_pixels = self.profile.max_pixels(self.budget)
            self.pixels_source = (f"SDFC_MAX_PIXELS, derived from the memory budget of {_mib(self.budget)} "
                                  f"for model {info.name}")
        else:
            self.max_pixels, self.pixels_source = FALLBACK_MAX_PIXELS, "SDFC_MAX_PIXELS"


def limits_for(state: ApiState, model: str | None, tiling: bool = False) -> MemoryLimits:
    engine = state.engine
    info = engine.find_model(model) if model else engine.current
    return MemoryLimits(state, info, tiling)


def _context_tokens(state: ApiState, req: GenerationRequest, prompt: str) -> int:
    """CLIP context length the prompt will be encoded to (75-token chunks of 77, BREAK starts a chunk)."""
    try:
        tokens = len(state.engine.tokenizer_of(req.model).encode(prompt).ids)
    except Exception:  # no tokenizer at hand or text it refuses: every UTF-8 byte as a token bounds it
        tokens = len(prompt.encode("utf-8", "surrogatepass"))
    chunks = math.ceil(tokens / CLIP_CHUNK_TOKENS) + prompt.count("BREAK")
    return CLIP_CONTEXT * max(1, chunks)


def check_limits(state: ApiState, req: GenerationRequest) -> None:
    """Refuse (400, naming the variable to change) a request beyond a limit, before it queues."""
    s = state.settings
    if req.steps > s.max_steps:
        raise _limit_error(f"steps {req.steps} exceeds the limit of {s.max_steps} (SDFC_MAX_STEPS)")
    if req.batch_size * req.n_iter > s.max_images:
        raise _limit_error(f"batch_size × n_iter = {req.batch_size * req.n_iter} exceeds the limit of "
                           f"{s.max_images} images per request (SDFC_MAX_IMAGES)")
    for name in ("prompt", "negative_prompt"):
        size = len(getattr(req, name).encode("utf-8", "surrogatepass"))
        if size > s.max_prompt_bytes:
            raise _limit_error(f"{name} is {size} bytes in UTF-8, over the limit of {s.max_prompt_bytes} "
                               "(SDFC_MAX_PROMPT_BYTES; the records table's text column holds 65535)")
    limits = limits_for(state, req.model, req.tiling is True)
    if req.width * req.height > limits.max_pixels:
        raise _limit_error(f"image size {req.width}x{req.height} exceeds the limit of {limits.max_pixels} "
                           f"pixels ({limits.pixels_source})")
    # The seed-resize noise is drawn at that size for every image: the same pixel limit holds.
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 and \
            req.seed_resize_from_w * req.seed_resize_from_h > limits.max_pixels:
        raise _limit_error(f"seed resize size {req.seed_resize_from_w}x{req.seed_resize_from_h} exceeds the "
                           f"limit of {limits.max_pixels} pixels ({limits.pixels_source})")
    if limits.budget:
        _check_memory(state, req, limits)
    if req.hires is not None:  # the second pass: the final size, its steps and hires prompts
        try:
            check_limits(state, hires_limits_request(req))
        except ApiError as exc:
            raise _limit_error(f"hires fix second pass: {exc.detail}") from None


def _mask_pixels(req: GenerationRequest, used: list) -> int:
    """Inpainting's extra images: the decoded (and blurred) mask; with inpaint_full_res each result comes back
    at its init image's size, pasted over a copy of it."""
    if req.mask is None:
        return 0
    extra = req.mask.width * req.mask.height
    if req.latent_mask is not None:
        extra += req.latent_mask.width * req.latent_mask.height
    if req.inpaint.inpaint_full_res and used:
        extra += req.batch_size * req.n_iter * max(im.width * im.height for im in used)
    return extra


def _check_memory(state: ApiState, req: GenerationRequest, limits: MemoryLimits) -> None:
    init = req.init_images or []
    used = init[:req.batch_size]
    need = limits.profile.request_bytes(
        req.width, req.height, batch_size=req.batch_size, n_images=req.batch_size * req.n_iter,
        cond_rows=len(_AND_RE.findall(req.prompt)) + 1,
        context_tokens=max(_context_tokens(state, req, req.prompt),
                           _context_tokens(state, req, req.negative_prompt)),
        init_images=len(used), init_pixels=sum(im.width * im.height for im in used) + _mask_pixels(req, used))
    if need > limits.budget:
        raise _limit_error(
            f"this job ({req.width}x{req.height}, batch_size {req.batch_size}) needs about {_mib(need)} of "
            f"memory, over the budget of {_mib(limits.budget)} per job ({limits.budget_source}); use a smaller "
            "size or batch, or fewer AND sub-prompts")


# ---------------------------------------------------------------------------------------------
# Request images: headers first, pixels only for what is used
# ---------------------------------------------------------------------------------------------


def open_init_images(state: ApiState, values: dict) -> list[Image.Image]:
    """The init images img2img will use, opened from their headers only (no pixel decoded yet).

    The engine uses the first batch_size images (repeating them over the batch when fewer are sent), so
    entries beyond those are never decoded. Raises ApiError for too many, unreadable or oversized images.
    """
    entries = values["init_images"]
    limit = state.settings.max_images
    if len(entries) > limit:
        raise _limit_error(f"{len(entries)} init_images exceed the limit of {limit} images per request "
                           "(SDFC_MAX_IMAGES)")
    batch_size = values.get("batch_size") or 1
    used = entries[:batch_size] if isinstance(batch_size, int) and batch_size > 0 else entries[:1]
    return [open_request_image(entry, f"init_images[{i}]") for i, entry in enumerate(used)]


def open_request_image(value, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        return open_image_header(value, max_pixels)
    except ImageDecodeError as exc:
        raise ApiError(400, f"Invalid encoded image: {where}: {exc}") from None


def load_images(images: list[Image.Image] | None, what: str = "init_images") -> None:
    """Decode images whose headers passed every check (truncated data shows up here, as a 400)."""
    for i, image in enumerate(images or []):
        try:
            load_image(image)
        except ImageDecodeError as exc:
            raise ApiError(400, f"Invalid encoded image: {what}[{i}]: {exc}") from None
