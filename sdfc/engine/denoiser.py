"""Classifier-free guidance over the UNet: the denoiser the samplers call (D(x, σ) for k-diffusion, ε for the DDIM
family), with the model's prediction type (ε or v), CFG-1's cond-only shortcut, the inpainting UNet's extra
channels, the SDXL refiner's switch, and the UNet conditioning kept on the device per prompt-schedule segment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .conditioning import BatchConditioning

if TYPE_CHECKING:
    from . import inpaint as inpaint_mod
    from .models import OnnxModel
    from .pipeline import JobControl


class CFGDenoiser:
    """Classifier-free guidance (§2): one UNet batch of [cond rows…, uncond rows…] per call.

    Image i contributes one cond row per AND sub-prompt; the conditioning of each row follows its prompt
    schedule by the 0-based call counter (prompt editing and alternation).
    """

    def __init__(self, model: OnnxModel, conditioning: BatchConditioning, cfg_scale: float,
                 control: JobControl):
        self.model, self.conditioning = model, conditioning
        self.cfg_scale = float(cfg_scale)
        self.control = control
        self.calls = 0
        self.blend: inpaint_mod.LatentBlend | None = None  # inpainting: holds the known area (inpaint.py)
        self.image_cond: np.ndarray | None = None  # an inpainting UNet's 5 extra input channels per image
        self.refiner = None  # sdxl.RefinerSwitch: hands the rest of sampling to the refiner (A1111's apply_refiner)
        # The UNet's conditioning inputs as the model keeps them (on the device with IO binding), per batch kind
        # and conditioning tensors: built once per schedule segment, freed with the job (see _unet_conditioning).
        self._resident: dict[tuple, tuple] = {}

    def cond_only(self, weights) -> bool:
        """CFG 1 with one sub-prompt of weight 1 per image: the guided output is the cond output exactly, so
        the uncond batch is not run (Forge's CFG-1 shortcut; A1111 1.10 runs it and gets the same up to
        rounding). Turbo/LCM models sample this way."""
        return self.cfg_scale == 1.0 and all(len(rows) == 1 and rows[0][1] == 1.0 for rows in weights)

    def _outputs(self, x_in: np.ndarray, t: float, need_uncond: bool = False):
        """Raw UNet outputs for the cond rows and the uncond rows (None when `cond_only`), and which rows
        belong to which image."""
        self.control._check()
        cond, weights, uncond = self.conditioning.at(self.calls)
        cond_in, uncond_in = self.conditioning.unet_inputs(self.calls)  # SDXL: pooled text, size ids per row
        self.calls += 1
        image_of_row = [i for i, rows in enumerate(weights) for _ in rows]
        if self.image_cond is not None:  # the conditioning rides along unscaled, cond and uncond alike
            x_in = np.concatenate([x_in, self.image_cond.astype(x_in.dtype)], axis=1)
        x_cond = x_in[image_of_row]
        conditioning = lambda kind: self._unet_conditioning(kind, cond, cond_in, uncond, uncond_in)  # noqa: E731
        if not need_uncond and self.cond_only(weights):
            return self._unet(x_cond, t, conditioning("cond")), None, weights, image_of_row
        if cond.shape[1:] == uncond.shape[1:]:
            out = self._unet(np.concatenate([x_cond, x_in]), t, conditioning("cond+uncond"))
            out_cond, out_uncond = out[: len(x_cond)], out[len(x_cond):]
        else:  # different prompt lengths cannot share a batch (§1.6)
            out_cond = self._unet(x_cond, t, conditioning("cond"))
            out_uncond = self._unet(x_in, t, conditioning("uncond"))
        return out_cond, out_uncond, weights, image_of_row

    def _unet(self, x: np.ndarray, t: float, conditioning: dict) -> np.ndarray:
        extra = dict(conditioning)
        return self.model.unet(x, t, extra.pop("encoder_hidden_states"), **extra)

    def _unet_conditioning(self, kind: str, cond, cond_in: dict, uncond, uncond_in: dict) -> dict:
        """The UNet's conditioning inputs (hidden states; SDXL's pooled text and size ids) for the `kind` of
        batch ("cond", "uncond" or "cond+uncond"), made once by the model's resident_inputs (on the device with
        IO binding) and reused while BatchConditioning returns the same tensors, i.e. for one schedule segment."""
        used = {"cond": (cond,), "uncond": (uncond,), "cond+uncond": (cond, uncond)}[kind]
        key = (kind, id(self.model), self.model.io_binding, *map(id, used))
        entry = self._resident.get(key)
        if entry is None:
            if kind == "cond+uncond":
                arrays = {"encoder_hidden_states": np.concatenate([cond, uncond]),
                          **{k: np.concatenate([cond_in[k], uncond_in[k]]) for k in cond_in}}
            else:
                hidden, extra = (cond, cond_in) if kind == "cond" else (uncond, uncond_in)
                arrays = {"encoder_hidden_states": hidden, **extra}
            # The key's objects are kept with the entry, so that their ids stay theirs while it lives.
            entry = (self.model.resident_inputs("unet", arrays), self.model, used)
            self._resident[key] = entry
        return entry[0]

    def _combine(self, cond: np.ndarray, uncond: np.ndarray | None, weights) -> np.ndarray:
        if uncond is None:  # cond_only: one row per image, in image order
            return cond
        guided = uncond.copy()
        for i, rows in enumerate(weights):
            for row, weight in rows:
                guided[i] += (cond[row] - uncond[i]) * np.float32(weight * self.cfg_scale)
        return guided

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """D(x, σ) guided: k-diffusion's CompVis wrapping, CFG combined on the denoised outputs."""
        sigma = np.float32(sigma)
        if self.refiner is not None:
            self.refiner.check(self, sigma=sigma)
        one = np.float32(1)
        c_in = one / np.sqrt(sigma ** 2 + one)
        out_c, out_u, weights, image_of_row = self._outputs(x * c_in, self.model.sigmas.sigma_to_t(sigma))
        if self.model.info.prediction_type == "v_prediction":
            # k-diffusion's V wrapping with σ_data = 1: D = v·c_out + x·c_skip (§3.1)
            c_skip, c_out = one / (sigma ** 2 + one), -sigma / np.sqrt(sigma ** 2 + one)
            denoised = lambda out, x_: out * c_out + x_ * c_skip  # noqa: E731
        else:
            denoised = lambda out, x_: x_ - out * sigma  # noqa: E731
        return self._combine(denoised(out_c, x[image_of_row]),
                             None if out_u is None else denoised(out_u, x), weights)

    def _to_eps(self, out: np.ndarray, x_t: np.ndarray, timestep: float) -> np.ndarray:
        """The UNet output as ε: a v prediction becomes sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x_t, ᾱ at the timestep
        truncated to an integer, as A1111's CompVisTimestepsVDenoiser (UniPC's times are fractional)."""
        if self.model.info.prediction_type != "v_prediction":
            return out
        a = np.float64(self.model.sigmas.alphas_cumprod[int(timestep)])
        return np.float32(np.sqrt(a)) * out + np.float32(np.sqrt(1 - a)) * x_t

    def eps(self, x: np.ndarray, timestep: float) -> np.ndarray:
        """Guided ε at an integer timestep, for the DDIM family."""
        if self.refiner is not None:
            self.refiner.check(self, timestep=timestep)
        eps_c, eps_u, weights, rows = self._outputs(x, timestep)
        eps_u = None if eps_u is None else self._to_eps(eps_u, x, timestep)
        return self._combine(self._to_eps(eps_c, x[rows], timestep), eps_u, weights)

    def eps_pair(self, x: np.ndarray, timestep: float, scale_multiplier: float = 1.0):
        """DDIM CFG++ (§2, §3.4): (guided ε with the CFG scale × `scale_multiplier`, uncond ε) of one call."""
        if self.refiner is not None:
            self.refiner.check(self, timestep=timestep)
        eps_c, eps_u, weights, rows = self._outputs(x, timestep, need_uncond=True)
        eps_c, eps_u = self._to_eps(eps_c, x[rows], timestep), self._to_eps(eps_u, x, timestep)
        scale = self.cfg_scale
        self.cfg_scale = scale * scale_multiplier  # A1111: cond_scale * cond_scale_multiplier
        try:
            return self._combine(eps_c, eps_u, weights), eps_u
        finally:
            self.cfg_scale = scale
