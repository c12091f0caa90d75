"""The reference the engine is proven against: k-diffusion's samplers driving diffusers' PyTorch UNet.

Test-only (torch). Mirrors how A1111 wires them: `DiscreteEpsDDPMDenoiser` over the UNet, CFG combined on
the denoised outputs, and k-diffusion's `torch.randn_like` redirected to the per-image noise source so
that both sides inject identical noise.
"""
from __future__ import annotations

import importlib.util
import sys
import types
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
            sys.modules.setdefault(name, types.ModuleType(name))
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
