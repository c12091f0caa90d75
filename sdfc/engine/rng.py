"""Noise sources of A1111's generation, in numpy (never torch).

Spec: docs/generation-semantics.md §5.

* ``"CPU"`` -- :class:`TorchCPUGenerator`, bit-exact ``torch.randn`` on a CPU generator (§5.5, the
  AVX2 kernels of x86 torch builds).
* ``"NV"`` -- :class:`PhiloxGenerator`, A1111's Philox4x32-10 emulation of CUDA randn (§5.6).
* ``"GPU"`` -- real CUDA generators cannot exist without torch; mapped to the NV emulation, which
  reproduces CUDA's ``torch.randn`` to about 1e-7 (not bit for bit).

:class:`ImageRNG` turns these into A1111's per-image initial latent and sampler noise (§5.2).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "RANDN_SOURCES",
    "PhiloxGenerator",
    "TorchCPUGenerator",
    "ImageRNG",
    "make_generator",
    "randn_local",
    "philox4x32_10",
    "slerp",
]

RANDN_SOURCES = ("CPU", "NV", "GPU")

_f32 = np.float32
_f64 = np.float64
_MASK32 = 0xFFFFFFFF


def _shape_tuple(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------------------------
# NV: Philox4x32-10 (§5.6)
# --------------------------------------------------------------------------------------------

_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10
_U64_MASK32 = np.uint64(_MASK32)
_U64_32 = np.uint64(32)


def _as_u64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64) & _U64_MASK32


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 block function.

    ``counter``: 4 words (each a scalar or an array, broadcast together); ``key``: 2 words.
    Returns a uint32 array of shape ``(4, *broadcast_shape)``.
    """
    # uint64 holds the full 32x32-bit products, so hi/lo are a shift and a mask.
    c0, c1, c2, c3 = (_as_u64(c) for c in counter)
    k0, k1 = (int(k) & _MASK32 for k in key)
    for _ in range(_PHILOX_ROUNDS):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _U64_32) ^ c1 ^ np.uint64(k0),
            p1 & _U64_MASK32,
            (p0 >> _U64_32) ^ c3 ^ np.uint64(k1),
            p0 & _U64_MASK32,
        )
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


# §5.6: the constants are float32; their products with the uint32 words happen in float64.
_NV_SCALE_U = _f32(2.3283064e-10)
_NV_SCALE_V = _f32(2.3283064e-10 * 6.2831855)


def _philox_box_muller_sin(o0: np.ndarray, o1: np.ndarray) -> np.ndarray:
    u = o0.astype(_f64) * _f64(_NV_SCALE_U) + _f64(_NV_SCALE_U / _f32(2))
    v = o1.astype(_f64) * _f64(_NV_SCALE_V) + _f64(_NV_SCALE_V / _f32(2))
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_f32)


class PhiloxGenerator:
    """A1111's "NV" noise source: element i of call k uses Philox counter (k, 0, i, 0)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape) -> np.ndarray:
        shape = _shape_tuple(shape)
        n = math.prod(shape)
        key = (self.seed & _MASK32, (self.seed >> 32) & _MASK32)
        index = np.arange(n, dtype=np.uint64)
        out = philox4x32_10((self.offset, 0, index, 0), key)
        self.offset += 1  # per call, not per element (§5.6)
        return _philox_box_muller_sin(out[0], out[1]).reshape(shape)


# --------------------------------------------------------------------------------------------
# CPU: torch.randn on a CPU mt19937 generator (§5.5)
# --------------------------------------------------------------------------------------------

def _fma(a, b, c) -> np.ndarray:
    # a*b of two float32 is exact in float64, so only the add rounds there; the following cast
    # could in principle double-round, but an exhaustive check over all 2**24 inputs of both
    # the log and the sincos path found no difference from a correctly rounded fma.
    return (np.asarray(a, _f64) * np.asarray(b, _f64) + np.asarray(c, _f64)).astype(_f32)


_LOG_SQRTHF = _f32(0.707106781186547524)
_LOG_POLY = tuple(_f32(p) for p in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LOG_Q1 = _f32(-2.12194440e-4)
_LOG_Q2 = _f32(0.693359375)


def _avx2_log(x: np.ndarray) -> np.ndarray:
    """Cephes-style float32 log of torch's AVX2 kernel, for x in (0, 1] (§5.5)."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 126).astype(_f32)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(_f32)  # mantissa scaled to [0.5, 1)
    small = m < _LOG_SQRTHF
    e = np.where(small, e - _f32(1), e)
    m = np.where(small, (m - _f32(1)) + m, m - _f32(1))
    z = m * m
    y = np.full_like(m, _LOG_POLY[0])
    for p in _LOG_POLY[1:]:
        y = _fma(y, m, p)
    y = y * m
    y = _fma(y, z, e * _LOG_Q1)
    y = _fma(z, _f32(-0.5), y)
    m = m + y
    return _fma(e, _LOG_Q2, m)


_SC_FOPI = _f32(1.27323954473516)
_SC_DP = (_f32(-0.78515625), _f32(-2.4187564849853515625e-4), _f32(-3.77489497744594108e-8))
_SC_COS = (_f32(2.443315711809948e-5), _f32(-1.388731625493765e-3), _f32(4.166664568298827e-2))
_SC_SIN = (_f32(-1.9515295891e-4), _f32(8.3321608736e-3), _f32(-1.6666654611e-1))


def _avx2_sincos(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cephes-style float32 sincos of torch's AVX2 kernel, for theta >= 0 (§5.5)."""
    j = (theta * _SC_FOPI).astype(np.int32)  # truncation
    j = (j + 1) & ~1
    y = j.astype(_f32)
    x = theta
    for dp in _SC_DP:  # extended-precision reduction by pi/4
        x = _fma(y, dp, x)
    z = x * x
    c = np.full_like(z, _SC_COS[0])
    c = _fma(c, z, _SC_COS[1])
    c = _fma(c, z, _SC_COS[2])
    c = c * z
    c = _fma(c, z, _f32(-0.5) * z)
    c = c + _f32(1)
    s = np.full_like(z, _SC_SIN[0])
    s = _fma(s, z, _SC_SIN[1])
    s = _fma(s, z, _SC_SIN[2])
    s = s * z
    s = _fma(s, x, x)
    swap = (j & 2) != 0
    sin = np.where(swap, c, s)
    cos = np.where(swap, s, c)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where(((j - 2) & 4) == 0, -cos, cos)
    return sin, cos


_TWO_PI_F32 = _f32(2 * math.pi)
_U24_SCALE = _f32(2.0 ** -24)


def _uniform24(words: np.ndarray) -> np.ndarray:
    return (words & 0xFFFFFF).astype(_f32) * _U24_SCALE


def _box_muller_blocks(u: np.ndarray) -> np.ndarray:
    """float32 Box-Muller on blocks of 16: first 8 give the radii, last 8 the angles (§5.5)."""
    blocks = u.reshape(-1, 2, 8)
    radius = np.sqrt(_f32(-2) * _avx2_log(_f32(1) - blocks[:, 0]))
    sin, cos = _avx2_sincos(_TWO_PI_F32 * blocks[:, 1])
    return np.stack([radius * cos, radius * sin], axis=1).reshape(-1)


_TWO_PI = 2.0 * math.pi
_U53_SCALE = 2.0 ** -53
_U53_MASK = (1 << 53) - 1


class TorchCPUGenerator:
    """A1111's "CPU" noise source: ``torch.Generator().manual_seed(seed)`` + ``torch.randn``.

    Bit-exact for torch's AVX2/AVX512 CPU kernels (§5.5); state persists across calls,
    including the cached second normal of the small-tensor path.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._bits = np.random.MT19937()
        self._bits.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_init_genrand(self.seed & _MASK32), "pos": 624},
        }
        self._cached_normal: float | None = None

    def _raw(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def randn(self, shape) -> np.ndarray:
        shape = _shape_tuple(shape)
        n = math.prod(shape)
        if n >= 16:
            return self._randn_vectorised(n).reshape(shape)
        return self._randn_serial(n).reshape(shape)

    def _randn_vectorised(self, n: int) -> np.ndarray:
        u = _uniform24(self._raw(n))
        full = n - n % 16
        out = np.empty(n, dtype=_f32)
        out[:full] = _box_muller_blocks(u[:full])
        if full != n:
            # §5.5 step 3: 16 fresh words recompute the last 16 outputs.
            out[n - 16:] = _box_muller_blocks(_uniform24(self._raw(16)))
        return out

    def _uniform53(self) -> float:
        hi, lo = (int(w) for w in self._raw(2))
        return (((hi << 32) | lo) & _U53_MASK) * _U53_SCALE

    def _randn_serial(self, n: int) -> np.ndarray:
        # Inherently sequential (the cache), at most 15 elements; math.* is the C library's
        # libm, the same functions torch calls here.
        values = []
        for _ in range(n):
            if self._cached_normal is not None:
                values.append(self._cached_normal)
                self._cached_normal = None
                continue
            u1 = self._uniform53()
            u2 = self._uniform53()
            radius = math.sqrt(-2.0 * math.log1p(-u2))
            theta = _TWO_PI * u1
            self._cached_normal = radius * math.sin(theta)
            values.append(radius * math.cos(theta))
        return np.array(values, dtype=_f64).astype(_f32)


def _mt19937_init_genrand(seed32: int) -> np.ndarray:
    """MT19937 key after init_genrand(seed32)."""
    # numpy's legacy RandomState seeds an int with init_genrand; tests check it against the
    # recurrence in §5.5.
    _, key, _, _, _ = np.random.RandomState(seed32).get_state(legacy=True)
    return np.asarray(key, dtype=np.uint32)


# --------------------------------------------------------------------------------------------
# Source selection
# --------------------------------------------------------------------------------------------

def make_generator(source: str, seed: int):
    """A generator for A1111's ``randn_source`` option.

    "CPU" -> :class:`TorchCPUGenerator`; "NV" -> :class:`PhiloxGenerator`; "GPU" -> also
    :class:`PhiloxGenerator`: without torch there is no CUDA generator, and the NV emulation
    matches CUDA's ``torch.randn`` to about 1e-7 (not bit for bit, so GPU-source images match
    A1111's closely but not exactly).
    """
    if source == "CPU":
        return TorchCPUGenerator(seed)
    if source in ("NV", "GPU"):
        return PhiloxGenerator(seed)
    raise ValueError(f"unknown randn source {source!r}; valid: {', '.join(RANDN_SOURCES)}")


def randn_local(source: str, seed: int, shape) -> np.ndarray:
    """First draw of a fresh generator (A1111's ``randn_local``, used by Brownian-tree noise)."""
    return make_generator(source, seed).randn(shape)


# --------------------------------------------------------------------------------------------
# Per-image noise (§5.2)
# --------------------------------------------------------------------------------------------

_SLERP_LINEAR_DOT = 0.9995


def slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp of two (C, H, W) noises, norms along axis 1 (H) (§5.2).

    ``val`` = 0 gives ``low``, 1 gives ``high`` -- except in the near-parallel fallback, whose
    linear blend has the weights the other way round (as in A1111).
    """
    low = np.asarray(low, dtype=_f32)
    high = np.asarray(high, dtype=_f32)
    low_unit = low / np.sqrt(np.sum(low * low, axis=1, keepdims=True))
    high_unit = high / np.sqrt(np.sum(high * high, axis=1, keepdims=True))
    dot = np.sum(low_unit * high_unit, axis=1)
    if dot.mean() > _SLERP_LINEAR_DOT:
        return (low * _f32(val) + high * _f32(1 - val)).astype(_f32)
    omega = np.arccos(dot)
    sin_omega = np.sin(omega)
    w_low = (np.sin(_f32(1 - val) * omega) / sin_omega)[:, None, :]
    w_high = (np.sin(_f32(val) * omega) / sin_omega)[:, None, :]
    return (w_low * low + w_high * high).astype(_f32)


def _paste_centre(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Paste the centre of ``source`` (C, h, w) into the centre of ``target`` (C, H', W') (§5.2)."""
    dy = (target.shape[1] - source.shape[1]) // 2
    dx = (target.shape[2] - source.shape[2]) // 2
    # Positive offsets place the source inside the target; negative ones crop the source.
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    target[:, ty:ty + h, tx:tx + w] = source[:, sy:sy + h, sx:sx + w]
    return target


class ImageRNG:
    """A1111's per-image noise for one batch (§5.2).

    ``shape`` is one image's latent shape (C, H/8, W/8); ``seeds`` has one seed per image.
    ``first()`` is the initial latent (B, C, H, W); ``next()`` one draw per image generator.
    As in A1111, ``next()`` before ``first()`` returns ``first()``.
    """

    def __init__(self, shape, seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0,
                 seed_resize_from_w: int = 0, source: str = "NV", eta_noise_seed_delta: int = 0):
        self.shape = _shape_tuple(shape)
        if len(self.shape) != 3:
            raise ValueError(f"ImageRNG shape must be (C, H, W), got {self.shape}")
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        if self.subseeds is not None and len(self.subseeds) < len(self.seeds):
            raise ValueError(f"{len(self.seeds)} seeds but only {len(self.subseeds)} subseeds")
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.source = source
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.generators = [make_generator(source, s) for s in self.seeds]
        self._first_done = False

    def _noise_shape(self) -> tuple[int, ...]:
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)

    def _first_for_image(self, i: int, noise_shape: tuple[int, ...]) -> np.ndarray:
        seed, generator = self.seeds[i], self.generators[i]
        resized = noise_shape != self.shape
        use_subseed = self.subseeds is not None and self.subseed_strength != 0
        subnoise = randn_local(self.source, self.subseeds[i], noise_shape) if use_subseed else None
        if resized:
            noise = randn_local(self.source, seed, noise_shape)
        else:
            noise = generator.randn(self.shape)
        if subnoise is not None:
            noise = slerp(self.subseed_strength, noise, subnoise)
        if resized:
            noise = _paste_centre(generator.randn(self.shape), noise)
        return noise

    def first(self) -> np.ndarray:
        noise_shape = self._noise_shape()
        xs = [self._first_for_image(i, noise_shape) for i in range(len(self.seeds))]
        if self.eta_noise_seed_delta:
            # §5.2 step 5: replaces (not offsets) every image generator, for all samplers.
            self.generators = [make_generator(self.source, s + self.eta_noise_seed_delta)
                               for s in self.seeds]
        self._first_done = True
        return np.stack(xs).astype(_f32, copy=False)

    def next(self) -> np.ndarray:
        if not self._first_done:
            return self.first()
        return np.stack([g.randn(self.shape) for g in self.generators])
