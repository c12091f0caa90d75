"""Noise levels: the model's discrete sigma table and the sigma schedules samplers walk down.

Follows k-diffusion's `DiscreteSchedule` as A1111 uses it (generation-semantics.md §3.1, §4): sigmas come
from float32 `alphas_cumprod`, timesteps map to sigmas by interpolation in log-sigma space, and every
schedule ends with an appended 0 unless noted.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import numpy as np


def alphas_cumprod_from_config(config: dict) -> np.ndarray:
    """float32 ᾱ from a diffusers scheduler config (betas in float64, cast once as the model stores it)."""
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "scaled_linear")
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    if config.get("trained_betas"):
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r} (expected 'scaled_linear' or 'linear')")
    return np.cumprod(1.0 - betas).astype(np.float32)


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n)` in float32 as torch computes it on the CPU, value for value.

    Endpoints rounded to float32, step = (end − start)/(n − 1) in float32, then the first half counted up
    from `start` and the second half down from `end`, each value one fused multiply-add (one rounding).
    NumPy's linspace differs in the last bit for about one value in three; that is invisible to ODE
    samplers but moves Brownian-tree queries, which are rounded to 1e-6 (§5.4)."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    up = step * i + np.float64(start)
    down = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(np.float32)


def exp_f32(x) -> np.ndarray:
    """exp of float32 values, correctly rounded (torch's float32 exp agrees for 99% of inputs, NumPy's own
    float32 exp for about 60%)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)


class ModelSigmas:
    """The model's discrete noise levels (ascending t) and the maps between timestep and sigma."""

    def __init__(self, alphas_cumprod: np.ndarray):
        ac = np.asarray(alphas_cumprod, dtype=np.float32)
        self.alphas_cumprod = ac
        self.sigmas = np.sqrt((1 - ac) / ac).astype(np.float32)
        self.log_sigmas = np.log(self.sigmas)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional timestep for `sigma` (log-sigma interpolation, not quantized)."""
        log_sigmas = self.log_sigmas
        log_sigma = np.float32(np.log(np.float32(sigma)))
        low = int(np.clip(np.count_nonzero(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2))
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return float(np.float32((1 - w) * low + w * (low + 1)))

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float32)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)  # float32, as torch's frac() (t − an int64 array would be float64)
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return exp_f32(log_sigma)


class LCMSigmas(ModelSigmas):
    """A1111's LCM model wrapper (§3.8): only the 50 LCM timesteps t = 19, 39, …, 999 exist.

    The table holds ᾱ at those timesteps; `sigma_to_t` snaps to the nearest one in log σ and returns the
    LCM timestep (20·k + 19), `t_to_sigma` maps LCM timesteps back through the table. Schedules that take
    the model's σ_min/σ_max (Karras, …) use this table's ends, as A1111 does for LCM."""

    skip = 20

    def __init__(self, alphas_cumprod: np.ndarray):
        full = np.asarray(alphas_cumprod, dtype=np.float32)
        super().__init__(full[self.skip - 1::self.skip])

    def sigma_to_t(self, sigma: float) -> int:
        log_sigma = np.log(np.float32(sigma))
        return int(np.argmin(np.abs(log_sigma - self.log_sigmas))) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        index = np.clip((np.asarray(t, dtype=np.float32) - np.float32(self.skip - 1)) / np.float32(self.skip),
                        0, len(self.sigmas) - 1).astype(np.float32)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> np.ndarray:
        """LCM's Automatic/Uniform schedule: LCM timesteps evenly spaced from σ_max's to σ_min's."""
        t = linspace_f32(self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min), n)
        return _append_zero(self.t_to_sigma(t))


def _append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float32), np.float32(0))


def uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """k-diffusion's `get_sigmas(n)`: timesteps evenly spaced from 999 to 0 (the "model default")."""
    if isinstance(model, LCMSigmas):
        return model.get_sigmas(n)  # A1111's Uniform asks the model wrapper, and LCM's has its own
    t = linspace_f32(len(model.alphas_cumprod) - 1, 0, n)
    return _append_zero(model.t_to_sigma(t))


def karras(n: int, model: ModelSigmas, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule between the model's own sigma_min and sigma_max."""
    ramp = linspace_f32(0, 1, n)
    min_inv, max_inv = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, model: ModelSigmas) -> np.ndarray:
    return _append_zero(exp_f32(linspace_f32(math.log(model.sigma_max), math.log(model.sigma_min), n)))


def polyexponential(n: int, model: ModelSigmas, rho: float = 1.0) -> np.ndarray:
    ramp = linspace_f32(1, 0, n) ** np.float32(rho)
    log_min, log_max = math.log(model.sigma_min), math.log(model.sigma_max)
    return _append_zero(exp_f32(ramp * np.float32(log_max - log_min) + np.float32(log_min)))


def sgm_uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """Evenly spaced timesteps from σ_max's down to σ_min's, excluding the last (SGM's "trailing")."""
    t = linspace_f32(model.sigma_to_t(model.sigma_max), model.sigma_to_t(model.sigma_min), n + 1)[:-1]
    return _append_zero(model.t_to_sigma(t))


def normal(n: int, model: ModelSigmas) -> np.ndarray:
    t = linspace_f32(model.sigma_to_t(model.sigma_max), model.sigma_to_t(model.sigma_min), n)
    return _append_zero(model.t_to_sigma(t))


def kl_optimal(n: int, model: ModelSigmas) -> np.ndarray:
    """Ends at σ_min with no appended 0: the last step does not denoise to zero (§4)."""
    frac = np.arange(n + 1, dtype=np.float64) / n
    return np.tan(frac * np.arctan(model.sigma_min) + (1 - frac) * np.arctan(model.sigma_max)).astype(np.float32)


# Align Your Steps' published 10-step lists (11 values, σ_max first).
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def align_your_steps(n: int, model: ModelSigmas, sdxl: bool = False) -> np.ndarray:
    points = AYS_SDXL if sdxl else AYS_SD15
    if n == len(points):
        return _append_zero(points)
    # Resample log σ linearly onto n points.
    ys = np.log(points[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(points)), ys))[::-1]
    return _append_zero(resampled)


def simple(n: int, model: ModelSigmas) -> np.ndarray:
    stride = len(model.sigmas) / n
    return _append_zero([model.sigmas[-(1 + int(k * stride))] for k in range(n)])


def ddim(n: int, model: ModelSigmas) -> np.ndarray:
    """The DDIM grid's sigmas; more than n of them when 1000 % n != 0 (§4)."""
    stride = max(len(model.sigmas) // n, 1)
    return _append_zero(model.sigmas[1::stride][::-1])


def beta(n: int, model: ModelSigmas, alpha: float = 0.6, beta_: float = 0.6) -> np.ndarray:
    """Quantiles of Beta(0.6, 0.6) mapped linearly onto [σ_min, σ_max] (linear in σ, not in t)."""
    quantiles = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta_)
    return _append_zero(model.sigma_min + quantiles * (model.sigma_max - model.sigma_min))


def beta_ppf(q: np.ndarray, a: float, b: float, iterations: int = 100) -> np.ndarray:
    """Inverse of the regularized incomplete beta function, by bisection (monotone, exact to 1e-15)."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = regularized_incomplete_beta(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))


def regularized_incomplete_beta(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b) from its continued fraction (Lentz's method), using the symmetry for x > (a+1)/(a+b+2)."""
    x = np.asarray(x, dtype=np.float64)
    flip = x > (a + 1) / (a + b + 2)
    xs, aa, bb = np.where(flip, 1 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    with np.errstate(divide="ignore"):
        log_front = (aa * np.log(xs) + bb * np.log1p(-xs) - _log_beta(aa, bb)) - np.log(aa)
    value = np.exp(log_front) * _beta_continued_fraction(xs, aa, bb)
    value = np.where(xs <= 0, 0.0, value)
    return np.where(flip, 1 - value, value)


def _log_beta(a, b):
    from math import lgamma
    lg = np.vectorize(lgamma)
    return lg(a) + lg(b) - lg(a + b)


def _beta_continued_fraction(x, a, b, terms: int = 300, tiny: float = 1e-300):
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, terms):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + numerator / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
    return h


@dataclass(frozen=True)
class Schedule:
    name: str   # A1111's internal name ("karras")
    label: str  # what the UI, the API and infotexts show ("Karras")
    build: object

    def sigmas(self, n: int, model: ModelSigmas, discard_next_to_last: bool = False,
               sdxl: bool = False) -> np.ndarray:
        """`sdxl`: the model is SDXL (base or refiner), for schedules with SDXL's own values (Align Your Steps)."""
        build = self.build
        if sdxl and "sdxl" in inspect.signature(build).parameters:
            build = functools.partial(build, sdxl=True)
        if not discard_next_to_last:
            return build(n, model)
        # DPM2 and friends: one more step, then drop the value before the final 0.
        sigmas = build(n + 1, model)
        return np.concatenate([sigmas[:-2], sigmas[-1:]])


# A1111 1.10's order, which /schedulers lists.
SCHEDULES = [
    Schedule("uniform", "Uniform", uniform),
    Schedule("karras", "Karras", karras),
    Schedule("exponential", "Exponential", exponential),
    Schedule("polyexponential", "Polyexponential", polyexponential),
    Schedule("sgm_uniform", "SGM Uniform", sgm_uniform),
    Schedule("kl_optimal", "KL Optimal", kl_optimal),
    Schedule("align_your_steps", "Align Your Steps", align_your_steps),
    Schedule("simple", "Simple", simple),
    Schedule("normal", "Normal", normal),
    Schedule("ddim", "DDIM", ddim),
    Schedule("beta", "Beta", beta),
]
AUTOMATIC = "Automatic"


def find_schedule(name: str) -> Schedule:
    """Look a schedule up by label or name, case-insensitively; raise naming the valid choices."""
    wanted = name.strip().lower()
    for schedule in SCHEDULES:
        if wanted in (schedule.name, schedule.label.lower()):
            return schedule
    valid = ", ".join([AUTOMATIC] + [s.label for s in SCHEDULES])
    raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {valid}")
