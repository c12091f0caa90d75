"""How much memory a generation needs (per model) and how much this process may use (per device).

The estimate follows the architecture instead of one fixed pixel limit: the UNet's self-attention holds
(tokens² × heads) scores per UNet row, tokens = latent pixels = pixels / 64 at the first level, so memory
grows with the square of the image area. Measured on tests/fixtures/models/tiny-sd (fp32, 2 heads at the
first level, peak RSS of a subprocess, one step): +554 MB at 512², +1.37 GB at 640², +2.74 GB at 640² ×
batch 2, i.e. ~33 bytes per token² per image = 2 live copies (scores and softmax) × 4 bytes × 2 heads × 2 CFG
rows, plus a few per cent (ATTENTION_SLACK). The other terms are smaller and rounded up.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .tiling import TILED_COMPONENTS

log = logging.getLogger("sdfc.engine")

ATTENTION_COPIES = 2        # attention scores and their softmax are alive together (measured, see above)
ATTENTION_SLACK = 1.1       # measured peaks are 2-5 % above the bare copies (arena rounding, small buffers)
ACTIVATION_COPIES = 6       # conv/norm/activation tensors alive at once at one resolution (rounded up)
RESULT_BYTES_PER_PIXEL = 16  # float32 RGB kept for each result (12) + its 8-bit image (3) + slack
DECODED_BYTES_PER_PIXEL = 4  # a decoded init image (RGBA at most, as Pillow holds request images)
BUDGET_FRACTION = 0.75       # of the measured headroom: allocator slack, the HTTP body, encoded images


@dataclass(frozen=True)
class MemoryProfile:
    """What one model's generation costs, from its config files (no session needed)."""

    dtype_bytes: int
    attention_levels: tuple[tuple[int, int], ...]  # (latent downscale factor, heads) of UNet attention blocks
    unet_channels: int
    vae_channels: int
    vae_attention_downscale: int  # VAE mid-block resolution relative to the latent (1 for SD's 4-block VAE)
    weights_bytes: int
    # The seamless (tiling) UNet and VAE sessions, once built, hold their own prepacked copy of those weights.
    tiled_weights_bytes: int = 0
    vae_dtype_bytes: int = 0  # the VAE's activations (0: dtype_bytes, the UNet's); may differ (precision.py)

    def request_bytes(self, width: int, height: int, batch_size: int = 1, n_images: int = 1,
                      cond_rows: int = 1, context_tokens: int = 77, init_images: int = 0,
                      init_pixels: int = 0) -> int:
        """Peak working memory of one job: its largest stage plus what is kept across stages."""
        return self.pixels_bytes(width * height, batch_size, n_images, cond_rows, context_tokens,
                                 init_images, init_pixels)

    def pixels_bytes(self, pixels: int, batch_size: int = 1, n_images: int = 1, cond_rows: int = 1,
                     context_tokens: int = 77, init_images: int = 0, init_pixels: int = 0) -> int:
        d = self.dtype_bytes
        latent = pixels / 64
        rows = batch_size * (cond_rows + 1)  # cond rows per image (AND sub-prompts) + the uncond row
        unet_attention = 0.0
        for factor, heads in self.attention_levels:
            tokens = latent / (factor * factor)
            self_attention = ATTENTION_SLACK * ATTENTION_COPIES * d * heads * tokens * tokens
            cross_attention = d * heads * tokens * context_tokens
            unet_attention = max(unet_attention, (self_attention + cross_attention) * rows)
        unet = unet_attention + ACTIVATION_COPIES * d * self.unet_channels * latent * rows
        vae_tokens = latent / (self.vae_attention_downscale ** 2)
        v = self.vae_dtype_bytes or d
        vae_one = ATTENTION_COPIES * v * vae_tokens * vae_tokens + ACTIVATION_COPIES * v * self.vae_channels * pixels
        vae = vae_one * max(1, init_images)  # the encoder takes every init image in one batch
        kept = RESULT_BYTES_PER_PIXEL * pixels * n_images + DECODED_BYTES_PER_PIXEL * init_pixels
        return int(max(unet, vae) + kept)

    def max_pixels(self, budget: int) -> int:
        """The largest pixel count one image (batch 1, short prompt, txt2img) may have within `budget`."""
        low, high = 0, 1 << 40
        while low < high:
            mid = (low + high + 1) // 2
            if self.pixels_bytes(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def memory_profile(model_path: Path, precision: str = "fp32", component_precision: dict | None = None,
                   fp32_vae_retry: bool = False) -> MemoryProfile:
    """The profile of an exported model folder; missing config values fall back to SD 1.x's.

    Activations are sized by each part's declared precision (`component_precision`, else `precision`); with
    `fp32_vae_retry` (an fp16 VAE with its fp32 fallback decoder) the VAE's at fp32, since any job's decode
    may be retried in fp32. Weights are the files' sizes, the fallback decoder's included for the same reason.
    """
    declared = component_precision or {}
    unet_precision = declared.get("unet", precision)
    vae_precision = "fp32" if fp32_vae_retry else declared.get("vae_decoder", precision)
    unet = _json(model_path / "unet" / "config.json")
    vae = _json(model_path / "vae_decoder" / "config.json")
    blocks = unet.get("down_block_types") or ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    # diffusers' `attention_head_dim` is the number of heads when num_attention_heads is unset (SD 1/2).
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(blocks)
    levels = tuple((2 ** i, int(heads[min(i, len(heads) - 1)]))
                   for i, kind in enumerate(blocks) if "Attn" in kind)
    mid_heads = int(heads[-1])
    levels += ((2 ** (len(blocks) - 1), mid_heads),)  # the mid block attends at the lowest resolution
    vae_blocks = len(vae.get("block_out_channels") or [128, 256, 512, 512])
    weights = sum(f.stat().st_size for f in model_path.glob("*/model.onnx*") if f.is_file())
    tiled = sum(f.stat().st_size for c in TILED_COMPONENTS
                for f in (model_path / c).glob("model.onnx*") if f.is_file())
    return MemoryProfile(
        dtype_bytes=2 if unet_precision == "fp16" else 4,
        vae_dtype_bytes=2 if vae_precision == "fp16" else 4,
        attention_levels=levels,
        unet_channels=int((unet.get("block_out_channels") or [320])[0]),
        vae_channels=int((vae.get("block_out_channels") or [128])[0]),
        vae_attention_downscale=max(1, 2 ** (vae_blocks - 1) // 8),
        weights_bytes=weights,
        tiled_weights_bytes=tiled,
    )


def component_weights_bytes(model_path: Path, component: str) -> int:
    """The bytes of one component's graph and weights files: what each session of it holds (a LoRA-merged one
    reads the weights it does not replace again from these files)."""
    return sum(f.stat().st_size for f in (Path(model_path) / component).glob("model.onnx*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# What the process may still allocate
# ---------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _key_values(path: str) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.replace(":", " ", 1).partition(" ")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return values


def cgroup_headroom() -> int | None:
    """Bytes left under this cgroup's limit (v2 memory.max or v1 limit_in_bytes), page cache not counted."""
    for limit_file, usage_file, stat_file, cache_key in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        limit = _read_int(limit_file)
        if limit is None or limit >= 1 << 60:  # "max" or v1's "no limit" (a huge number)
            continue
        usage = _read_int(usage_file) or 0
        cache = _key_values(stat_file).get(cache_key, 0)
        return max(0, limit - max(0, usage - cache))
    return None


def address_space_headroom() -> int | None:
    """Bytes left under RLIMIT_AS (`ulimit -v`), which counts reserved address space, not resident pages."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size = _key_values("/proc/self/status").get("VmSize", 0)
    return max(0, soft - size)


def ram_headroom() -> int | None:
    return _key_values("/proc/meminfo").get("MemAvailable")


def cuda_headroom() -> int | None:
    """Free memory of the first visible GPU, from nvidia-smi (no CUDA library is loaded for this)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def headroom(device: str = "cpu") -> int | None:
    """What this process may still allocate on `device`: the smallest of every limit that applies."""
    if device == "cuda":
        found = cuda_headroom()
        if found is None:
            log.warning("no GPU memory figure (nvidia-smi missing): set SDFC_MEMORY_BUDGET for cuda")
        return found
    limits = [v for v in (cgroup_headroom(), address_space_headroom(), ram_headroom()) if v is not None]
    return min(limits) if limits else None


def parse_bytes(text: str) -> int:
    """`1073741824`, `1024M`, `4G`, `512MiB` → bytes (binary multiples)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if value and value[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(value[-1]) + 1)
        value = value[:-1]
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(text)
    return int(number * scale)

