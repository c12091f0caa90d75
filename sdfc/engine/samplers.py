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
        x, sigma_hat = _churn(x, sigmas[i], steps, noise, s_churn, s_tmin, s_tmax, s_noise)
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


def _churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Euler/Heun/DPM2's optional noise injection: raise σ to σ̂ = σ(1 + γ). The draw always happens."""
    gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = noise() * f32(s_noise)
    sigma_hat = f32(sigma * (gamma + 1))
    if gamma > 0:
        x = x + eps * np.sqrt(sigma_hat ** 2 - sigma ** 2)
    return x, sigma_hat


def sample_heun(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the step to σ = 0 is Euler."""
    steps = len(sigmas) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sigmas[i], steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], denoised)
        dt = f32(sigmas[i + 1] - sigma_hat)
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a, b) -> np.float32:
    return np.exp((np.log(f32(a)) + np.log(f32(b))) / 2).astype(np.float32)


def sample_dpm_2(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2: a midpoint step in log σ (Karras et al. 2022, after Lu et al.)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sigmas[i], steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * f32(sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
            x_2 = x + d * f32(sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * f32(sigmas[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                           eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * f32(sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * f32(sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * f32(sigma_down - sigmas[i])
            x = x + noise() * f32(s_noise) * f32(sigma_up)
    return x


def sample_lms(model: Model, x, sigmas, noise: Noise, callback: Callback = None, order: int = 4):
    """Linear multistep: integrate the Lagrange polynomial through the last `order` derivatives."""
    derivatives = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        derivatives = (derivatives + [to_d(x, sigmas[i], denoised)])[-order:]
        _report(callback, i, x, sigmas[i], denoised)
        current = min(i + 1, order)
        coefficients = [lms_coefficient(current, sigmas, i, j) for j in range(current)]
        x = x + sum(f32(c) * d for c, d in zip(coefficients, reversed(derivatives)))
    return x


def lms_coefficient(order: int, sigmas, i: int, j: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial for σ_{i−j} over σ_i … σ_{i−order+1}.

    Integrated exactly (k-diffusion uses adaptive quadrature with epsrel 1e-4 on the same cubic)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


def sample_dpmpp_2s_ancestral(model: Model, x, sigmas, noise: Noise, callback: Callback = None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) with ancestral noise; the second stage at the log-σ midpoint."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * f32(sigma_down - sigmas[i])
        else:
            t, t_next = -np.log(f32(sigmas[i])), -np.log(f32(sigma_down))
            h = t_next - t
            s = t + f32(0.5) * h
            sigma_s = np.exp(-s)
            x_2 = (sigma_s / np.exp(-t)) * x - np.expm1(-h * f32(0.5)) * denoised
            denoised_2 = model(x_2, sigma_s)
            x = (np.exp(-t_next) / np.exp(-t)) * x - np.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * f32(s_noise) * f32(sigma_up)
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


# In A1111 1.10's order, which /samplers lists. `options` are reported as A1111 reports them.
SAMPLERS = [
    Sampler("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), "karras", options={"scheduler": "karras"}),
    Sampler("DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), "karras", uses_eta=True,
            options={"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}),
    Sampler("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_eta=True,
            options={"uses_ensd": "True"}),
    Sampler("Euler", sample_euler, ("k_euler",)),
    Sampler("LMS", sample_lms, ("k_lms",)),
    Sampler("Heun", sample_heun, ("k_heun",), options={"second_order": "True"}),
    Sampler("DPM2", sample_dpm_2, ("k_dpm_2",), "karras", discard_next_to_last_sigma=True,
            options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"}),
    Sampler("DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",), "karras", uses_eta=True,
            discard_next_to_last_sigma=True,
            options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
                     "second_order": "True"}),
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

