"""The reference the engine is proven against: k-diffusion's samplers driving diffusers' PyTorch UNet.

Test-only (torch). Mirrors how A1111 wires them: `DiscreteEpsDDPMDenoiser` over the UNet, CFG combined on
the denoised outputs, and k-diffusion's `torch.randn_like` redirected to the per-image noise source so
that both sides inject identical noise.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch


def load_k_diffusion():
    """Import k_diffusion.sampling/external without the package __init__ (it imports training tools)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        # utils.py imports it for image helpers the samplers never call.
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stub = types.ModuleType(name)
            # A spec, so that later `importlib.util.find_spec(name)` (diffusers probes torchvision) works.
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules.setdefault(name, stub)
    import k_diffusion.external as external
    import k_diffusion.sampling as sampling
    return sampling, external


class NoiseHijack:
    """Stands in for the `torch` module inside k_diffusion.sampling, as A1111's TorchHijack does."""

    def __init__(self, next_noise):
        self.next_noise = next_noise

    def randn_like(self, x):
        return torch.from_numpy(self.next_noise()).to(x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


class ReferencePipeline:
    def __init__(self, diffusers_dir: Path):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.sampling, external = load_k_diffusion()
        self.external = external
        d = Path(diffusers_dir)
        self.unet = UNet2DConditionModel.from_pretrained(d / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(d / "vae").eval()
        self.text_encoder = CLIPTextModel.from_pretrained(d / "text_encoder").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer")
        from diffusers import DDIMScheduler
        # A1111 never clips the x0 prediction; diffusers DDIM does unless told not to.
        self.ddim = DDIMScheduler.from_pretrained(d / "scheduler", clip_sample=False)
        self.alphas_cumprod = self.ddim.alphas_cumprod.to(torch.float32)

        unet = self.unet

        class EpsModel(torch.nn.Module):
            def forward(self, x, t, cond):
                return unet(x, t, encoder_hidden_states=cond).sample

        self.denoiser = external.DiscreteEpsDDPMDenoiser(EpsModel(), self.alphas_cumprod, quantize=False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids).last_hidden_state

    def sigmas(self, steps: int, schedule: str) -> torch.Tensor:
        if schedule.endswith("-discard"):  # A1111: one more step, then drop the penultimate sigma
            sigmas = self.sigmas(steps + 1, schedule.removesuffix("-discard"))
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        if schedule == "karras":
            return self.sampling.get_sigmas_karras(steps, self.denoiser.sigmas[0].item(),
                                                   self.denoiser.sigmas[-1].item(), device="cpu")
        if schedule == "exponential":
            return self.sampling.get_sigmas_exponential(steps, self.denoiser.sigmas[0].item(),
                                                        self.denoiser.sigmas[-1].item(), device="cpu")
        return self.denoiser.get_sigmas(steps)

    def cfg_model(self, cond, uncond, scale):
        def model(x, sigma):
            d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            d_c, d_u = d.chunk(2)
            return d_u + (d_c - d_u) * scale
        return model

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> torch.Tensor:
        """Latent of (B, 3, H, W) pixels in [-1, 1]: posterior mean times the scaling factor."""
        dist = self.vae.encode(torch.from_numpy(pixels)).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        out = []
        for latent in latents:
            image = self.vae.decode(latent[None] / self.vae.config.scaling_factor).sample[0]
            out.append(((image + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
        return out

    @torch.no_grad()
    def k_sample(self, function: str, prompt, negative, noise_first, next_noise, steps, cfg, schedule,
                 init_latent=None, t_enc=None, **kwargs):
        """One batch through k-diffusion's `sample_<function>`; noise comes from the given source."""
        b = noise_first.shape[0]
        cond, uncond = self.encode([prompt] * b), self.encode([negative] * b)
        sigmas = self.sigmas(steps, schedule)
        x = torch.from_numpy(noise_first)
        if init_latent is not None:
            sigmas = sigmas[steps - t_enc - 1:]
            x = init_latent + x * sigmas[0]
        else:
            x = x * sigmas[0]
        real_torch = self.sampling.torch
        self.sampling.torch = NoiseHijack(next_noise)
        try:
            fn = getattr(self.sampling, f"sample_{function}")
            latents = fn(self.cfg_model(cond, uncond, cfg), x, sigmas, disable=True, **kwargs)
        finally:
            self.sampling.torch = real_torch
        return self.decode(latents)

    @torch.no_grad()
    def ddim_sample(self, prompt, negative, noise_first, steps, cfg, init_latent=None, t_enc=None):
        """A1111's DDIM walk (η = 0) with diffusers' DDIM step: every grid timestep but the last (1)."""
        b = noise_first.shape[0]
        cond, uncond = self.encode([prompt] * b), self.encode([negative] * b)
        self.ddim.set_timesteps(steps)
        timesteps = list(self.ddim.timesteps)  # descending: 951, ..., 1 for 20 steps
        x = torch.from_numpy(noise_first)
        if init_latent is not None:
            grid = sorted(int(t) for t in timesteps)
            a = self.alphas_cumprod[grid[t_enc]]
            x = init_latent * a.sqrt() + x * (1 - a).sqrt()
            timesteps = [t for t in timesteps if int(t) < grid[t_enc]]
        for t in timesteps[:-1]:
            eps = self.unet(torch.cat([x, x]), t.float(), encoder_hidden_states=torch.cat([cond, uncond])).sample
            e_c, e_u = eps.chunk(2)
            x = self.ddim.step(e_u + (e_c - e_u) * cfg, t, x, eta=0.0).prev_sample
        return self.decode(x)

    # ---- Additions for the remaining samplers (tests/test_samplers_more.py) ---------------------------

    def _conds(self, prompt, negative, b):
        return self.encode([prompt] * b), self.encode([negative] * b)

    def _eps_cfg(self, cond, uncond, scale):
        """ε with CFG combined on ε, as A1111's timestep samplers do; returns (guided, uncond)."""
        def eps(x, t):
            t = torch.as_tensor(t, dtype=torch.float32)
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
            e_c, e_u = out.chunk(2)
            return e_u + (e_c - e_u) * scale, e_u
        return eps

    @torch.no_grad()
    def k_sample_brownian(self, function, prompt, negative, noise_first, seeds, source, sigmas, cfg,
                          init_latent=None, t_enc=None, **kwargs):
        """k-diffusion SDE sampler with A1111's noise: `BrownianTreeNoiseSampler(x, σ_min, σ_max, seeds)` over
        the full schedule `sigmas` (float32 numpy, n + 1 values), torchsde's normals replaced by
        `randn_local(source, seed, size)` as A1111 does.

        The schedule is given, not recomputed: tree queries are rounded to 1e-6, so a last-bit difference in
        a σ near 10 (torch's CPU float32 sqrt/log are not correctly rounded; NumPy's and CUDA's are) moves
        a query and changes the noise. The schedules themselves are proven elsewhere."""
        from sdfc.engine.rng import randn_local
        b = noise_first.shape[0]
        cond, uncond = self._conds(prompt, negative, b)
        full = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        run = full if init_latent is None else full[len(full) - 1 - t_enc - 1:]
        x = torch.from_numpy(noise_first) * run[0]
        if init_latent is not None:
            x = init_latent + x
        fn = getattr(self.sampling, f"sample_{function}")
        with self.a1111_alphas_cumprod(), warnings.catch_warnings(), \
                patched_torchsde_randn(lambda seed, size: randn_local(source, seed, size)):
            # torchsde warns that σ_min lies below its start rounded to 1e-6, and clamps (so does the port).
            warnings.simplefilter("ignore", UserWarning)
            noise_sampler = self.sampling.BrownianTreeNoiseSampler(x, full[full > 0].min(), full.max(),
                                                                   seed=list(seeds))
            latents = fn(self.cfg_model(cond, uncond, cfg), x, run, disable=True, noise_sampler=noise_sampler,
                         **kwargs)
        return self.decode(latents)

    @contextlib.contextmanager
    def a1111_alphas_cumprod(self):
        """Within the block, the k-diffusion wrapper uses ᾱ as A1111 (LDM) builds it: betas and cumprod in
        float64, stored as float32 — diffusers' float32 cumprod differs by up to 1e-6 relative (σ_max 14.614647
        instead of 14.614642). ODE samplers do not notice; Brownian-tree queries, rounded to 1e-6, do."""
        from sdfc.engine.schedules import alphas_cumprod_from_config
        saved = self.denoiser
        alphas = torch.from_numpy(alphas_cumprod_from_config(dict(self.ddim.config)))
        self.denoiser = self.external.DiscreteEpsDDPMDenoiser(saved.inner_model, alphas, quantize=False)
        try:
            yield
        finally:
            self.denoiser = saved

    @torch.no_grad()
    def k_sample_range(self, function, prompt, negative, noise_first, next_noise, steps, cfg,
                       init_latent=None, t_enc=None, **kwargs):
        """DPM fast/adaptive: k-diffusion takes (σ_min, σ_max, n) — the model's in txt2img, the truncated
        schedule's in img2img — and the latent starts at the Automatic (Uniform) schedule's σ[0]."""
        with self.a1111_alphas_cumprod():
            return self._k_sample_range(function, prompt, negative, noise_first, next_noise, steps, cfg,
                                        init_latent, t_enc, **kwargs)

    def _k_sample_range(self, function, prompt, negative, noise_first, next_noise, steps, cfg, init_latent, t_enc,
                        **kwargs):
        b = noise_first.shape[0]
        cond, uncond = self._conds(prompt, negative, b)
        sigmas = self.denoiser.get_sigmas(steps)
        x = torch.from_numpy(noise_first)
        if init_latent is None:
            x = x * sigmas[0]
            args = dict(sigma_min=self.denoiser.sigmas[0].item(), sigma_max=self.denoiser.sigmas[-1].item(), n=steps)
        else:
            sigmas = sigmas[steps - t_enc - 1:]
            x = init_latent + x * sigmas[0]
            args = dict(sigma_min=sigmas[-2], sigma_max=sigmas[0], n=len(sigmas) - 1)
        fn = getattr(self.sampling, f"sample_{function}")
        if "n" not in inspect.signature(fn).parameters:
            del args["n"]
        real_torch = self.sampling.torch
        self.sampling.torch = NoiseHijack(next_noise)
        try:
            latents = fn(self.cfg_model(cond, uncond, cfg), x, disable=True, **args, **kwargs)
        finally:
            self.sampling.torch = real_torch
        return self.decode(latents)

    @torch.no_grad()
    def restart_sample(self, prompt, negative, noise_first, next_noise, steps, cfg):
        """A1111's Restart sampler (§3.6) written out in torch over k-diffusion's Karras schedule and to_d."""
        b = noise_first.shape[0]
        cond, uncond = self._conds(prompt, negative, b)
        model = self.cfg_model(cond, uncond, cfg)
        karras = self.sampling.get_sigmas_karras
        sigmas = self.sigmas(steps, "karras")
        x = torch.from_numpy(noise_first) * sigmas[0]
        n = len(sigmas) - 1
        pairs = [(sigmas[i], sigmas[i + 1]) for i in range(n)]
        if n >= 20:
            r_steps, r_times = (n // 4, 2) if n >= 36 else (9, 1)
            sigmas = karras(n - r_steps * r_times, sigmas[-2].item(), sigmas[0].item())
            at = int(torch.argmin((sigmas - 0.1).abs()))
            top = int(torch.argmin((sigmas - 2).abs()))
            pairs = []
            for i in range(len(sigmas) - 1):
                pairs.append((sigmas[i], sigmas[i + 1]))
                if i + 1 == at and top < at:
                    segment = karras(r_steps + 1, sigmas[at].item(), sigmas[top].item())[:-1]
                    pairs += list(zip(segment[:-1], segment[1:])) * r_times
        s_in = x.new_ones([b])
        last = None
        for old, new in pairs:
            if last is not None and last < old:
                x = x + torch.from_numpy(next_noise()) * (old ** 2 - last ** 2) ** 0.5
            last = last if last is not None else old
            d = self.sampling.to_d(x, old, model(x, old * s_in))
            if new == 0:
                x = x + d * (new - old)
            else:
                x_2 = x + d * (new - old)
                d_2 = self.sampling.to_d(x_2, new, model(x_2, new * s_in))
                x = x + (d + d_2) / 2 * (new - old)
            last = new
        return self.decode(x)

    @torch.no_grad()
    def lcm_sample(self, prompt, negative, noise_first, next_noise, steps, cfg):
        """A1111's LCM (§3.8): the 50 LCM timesteps, consistency-model output scaling, CFG on the outputs."""
        b = noise_first.shape[0]
        cond, uncond = self._conds(prompt, negative, b)
        ac = self.alphas_cumprod[19::20]
        log_sigmas = (((1 - ac) / ac) ** 0.5).log()

        def sigma_to_t(sigma):
            return int(torch.argmin((sigma.log() - log_sigmas).abs())) * 20 + 19

        def t_to_sigma(t):
            index = ((t - 19) / 20).clamp(0, len(log_sigmas) - 1)
            low, high, w = index.floor().long(), index.ceil().long(), index.frac()
            return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

        sigmas = torch.cat([t_to_sigma(torch.linspace(999, 19, steps)), torch.zeros(1)])

        def model(x, sigma):
            t = sigma_to_t(sigma)
            x_in = x / (sigma ** 2 + 1) ** 0.5
            eps = self.unet(torch.cat([x_in, x_in]), torch.tensor(float(t)),
                            encoder_hidden_states=torch.cat([cond, uncond])).sample
            tau = t * 10.0
            c_skip, c_out = 0.25 / (tau ** 2 + 0.25), tau / (tau ** 2 + 0.25) ** 0.5
            d_c, d_u = (c_out * (torch.cat([x, x]) - sigma * eps) + c_skip * torch.cat([x, x])).chunk(2)
            return d_u + (d_c - d_u) * cfg

        x = torch.from_numpy(noise_first) * sigmas[0]
        for i in range(steps):
            x = model(x, sigmas[i])
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * torch.from_numpy(next_noise())
        return self.decode(x)

    @staticmethod
    def _timesteps(steps):
        """A1111's DDIM-family grid: range(0, 1000, 1000 // steps) + 1 (§3.4)."""
        return [min(t + 1, 999) for t in range(0, 1000, max(1000 // steps, 1))]

    @torch.no_grad()
    def plms_sample(self, prompt, negative, noise_first, steps, cfg):
        """PLMS as §3.4 states it: a pseudo-improved-Euler first step, then Adams–Bashforth on plain ε."""
        b = noise_first.shape[0]
        eps = self._eps_cfg(*self._conds(prompt, negative, b), cfg)
        ts = self._timesteps(steps)
        ac = self.alphas_cumprod.double()
        x = torch.from_numpy(noise_first)

        def update(x, e, j):
            a_t, a_prev = ac[ts[j]].float(), ac[ts[j - 1] if j > 0 else 0].float()
            x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

        history = []
        for i in range(len(ts) - 1):
            j = len(ts) - 1 - i
            e = eps(x, ts[j])[0]
            if not history:
                e2 = eps(update(x, e, j), ts[max(j - 1, 0)])[0]
                e_prime = (e + e2) / 2
            elif len(history) == 1:
                e_prime = (3 * e - history[-1]) / 2
            elif len(history) == 2:
                e_prime = (23 * e - 16 * history[-1] + 5 * history[-2]) / 12
            else:
                e_prime = (55 * e - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
            x = update(x, e_prime, j)
            history = (history + [e])[-3:]
        return self.decode(x)

    @torch.no_grad()
    def ddim_cfgpp_sample(self, prompt, negative, noise_first, next_noise, steps, cfg):
        """DDIM CFG++ as §3.4 states it (η = 0): CFG scale ÷ 12.5, direction from the uncond ε."""
        b = noise_first.shape[0]
        eps = self._eps_cfg(*self._conds(prompt, negative, b), cfg / 12.5)
        ts = self._timesteps(steps)
        ac = self.alphas_cumprod.double()
        x = torch.from_numpy(noise_first)
        for i in range(len(ts) - 1):
            j = len(ts) - 1 - i
            e, e_u = eps(x, ts[j])
            a_t, a_prev = ac[ts[j]].float(), ac[ts[j - 1] if j > 0 else 0].float()
            x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e_u + 0 * torch.from_numpy(next_noise())
        return self.decode(x)

    @torch.no_grad()
    def unipc_sample(self, prompt, negative, noise_first, steps, cfg, init_latent=None, t_enc=None):
        """UniPC through diffusers' `UniPCMultistepScheduler` (bh1, order 3, data prediction, lower order at
        the end), driven on A1111's grid (§3.5): t = linspace(t_T, 1/1000, n + 1), log α(t) interpolated
        linearly between t_k = (k + 1)/1000, model time (t − 1/1000)·1000. The grid is handed to diffusers as
        its sigmas σ = sqrt(1 − α²)/α; diffusers does the predictor/corrector algebra."""
        from diffusers import UniPCMultistepScheduler
        b = noise_first.shape[0]
        eps = self._eps_cfg(*self._conds(prompt, negative, b), cfg)
        ts = self._timesteps(steps)
        x = torch.from_numpy(noise_first)
        t_start = 1.0
        if init_latent is not None:
            a = self.alphas_cumprod[ts[t_enc]]
            x = init_latent * a.sqrt() + x * (1 - a).sqrt()
            ts = ts[:t_enc]
            t_start = torch.tensor(ts[-1]) / 1000 + 1 / 1000
        n = len(ts)
        grid = torch.linspace(t_start, 1 / 1000, n + 1)
        knots = torch.linspace(0.0, 1.0, 1001)[1:]
        log_alphas = 0.5 * torch.log(self.alphas_cumprod)
        k = (torch.searchsorted(knots, grid, right=True) - 1).clamp(0, 998)
        log_alpha = log_alphas[k] + (grid - knots[k]) * (log_alphas[k + 1] - log_alphas[k]) / (knots[k + 1] - knots[k])
        alpha = log_alpha.exp()
        sigma = (1 - (2 * log_alpha).exp()).sqrt()
        scheduler = UniPCMultistepScheduler.from_config(self.ddim.config, solver_order=3, solver_type="bh1",
                                                        predict_x0=True, lower_order_final=True,
                                                        prediction_type="epsilon", thresholding=False)
        scheduler.set_timesteps(n)
        scheduler.sigmas = (sigma / alpha).to(torch.float32)
        scheduler.timesteps = (grid[:-1] - 1 / 1000) * 1000
        scheduler.set_begin_index(0)
        for t in scheduler.timesteps:
            x = scheduler.step(eps(x, t)[0], t, x).prev_sample
        return self.decode(x)


def _no_noise():
    raise AssertionError("SDE samplers draw from the Brownian tree, never from the image generators")


class patched_torchsde_randn:
    """Replace torchsde's normal generator as A1111 does (`brownian_interval._randn(size, dtype, device,
    seed)` → its own `randn_local(seed, size)`), for the duration of a `with` block."""

    def __init__(self, randn):
        self.randn = randn

    def __enter__(self):
        from torchsde._brownian import brownian_interval
        self.module, self.saved = brownian_interval, brownian_interval._randn
        brownian_interval._randn = lambda size, dtype, device, seed: \
            torch.from_numpy(self.randn(int(seed), tuple(size))).to(dtype)
        return self

    def __exit__(self, *exc):
        self.module._randn = self.saved
