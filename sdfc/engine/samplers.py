"""Samplers: each one short function that walks a latent down a sigma (or timestep) schedule.

k-diffusion style (generation-semantics.md §3): `sample_x(model, x, sigmas, noise, callback, ...)` where
`model(x, sigma)` returns the denoised prediction D(x, σ) and `noise()` returns the next draw of every
image's own generator (A1111's per-image noise). Timestep samplers (DDIM) take an ε model instead.
Adding a sampler is one function plus one line in `SAMPLERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Model = Callable[[np.ndarray, float], np.ndarray]
Noise = Callable[[], np.ndarray]
Callback = Callable[[dict], None] | None

f32 = np.float32


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The ODE derivative dx/dσ = (x − D) / σ."""
    return (x - denoised) / f32(sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to σ_down and fresh noise of size σ_up (§3.3)."""
    if not eta:
        return sigma_to, 0.0
    sigma_from, sigma_to = f32(sigma_from), f32(sigma_to)
    sigma_up = min(sigma_to, f32(eta) * np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                                / sigma_from ** 2))
    sigma_down = np.sqrt(sigma_to ** 2 - sigma_up ** 2)
    return float(sigma_down), float(sigma_up)


def _report(callback: Callback, i: int, x, sigma, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def sample_euler(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    steps = len(sigmas) - 1
    for i in range(steps):
        gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noise() * f32(s_noise)  # drawn every step, used only with churn (§5.3)
        sigma_hat = f32(sigmas[i] * (gamma + 1))
        if gamma > 0:
            x = x + eps * np.sqrt(sigma_hat ** 2 - sigmas[i] ** 2)
        denoised = model(x, sigma_hat)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigma_hat, denoised) * f32(sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                           eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * f32(sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * f32(s_noise) * f32(sigma_up)
    return x


def sample_dpmpp_2m(model: Model, x, sigmas, noise: Noise, callback: Callback = None):
    """DPM-Solver++(2M) in λ = −log σ; first order on the first step and on the step to σ = 0."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # the exact limit of the update as σ_next → 0
        else:
            t, t_next = -np.log(f32(sigmas[i])), -np.log(f32(sigmas[i + 1]))
            h = t_next - t
            if old_denoised is None:
                guess = denoised
            else:
                r = (t - -np.log(f32(sigmas[i - 1]))) / h
                guess = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (f32(sigmas[i + 1]) / f32(sigmas[i])) * x - np.expm1(-h) * guess
        old_denoised = denoised
    return x


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """A1111's DDIM grid: range(0, 1000, 1000 // steps) + 1, clipped (§3.4; may exceed `steps` entries)."""
    stride = max(num_train_timesteps // steps, 1)
    return np.clip(np.arange(0, num_train_timesteps, stride) + 1, 0, num_train_timesteps - 1)


def sample_ddim(eps_model, x, timesteps, alphas_cumprod, noise: Noise, callback: Callback = None,
                eta=0.0):
    """DDIM over `timesteps` (ascending); len(timesteps) − 1 model calls, ending at timesteps[0]."""
    alphas = alphas_cumprod[timesteps].astype(np.float64)
    alphas_prev = alphas_cumprod[np.concatenate([[0], timesteps[:-1]])].astype(np.float64)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, float(timesteps[index]))
        a_t, a_prev, sigma_t = f32(alphas[index]), f32(alphas_prev[index]), f32(sigmas[index])
        pred_x0 = (x - f32(np.sqrt(1 - alphas[index])) * e_t) / np.sqrt(a_t)
        _report(callback, i, x, float(timesteps[index]), pred_x0)
        dir_xt = np.sqrt(f32(1.0) - a_prev - sigma_t ** 2) * e_t
        x = np.sqrt(a_prev) * pred_x0 + dir_xt + sigma_t * noise()  # drawn even when η = 0 (§5.3)
    return x


@dataclass(frozen=True)
class Sampler:
    name: str                 # as A1111 names it in the API, the UI and infotexts
    function: Callable
    aliases: tuple[str, ...] = ()
    default_schedule: str = "uniform"  # what "Automatic" means for this sampler
    kind: str = "sigmas"      # "sigmas" (k-diffusion) or "timesteps" (DDIM family)
    uses_eta: bool = False    # eta option: eta_ancestral for k-diffusion, eta_ddim for timesteps
    discard_next_to_last_sigma: bool = False
    options: dict = field(default_factory=dict)


SAMPLERS = [
    Sampler("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), "karras", options={"scheduler": "karras"}),
    Sampler("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_eta=True,
            options={"uses_ensd": "True"}),
    Sampler("Euler", sample_euler, ("k_euler",)),
    Sampler("DDIM", sample_ddim, ("ddim",), kind="timesteps", uses_eta=True,
            options={"default_eta_is_0": "True", "uses_ensd": "True"}),
]


def find_sampler(name: str) -> Sampler:
    """Look a sampler up by name or alias, case-insensitively; raise naming the valid choices."""
    wanted = name.strip().lower()
    for sampler in SAMPLERS:
        if wanted == sampler.name.lower() or wanted in sampler.aliases:
            return sampler
    raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(s.name for s in SAMPLERS)}")


def split_combined_name(name: str, schedule_labels: list[str]) -> tuple[str, str | None]:
    """"DPM++ 2M Karras" → ("DPM++ 2M", "Karras"), as A1111 1.10 splits a trailing schedule label."""
    for label in sorted(schedule_labels, key=len, reverse=True):
        suffix = " " + label
        if name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: -len(suffix)], label
    return name, None


def img2img_steps(steps: int, denoising_strength: float) -> int:
    """t_enc: how many of `steps` an img2img job runs (A1111's default, without img2img_fix_steps)."""
    return int(min(denoising_strength, 0.999) * steps)

