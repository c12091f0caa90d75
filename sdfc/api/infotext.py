"""A1111 infotext: write it, parse it, and build the `info` JSON string.

Reference: docs/a1111-api.md §1.6 (info keys), §2.2 (writing), §2.4 (parsing).
Pure Python, no I/O. Implemented from the spec, not copied from A1111.

The infotext is the text A1111 stores in every image (PNG `parameters` chunk, EXIF UserComment)::

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>     (omitted when empty)
    Steps: 20, Sampler: Euler, ..., Version: v1.10.1
"""
from __future__ import annotations

import json
import re
import time
from importlib import metadata
from typing import Any, Mapping, Sequence

from ..engine.prompt_parser import parse_prompt_attention
from .errors import json_safe

# ---------------------------------------------------------------------------------------------
# Version string
# ---------------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return metadata.version("sdfc")
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "0.0.0"


def _local_version_label(version: str) -> str:
    # A PEP 440 local label allows only [a-z0-9] runs separated by dots.
    return ".".join(part for part in re.split(r"[^a-z0-9]+", version.lower()) if part) or "0"


# What we write as `Version:` (infotext) and `version` (info JSON).
#
# Why "v1.10.1+sdfc.<our version>": A1111-family readers (A1111, Forge) feed this value to
# `packaging.version.parse` after cutting a `git describe` suffix ("A-B-rest" -> "A-B"), then set
# back-compat flags such as "Downcast alphas_cumprod" for versions older than 1.7.0-225 (§2.4).
# - A PEP 440-valid value at or above 1.10.1 sets no flags; the `+local` label names us and is
#   ignored by comparisons. It contains no "-" so the describe-suffix cut never applies.
# - "sdfc-0.1.0" or "v1.10.1-sdfc" are not PEP 440: modern packaging rejects them (no flags),
#   but packaging < 22 turns them into a LegacyVersion that sorts below every release, so old
#   installs would switch on *every* old-version flag and reproduce our images wrongly.
# We implement the v1.10.1 API surface, so claiming that level is accurate.
A1111_API_VERSION = "v1.10.1"
SDFC_VERSION = f"{A1111_API_VERSION}+sdfc.{_local_version_label(_package_version())}"

# ---------------------------------------------------------------------------------------------
# Writing (§2.2)
# ---------------------------------------------------------------------------------------------

# Keys that have a fixed place in the parameter line, in order (§2.2 items 1-22).
# Everything else follows in insertion order, then `Version`, then `User` (items 23-25).
INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
INFOTEXT_TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

_CHARS_THAT_NEED_QUOTING = (",", "\n", ":")


def quote_value(value: Any) -> str:
    """A value as written after `Key: `: JSON-quoted when it would confuse the parser (§2.2)."""
    text = str(value)
    if any(char in text for char in _CHARS_THAT_NEED_QUOTING):
        # Quote the *string* form so the result is always a JSON string literal the parser can
        # un-JSON (A1111 json.dumps the raw value; for non-strings that would not be a literal).
        return json.dumps(text, ensure_ascii=False)
    return text


def order_params(params: Mapping[str, Any], extra_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fixed keys in INFOTEXT_KEY_ORDER, then other keys in insertion order, then Version, User.

    A key given in both `params` and `extra_params` keeps its fixed (or first) position and takes
    the `extra_params` value, like A1111's extra_generation_params. None values are dropped.
    """
    merged = dict(params)
    merged.update(extra_params or {})
    fixed = [key for key in INFOTEXT_KEY_ORDER if key in merged]
    trailing = [key for key in INFOTEXT_TRAILING_KEYS if key in merged]
    middle = [key for key in merged if key not in INFOTEXT_KEY_ORDER and key not in INFOTEXT_TRAILING_KEYS]
    return {key: merged[key] for key in fixed + middle + trailing if merged[key] is not None}


def format_params_line(params: Mapping[str, Any], extra_params: Mapping[str, Any] | None = None) -> str:
    """The `Steps: 20, Sampler: Euler, ...` line (no prompt)."""
    entries = []
    for key, value in order_params(params, extra_params).items():
        # A flag whose value is its own name is written bare (A1111 compares key == value).
        entries.append(key if value == key else f"{key}: {quote_value(value)}")
    return ", ".join(entries)


def create_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any],
                    extra_params: Mapping[str, Any] | None = None) -> str:
    """The full infotext of §2.2, stripped.

    `params` maps infotext keys to values, e.g. {"Steps": 20, "Sampler": "Euler",
    "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1234, "Size": "512x512",
    "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": SDFC_VERSION}.
    Values are printed with str(); None values are omitted; order follows INFOTEXT_KEY_ORDER.
    The caller decides which keys exist (e.g. `Clip skip` only when > 1, `RNG` only when not GPU).
    """
    negative_line = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative_line}\n{format_params_line(params, extra_params)}".strip()


# ---------------------------------------------------------------------------------------------
# Parsing (§2.4)
# ---------------------------------------------------------------------------------------------

# key: a word character, then at least one of word chars / space / "-" / "/".
# value: a JSON string literal (non-empty between the quotes) or everything up to the next comma.
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PROMPT_PREFIX = "Negative prompt:"
MIN_PARAMS_ON_LAST_LINE = 3

# Added after parsing when absent (§2.4), in this order; non-string defaults are intended.
PARSE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", 0),
    ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def parse_generation_parameters(text: str | None) -> dict[str, Any]:
    """Parse an infotext into A1111's png-info `parameters` dict (§2.4).

    Parsed values are strings (sizes `WxH` become `Key-1`/`Key-2`); `Prompt`, `Negative prompt`
    and the PARSE_DEFAULTS are added afterwards, then `Emphasis`, `Refiner switch by sampling
    steps` and the version back-compat flags. Never raises for any input text.
    """
    prompt, negative_prompt, params_line = split_infotext(text or "")
    result: dict[str, Any] = {}
    for key, raw_value in PARAM_RE.findall(params_line):
        _store_param(result, key, raw_value)

    result["Prompt"] = prompt
    result["Negative prompt"] = negative_prompt
    for key, default in PARSE_DEFAULTS:
        result.setdefault(key, default)
    if "Emphasis" not in result and prompt_uses_emphasis(prompt, negative_prompt):
        result["Emphasis"] = "Original"
    result.setdefault("Refiner switch by sampling steps", False)
    _apply_version_backcompat(result)
    return result


def split_infotext(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameter line). Each prompt line is stripped, as in A1111."""
    *lines, last_line = text.strip().split("\n")
    if len(PARAM_RE.findall(last_line)) < MIN_PARAMS_ON_LAST_LINE:
        lines.append(last_line)  # too few pairs: it is prompt text after all
        last_line = ""

    prompt, negative_prompt, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        if in_negative:
            negative_prompt = _append_line(negative_prompt, line)
        else:
            prompt = _append_line(prompt, line)
    return prompt, negative_prompt, last_line


def _append_line(text: str, line: str) -> str:
    # Lines join with "\n" only once the text is non-empty, so leading blank lines vanish (as in A1111).
    return f"{text}\n{line}" if text else line


def _store_param(result: dict[str, Any], key: str, raw_value: str) -> None:
    if not raw_value:
        return  # A1111 drops `Key: ,` (empty value) with a logged parse error; so do we.
    value = _unquote(raw_value)
    size = IMAGE_SIZE_RE.match(value)
    if size:
        result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    else:
        result[key] = value


def _unquote(raw_value: str) -> str:
    if len(raw_value) >= 2 and raw_value[0] == '"' and raw_value[-1] == '"':
        try:
            decoded = json.loads(raw_value)
        except ValueError:
            return raw_value
        return decoded if isinstance(decoded, str) else raw_value
    return raw_value


# --- Emphasis detection: does any prompt fragment carry an attention weight other than 1? ---

def prompt_uses_emphasis(*prompts: str) -> bool:
    """True when A1111's attention parser would give some non-BREAK fragment a weight != 1.0.

    Used to add `Emphasis: Original` (§2.4). Note `[a:b:5]` counts: the attention parser reads
    every `[...]` as de-emphasis. An unparseable weight like `(a:1.2.3)` counts as emphasis
    (A1111 raises there; png-info must not fail on a user's prompt).
    """
    for prompt in prompts:
        try:
            fragments = parse_prompt_attention(prompt)
        except ValueError:
            return True
        if any(weight != 1.0 for text, weight in fragments if text != "BREAK"):
            return True
    return False


# --- Version back-compat flags ---

_DESCRIBE_SUFFIX_RE = re.compile(r"([^-]+-[^-]+)-.*")
_VERSION_RE = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre_kind>a|alpha|b|beta|c|rc|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:-(?P<post_n>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post_n2>\d*))?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def parse_version(text: Any) -> tuple | None:
    """A sortable key for an infotext `Version`, or None when it is not a PEP 440 version.

    Mirrors how A1111 reads it: cut a `git describe` tail ("v1.7.0-225-gabc" -> "v1.7.0-225",
    i.e. post-release 225), then compare as PEP 440. Unparseable versions get no flags.
    """
    if not isinstance(text, str):
        return None
    describe = _DESCRIBE_SUFFIX_RE.match(text)
    if describe:
        text = describe.group(1)
    match = _VERSION_RE.match(text.strip())
    if not match:
        return None
    release = tuple(int(part) for part in match["release"].split("."))
    release += (0,) * max(0, 4 - len(release))
    pre = (0, _PRE_RANK[match["pre_kind"].lower()], int(match["pre_n"] or 0)) if match["pre_kind"] else (1, 0, 0)
    post_text = match["post_n"] if match["post_n"] is not None else match["post_n2"]
    post = int(post_text or 0) if post_text is not None else -1
    return release, pre, post


_V160 = parse_version("1.6.0")
_V170_TSNR = parse_version("v1.7.0-225")
_V180 = parse_version("1.8.0")


def _apply_version_backcompat(result: dict[str, Any]) -> None:
    """Flags that make old A1111 versions' images reproducible (§2.4); none for v1.10.1 or ours."""
    version = parse_version(result.get("Version"))
    if version is None:
        return
    if version < _V160 and "[" in result.get("Prompt", ""):
        result["Old prompt editing timelines"] = True
    if version < _V160 and result.get("Sampler", "") in ("DDIM", "PLMS"):
        result["Pad conds v0"] = True
    if version < _V170_TSNR:
        result["Downcast alphas_cumprod"] = True
    if version < _V180 and result.get("Refiner"):
        result["Refiner switch by sampling steps"] = True


# ---------------------------------------------------------------------------------------------
# The `info` JSON string (§1.6)
# ---------------------------------------------------------------------------------------------


def info_json(*, prompt: str, negative_prompt: str, seed: int, subseed: int, subseed_strength: float,
              width: int, height: int, sampler_name: str, cfg_scale: float, steps: int,
              infotexts: Sequence[str],
              all_prompts: Sequence[str] | None = None,
              all_negative_prompts: Sequence[str] | None = None,
              all_seeds: Sequence[int] | None = None,
              all_subseeds: Sequence[int] | None = None,
              batch_size: int = 1,
              restore_faces: bool = False,
              face_restoration_model: str | None = None,
              sd_model_name: str | None = None,
              sd_model_hash: str | None = None,
              sd_vae_name: str | None = None,
              sd_vae_hash: str | None = None,
              seed_resize_from_w: int = -1,
              seed_resize_from_h: int = -1,
              denoising_strength: float | None = None,
              extra_generation_params: Mapping[str, Any] | None = None,
              index_of_first_image: int = 0,
              styles: Sequence[str] | None = None,
              job_timestamp: str | None = None,
              clip_skip: int = 1,
              is_using_inpainting_conditioning: bool = False,
              version: str | None = SDFC_VERSION) -> str:
    """The response's `info` field: a JSON *string* with the §1.6 keys in §1.6 order.

    `all_*` lists default to the single first value; `job_timestamp` defaults to now (local
    time, "YYYYMMDDhhmmss"). Values JSON cannot encode become null, as in A1111.
    """
    info = {
        "prompt": prompt,
        "all_prompts": list(all_prompts) if all_prompts is not None else [prompt],
        "negative_prompt": negative_prompt,
        "all_negative_prompts": (list(all_negative_prompts) if all_negative_prompts is not None
                                 else [negative_prompt]),
        "seed": seed,
        "all_seeds": list(all_seeds) if all_seeds is not None else [seed],
        "subseed": subseed,
        "all_subseeds": list(all_subseeds) if all_subseeds is not None else [subseed],
        "subseed_strength": subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": sampler_name,
        "cfg_scale": cfg_scale,
        "steps": steps,
        "batch_size": batch_size,
        "restore_faces": restore_faces,
        "face_restoration_model": face_restoration_model,
        "sd_model_name": sd_model_name,
        "sd_model_hash": sd_model_hash,
        "sd_vae_name": sd_vae_name,
        "sd_vae_hash": sd_vae_hash,
        "seed_resize_from_w": seed_resize_from_w,
        "seed_resize_from_h": seed_resize_from_h,
        "denoising_strength": denoising_strength,
        "extra_generation_params": dict(extra_generation_params or {}),
        "index_of_first_image": index_of_first_image,
        "infotexts": list(infotexts),
        "styles": list(styles or []),
        "job_timestamp": job_timestamp if job_timestamp is not None else time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": is_using_inpainting_conditioning,
        "version": version,
    }
    try:  # strict JSON: clients json.loads this string (requests are validated finite; this is the net)
        return json.dumps(info, default=lambda _unserializable: None, allow_nan=False)
    except ValueError:
        return json.dumps(json_safe(info), default=lambda _unserializable: None, allow_nan=False)
