"""Noise levels: the model's discrete sigma table and the sigma schedules samplers walk down.

Follows k-diffusion's `DiscreteSchedule` as A1111 uses it (generation-semantics.md §3.1, §4): sigmas come
from float32 `alphas_cumprod`, timesteps map to sigmas by interpolation in log-sigma space, and every
schedule ends with an appended 0 unless noted.
"""
from __future__ import annotations

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
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return np.exp(log_sigma).astype(np.float32)


def _append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float32), np.float32(0))


def uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """k-diffusion's `get_sigmas(n)`: timesteps evenly spaced from 999 to 0 (the "model default")."""
    t = np.linspace(len(model.alphas_cumprod) - 1, 0, n, dtype=np.float32)
    return _append_zero(model.t_to_sigma(t))


def karras(n: int, model: ModelSigmas, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule between the model's own sigma_min and sigma_max."""
    ramp = np.linspace(0, 1, n, dtype=np.float32)
    min_inv, max_inv = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, model: ModelSigmas) -> np.ndarray:
    return _append_zero(np.exp(np.linspace(np.log(model.sigma_max), np.log(model.sigma_min), n)))


@dataclass(frozen=True)
class Schedule:
    name: str   # A1111's internal name ("karras")
    label: str  # what the UI, the API and infotexts show ("Karras")
    build: object

    def sigmas(self, n: int, model: ModelSigmas, discard_next_to_last: bool = False) -> np.ndarray:
        if not discard_next_to_last:
            return self.build(n, model)
        # DPM2 and friends: one more step, then drop the value before the final 0.
        sigmas = self.build(n + 1, model)
        return np.concatenate([sigmas[:-2], sigmas[-1:]])


SCHEDULES = [
    Schedule("uniform", "Uniform", uniform),
    Schedule("karras", "Karras", karras),
    Schedule("exponential", "Exponential", exponential),
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
