"""Samplers: each one short function that walks a latent down a sigma (or timestep) schedule.

k-diffusion style (generation-semantics.md §3): `sample_x(model, x, sigmas, noise, callback, ...)` where
`model(x, sigma)` returns the denoised prediction D(x, σ) and `noise()` returns the next draw of every
image's own generator (A1111's per-image noise). Variants:
* SDE samplers (`Sampler.noise == "brownian"`) get `noise(σ, σ_next)` instead: Brownian-tree increments
  (brownian.py), one tree per image seed.
* DPM fast/adaptive take `sigma_min, sigma_max[, n]` instead of `sigmas` (they walk their own grid).
* Timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) take `(eps_model, x, timesteps, alphas_cumprod, noise,
  callback)` with an ε model; DDIM CFG++'s returns (guided ε, uncond ε).
* LCM runs on `LCMDenoiser`, A1111's LCM model wrapping, over the 50-timestep `schedules.LCMSigmas`.
Adding a sampler is one function plus one line in `SAMPLERS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
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


# ---- Float32 transcendental functions, correctly rounded -----------------------------------------------
# torch's float32 exp/log/expm1 (what A1111 computes with) agree with these for 95–99% of inputs, NumPy's own
# float32 versions for 60–93%. The last bit is invisible to ODE samplers but not to Brownian-tree queries,
# whose times are rounded to 1e-6 (§5.4); the samplers below use these for their σ/λ arithmetic.


def _exp(x):
    return f32(np.exp(np.float64(x)))


def _log(x):
    return f32(np.log(np.float64(x)))


def _expm1(x):
    return f32(np.expm1(np.float64(x)))


# ---- Stochastic DPM-Solver++ samplers with Brownian-tree noise (§3.3, §5.4) ----------------------------
# For these `noise` is a Brownian noise sampler: noise(σ, σ_next) → unit-variance increments (brownian.py).


def sample_dpmpp_sde(model: Model, x, sigmas, noise, callback: Callback = None, eta=1.0, s_noise=1.0,
                     r=0.5):
    """DPM-Solver++ (stochastic, r = ½): a midpoint stage then the full step, each with ancestral noise."""
    sigma_fn = lambda t: _exp(-t)  # noqa: E731
    t_fn = lambda sigma: -_log(sigma)  # noqa: E731
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        h = t_next - t
        s = t + h * f32(r)
        fac = 1 / (2 * r)
        # Stage 1: to the midpoint s.
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(f32(sd))
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - _expm1(t - s_) * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * f32(s_noise) * f32(su)
        denoised_2 = model(x_2, sigma_fn(s))
        # Stage 2: the whole step with the midpoint's prediction.
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(f32(sd))
        denoised_d = f32(1 - fac) * denoised + f32(fac) * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - _expm1(t - t_next_) * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * f32(s_noise) * f32(su)
    return x


def sample_dpmpp_2m_sde(model: Model, x, sigmas, noise, callback: Callback = None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; `solver_type` "midpoint" (DPM++ 2M SDE) or "heun" (DPM++ 2M SDE Heun)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised  # the denoising step
        else:
            t, s = -_log(sigma), -_log(sigma_next)
            h = s - t
            eta_h = f32(eta) * h
            x = sigma_next / sigma * _exp(-eta_h) * x + -_expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-_expm1(-h - eta_h) / (-h - eta_h) + f32(1)) * (f32(1) / r) \
                        * (denoised - old_denoised)
                else:
                    x = x + f32(0.5) * -_expm1(-h - eta_h) * (f32(1) / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * np.sqrt(-_expm1(f32(-2) * eta_h)) \
                    * f32(s_noise)
        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_3m_sde(model: Model, x, sigmas, noise, callback: Callback = None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep from the last three predictions."""
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            t, s = -_log(sigma), -_log(sigma_next)
            h = s - t
            h_eta = h * f32(eta + 1)
            x = _exp(-h_eta) * x + -_expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = _expm1(-h_eta) / h_eta + f32(1)
                phi_3 = phi_2 / h_eta - f32(0.5)
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = _expm1(-h_eta) / h_eta + f32(1)
                x = x + phi_2 * d
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * np.sqrt(-_expm1(f32(-2) * h * f32(eta))) \
                    * f32(s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ---- DPM-Solver with fixed or adaptive steps (Lu et al. 2022; k-diffusion's DPMSolver) -------------------
# These walk t = −log σ from σ_max to σ_min themselves; they take no schedule (§3.3, §3.2).


class _DPMSolver:
    """DPM-Solver-1/2/3 steps in ε form; ε evaluations are cached per step under their stage names."""

    def __init__(self, model: Model):
        self.model = model

    @staticmethod
    def sigma(t):
        return _exp(-t)

    @staticmethod
    def t(sigma):
        return -_log(sigma)

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            cache[key] = (x - self.model(x, self.sigma(t))) / self.sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * _expm1(h) * eps

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + f32(r1) * h
        u1 = x - self.sigma(s1) * _expm1(f32(r1) * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * _expm1(h) * eps \
            - self.sigma(t_next) / f32(2 * r1) * _expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + f32(r1) * h, t + f32(r2) * h
        u1 = x - self.sigma(s1) * _expm1(f32(r1) * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = x - self.sigma(s2) * _expm1(f32(r2) * h) * eps \
            - self.sigma(s2) * f32(r2 / r1) * (_expm1(f32(r2) * h) / (f32(r2) * h) - f32(1)) * (eps_r1 - eps)
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * _expm1(h) * eps \
            - self.sigma(t_next) / f32(r2) * (_expm1(h) / h - f32(1)) * (eps_r2 - eps)

    def ancestral_target(self, t, t_next, t_end, eta):
        """Where the deterministic part lands (t_next') and how much noise brings it back to t_next."""
        if not eta:
            return t_next, f32(0)
        sd, _ = ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_next_ = np.minimum(t_end, self.t(f32(sd)))
        return t_next_, np.sqrt(self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2)


def sample_dpm_fast(model: Model, x, sigma_min, sigma_max, n, noise: Noise, callback: Callback = None,
                    eta=0.0, s_noise=1.0):
    """DPM-Solver-Fast: n model calls over ⌊n/3⌋ + 1 equal intervals in t, orders 3…3 then 2, 1 (§3.3)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    solver = _DPMSolver(model)
    t_start, t_end = solver.t(f32(sigma_max)), solver.t(f32(sigma_min))
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1, dtype=np.float32)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = solver.ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(cache, "eps", x, t)
        _report(callback, i, x, solver.sigma(t), x - solver.sigma(t) * eps)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next_, cache)
        x = x + su * f32(s_noise) * noise()  # drawn on every interval, even when η = 0
    return x


def sample_dpm_adaptive(model: Model, x, sigma_min, sigma_max, noise: Noise, callback: Callback = None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12/23 with PID step-size control; the number of model calls depends on the data.

    The error norm runs over the whole batch, so (as in A1111) images of a batch influence each other's
    step sizes: DPM adaptive is not batch-deterministic."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    solver = _DPMSolver(model)
    t_start, t_end = solver.t(f32(sigma_max)), solver.t(f32(sigma_min))
    atol, rtol = f32(atol), f32(rtol)
    pid = _PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, steps = t_start, x, 0
    while s < t_end - f32(1e-5):
        cache: dict = {}
        t = np.minimum(t_end, s + f32(pid.h))
        t_, su = solver.ancestral_target(s, t, t_end, eta)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - solver.sigma(s) * eps
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
        scaled = ((x_low - x_high) / delta).astype(np.float64)
        error = f32(np.sqrt(np.sum(scaled * scaled))) / f32(x.size ** 0.5)
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * f32(s_noise) * noise()
            s = t
        _report(callback, steps, x, solver.sigma(s), denoised)
        steps += 1
    return x


class _PIDStepSizeController:
    """PID control of the step size h from the (scaled) error of the embedded lower-order solution."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # a soft limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


# ---- Restart (Xu et al. 2023, as A1111 wires it; §3.6) -------------------------------------------------


def _karras_between(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    from .schedules import karras
    return karras(n, SimpleNamespace(sigma_min=float(sigma_min), sigma_max=float(sigma_max)))


def sample_restart(model: Model, x, sigmas, noise: Noise, callback: Callback = None, s_noise=1.0):
    """Heun steps down a shortened Karras schedule plus restart segments that jump back up with fresh noise.

    With ≥ 20 steps the main schedule keeps n − restart_steps·restart_times steps and, at the sigma nearest
    0.1, jumps back to the sigma nearest 2 and descends again restart_times times; with fewer steps it is
    plain Heun. Every upward jump adds one noise draw."""
    steps = len(sigmas) - 1
    restarts: dict[int, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = _karras_between(steps - restart_steps * restart_times, sigmas[-2], sigmas[0])
        restarts = {int(np.argmin(np.abs(sigmas - f32(0.1)))): (restart_steps + 1, restart_times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((f32(sigmas[i]), f32(sigmas[i + 1])))
        if i + 1 in restarts:
            segment_steps, times, restart_max = restarts[i + 1]
            low, high = i + 1, int(np.argmin(np.abs(sigmas - f32(restart_max))))
            if high < low:
                segment = _karras_between(segment_steps, sigmas[low], sigmas[high])[:-1]
                pairs.extend(list(zip(segment[:-1], segment[1:])) * times)
    last = None
    for step, (old, new) in enumerate(pairs):
        if last is None:
            last = old
        elif last < old:
            x = x + noise() * f32(s_noise) * np.sqrt(old ** 2 - last ** 2)
        denoised = model(x, old)
        d = to_d(x, old, denoised)
        _report(callback, step, x, new, denoised)
        dt = new - old
        if new == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, new, model(x_2, new))
            x = x + (d + d_2) / 2 * dt
        last = new
    return x


# ---- LCM (§3.8) ----------------------------------------------------------------------------------------


class LCMDenoiser:
    """A1111's LCM model wrapping over a CFG ε model: D = c_out·(x − σ·ε) + c_skip·x at LCM's timesteps.

    `eps_model(x_in, t)` is the guided ε (CFG combined on ε; A1111 combines the wrapped outputs, which is
    the same affine map of ε, equal up to float rounding). `lcm_sigmas` is a `schedules.LCMSigmas`."""

    def __init__(self, eps_model, lcm_sigmas):
        self.eps_model, self.sigmas = eps_model, lcm_sigmas

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = f32(sigma)
        c_in = f32(1) / np.sqrt(sigma ** 2 + f32(1))
        t = self.sigmas.sigma_to_t(sigma)
        eps = self.eps_model(x * c_in, float(t))
        x0 = x - eps * sigma
        tau = f32(t) * f32(10)
        c_skip = f32(0.25) / (tau ** 2 + f32(0.25))
        c_out = tau / np.sqrt(tau ** 2 + f32(0.25))
        return c_out * x0 + c_skip * x


def sample_lcm(model: Model, x, sigmas, noise: Noise, callback: Callback = None):
    """Latent Consistency Model sampling: jump to the prediction, re-noise to the next sigma."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + f32(sigmas[i + 1]) * noise()
    return x


# ---- Timestep samplers: DDIM CFG++, PLMS, UniPC (§3.4, §3.5) ---------------------------------------------


def _ddim_coefficients(timesteps, alphas_cumprod, eta):
    alphas = alphas_cumprod[timesteps].astype(np.float64)
    alphas_prev = alphas_cumprod[np.concatenate([[0], timesteps[:-1]])].astype(np.float64)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return alphas, alphas_prev, sigmas


def sample_ddim_cfgpp(eps_pair_model, x, timesteps, alphas_cumprod, noise: Noise, callback: Callback = None,
                      eta=0.0):
    """DDIM with CFG++: x0 from the guided ε (scale ÷ 12.5), the direction term from the uncond ε.

    `eps_pair_model(x, t)` returns (guided ε, uncond ε) of one model call."""
    alphas, alphas_prev, sigmas = _ddim_coefficients(timesteps, alphas_cumprod, eta)
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t, e_uncond = eps_pair_model(x, float(timesteps[index]))
        a_t, a_prev, sigma_t = f32(alphas[index]), f32(alphas_prev[index]), f32(sigmas[index])
        pred_x0 = (x - f32(np.sqrt(1 - alphas[index])) * e_t) / np.sqrt(a_t)
        _report(callback, i, x, float(timesteps[index]), pred_x0)
        dir_xt = np.sqrt(f32(1.0) - a_prev - sigma_t ** 2) * e_uncond
        x = np.sqrt(a_prev) * pred_x0 + dir_xt + sigma_t * noise()  # drawn even when η = 0
    return x


def sample_plms(eps_model, x, timesteps, alphas_cumprod, noise: Noise, callback: Callback = None):
    """Pseudo linear multistep: a pseudo-improved-Euler first step (2 calls), then Adams–Bashforth on ε."""
    alphas, alphas_prev, _ = _ddim_coefficients(timesteps, alphas_cumprod, 0.0)

    def step(x, e_t, index):
        a_t, a_prev = f32(alphas[index]), f32(alphas_prev[index])
        pred_x0 = (x - f32(np.sqrt(1 - alphas[index])) * e_t) / np.sqrt(a_t)
        return np.sqrt(a_prev) * pred_x0 + np.sqrt(f32(1.0) - a_prev) * e_t, pred_x0

    old_eps: list[np.ndarray] = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, float(timesteps[index]))
        if not old_eps:
            x_prev, _ = step(x, e_t, index)
            e_next = eps_model(x_prev, float(timesteps[max(index - 1, 0)]))
            e_prime = (e_t + e_next) / f32(2)
        elif len(old_eps) == 1:
            e_prime = (f32(3) * e_t - old_eps[-1]) / f32(2)
        elif len(old_eps) == 2:
            e_prime = (f32(23) * e_t - f32(16) * old_eps[-1] + f32(5) * old_eps[-2]) / f32(12)
        else:
            e_prime = (f32(55) * e_t - f32(59) * old_eps[-1] + f32(37) * old_eps[-2]
                       - f32(9) * old_eps[-3]) / f32(24)
        x, pred_x0 = step(x, e_prime, index)
        _report(callback, i, x, float(timesteps[index]), pred_x0)
        old_eps = (old_eps + [e_t])[-3:]
    return x


class _DiscreteVPSchedule:
    """UniPC's continuous-time view of a discrete model: t_k = (k + 1)/N, log α(t) piecewise linear."""

    def __init__(self, alphas_cumprod: np.ndarray):
        n = len(alphas_cumprod)
        self.total_n = n
        self.t_array = np.linspace(0.0, 1.0, n + 1, dtype=np.float32)[1:]
        self.log_alpha_array = (f32(0.5) * _log(alphas_cumprod.astype(np.float32))).astype(np.float32)

    def log_alpha(self, t):
        xp, yp = self.t_array, self.log_alpha_array
        k = int(np.clip(np.searchsorted(xp, t, side="right") - 1, 0, len(xp) - 2))
        return yp[k] + (t - xp[k]) * (yp[k + 1] - yp[k]) / (xp[k + 1] - xp[k])  # extrapolates at the ends

    def alpha(self, t):
        return _exp(self.log_alpha(t))

    def std(self, t):
        return np.sqrt(f32(1) - _exp(f32(2) * self.log_alpha(t)))

    def lamb(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - f32(0.5) * _log(f32(1) - _exp(f32(2) * log_alpha))


def sample_unipc(eps_model, x, timesteps, alphas_cumprod, noise: Noise, callback: Callback = None,
                 is_img2img=False, order=3, variant="bh1", lower_order_final=True):
    """UniPC multistep (Zhao et al. 2023) as A1111 runs it: data prediction, time-uniform grid in [1/N, 1].

    len(timesteps) steps from t = 1 (img2img: from timesteps[-1]/1000 + 1/1000) to t = 1/1000; model time
    (t − 1/N)·1000 is fractional. Each step's model call is at the predictor's output and serves both as
    the corrector of that step and as the history of the next; the last step has no corrector.
    A1111 refuses order ≥ steps; here the order is lowered to the step count instead."""
    ns = _DiscreteVPSchedule(alphas_cumprod)
    steps = len(timesteps)
    order = min(order, steps)
    t_0 = f32(1.0 / ns.total_n)
    t_T = f32(timesteps[-1]) / f32(1000) + f32(1 / 1000) if is_img2img else f32(1.0)
    grid = np.linspace(t_T, t_0, steps + 1, dtype=np.float32)

    def model_fn(x, t):  # ε → x0 with the continuous-time α, σ
        t_input = (t - t_0) * f32(1000)
        eps = eps_model(x, float(t_input))
        return (x - ns.std(t) * eps) / ns.alpha(t)

    calls = [0]

    def after_update(x, model_x):
        _report(callback, calls[0], x, 0.0, model_x)
        calls[0] += 1

    def update(x, model_prev, t_prev, t, order, use_corrector):
        lambda_prev_0, lambda_t = ns.lamb(t_prev[-1]), ns.lamb(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = ns.std(t_prev[-1]), ns.std(t)
        alpha_t = _exp(ns.log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = (ns.lamb(t_prev[-(i + 1)]) - lambda_prev_0) / h
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks = np.array(rks + [1.0], dtype=np.float32)
        hh = -h  # data prediction
        h_phi_1 = _expm1(hh)
        h_phi_k = h_phi_1 / hh - f32(1)
        b_h = hh if variant == "bh1" else _expm1(hh)
        factorial, rows, b = 1, [], []
        for i in range(1, order + 1):
            rows.append(rks ** f32(i - 1))
            b.append(h_phi_k * f32(factorial) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - f32(1 / factorial)
        r_matrix, b = np.stack(rows).astype(np.float32), np.array(b, dtype=np.float32)
        x_t_ = sigma_t / sigma_prev_0 * x - alpha_t * h_phi_1 * model_prev_0
        pred_res = 0
        if d1s:
            rhos_p = np.array([0.5], dtype=np.float32) if order == 2 else \
                np.linalg.solve(r_matrix[:-1, :-1], b[:-1]).astype(np.float32)
            pred_res = sum(rho * d for rho, d in zip(rhos_p, d1s))
        x_t = x_t_ - alpha_t * b_h * pred_res
        model_t = None
        if use_corrector:
            rhos_c = np.array([0.5], dtype=np.float32) if order == 1 else \
                np.linalg.solve(r_matrix, b).astype(np.float32)
            model_t = model_fn(x_t, t)
            corr_res = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s)) if d1s else 0
            x_t = x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
        return x_t, model_t

    model_prev, t_prev = [model_fn(x, grid[0])], [grid[0]]
    for init_order in range(1, order):  # warm up with lower orders, corrector on
        x, model_x = update(x, model_prev, t_prev, grid[init_order], init_order, True)
        after_update(x, model_x)
        model_prev.append(model_x)
        t_prev.append(grid[init_order])
    for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = update(x, model_prev, t_prev, grid[step], step_order, step != steps)
        after_update(x, model_x)
        model_prev, t_prev = model_prev[1:] + [model_x], t_prev[1:] + [grid[step]]
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
    # Which of the s_churn/s_tmin/s_tmax/s_noise options A1111 passes (its `sampler_extra_params`).
    extra_params: tuple[str, ...] = ()
    noise: str = "generator"  # "generator": per-image draws (ImageRNG.next); "brownian": BrownianNoise
    model_wrap: str = "cfg"   # "cfg"; "cfg++" (DDIM CFG++: guided and uncond ε); "lcm" (LCM's wrapping)

    def prompt_schedule_steps(self, steps: int) -> int:
        """The steps prompt editing counts in: second-order samplers call the model twice a step (§1.2)."""
        return steps * 2 if self.options.get("second_order") == "True" else steps


# In A1111 1.10's order, which /samplers lists. `options` are reported as A1111 reports them.
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_S_NOISE = ("s_noise",)

SAMPLERS = [
    Sampler("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), "karras", options={"scheduler": "karras"}),
    Sampler("DPM++ SDE", sample_dpmpp_sde, ("k_dpmpp_sde",), "karras", uses_eta=True, extra_params=_S_NOISE,
            noise="brownian", options={"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}),
    Sampler("DPM++ 2M SDE", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), "exponential", uses_eta=True,
            extra_params=_S_NOISE, noise="brownian",
            options={"scheduler": "exponential", "brownian_noise": "True"}),
    Sampler("DPM++ 2M SDE Heun", partial(sample_dpmpp_2m_sde, solver_type="heun"), ("k_dpmpp_2m_sde_heun",),
            "exponential", uses_eta=True, extra_params=_S_NOISE, noise="brownian",
            options={"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"}),
    Sampler("DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), "karras", uses_eta=True,
            extra_params=_S_NOISE,
            options={"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}),
    Sampler("DPM++ 3M SDE", sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",), "exponential", uses_eta=True,
            discard_next_to_last_sigma=True, extra_params=_S_NOISE, noise="brownian",
            options={"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"}),
    Sampler("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_eta=True,
            options={"uses_ensd": "True"}),
    Sampler("Euler", sample_euler, ("k_euler",), extra_params=_CHURN),
    Sampler("LMS", sample_lms, ("k_lms",)),
    Sampler("Heun", sample_heun, ("k_heun",), extra_params=_CHURN, options={"second_order": "True"}),
    Sampler("DPM2", sample_dpm_2, ("k_dpm_2",), "karras", discard_next_to_last_sigma=True, extra_params=_CHURN,
            options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"}),
    Sampler("DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",), "karras", uses_eta=True,
            discard_next_to_last_sigma=True, extra_params=_S_NOISE,
            options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
                     "second_order": "True"}),
    Sampler("DPM fast", sample_dpm_fast, ("k_dpm_fast",), uses_eta=True, extra_params=_S_NOISE,
            options={"uses_ensd": "True"}),
    Sampler("DPM adaptive", sample_dpm_adaptive, ("k_dpm_ad",), uses_eta=True, options={"uses_ensd": "True"}),
    Sampler("Restart", sample_restart, ("restart",), "karras",
            options={"scheduler": "karras", "second_order": "True"}),
    Sampler("DDIM", sample_ddim, ("ddim",), kind="timesteps", uses_eta=True),
    Sampler("DDIM CFG++", sample_ddim_cfgpp, ("ddim_cfgpp",), kind="timesteps", uses_eta=True,
            model_wrap="cfg++"),
    Sampler("PLMS", sample_plms, ("plms",), kind="timesteps"),
    Sampler("UniPC", sample_unipc, ("unipc",), kind="timesteps"),
    Sampler("LCM", sample_lcm, ("k_lcm",), model_wrap="lcm"),
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


def img2img_plan(steps: int, denoising_strength: float, fixed: bool = False) -> tuple[int, int]:
    """(schedule length, t_enc) of an img2img job: A1111's setup_img2img_steps. `fixed` (option
    img2img_fix_steps, and every hires second pass) stretches the schedule so that exactly `steps` run."""
    if not fixed:
        return steps, img2img_steps(steps, denoising_strength)
    return (int(steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0), steps - 1

