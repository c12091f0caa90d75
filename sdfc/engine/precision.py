"""Per-component precision: each ONNX input fed in its own dtype, every decoded image checked for NaN and
infinity, and an fp16 VAE's overflow decoded again in fp32 (A1111's automatic VAE revert).

An export declares each component's precision in its manifest (`component_precision`); an fp16 export keeps
the UNet's `timestep` float32 and may keep the VAE fp32 (models_export/precision.py). So one model mixes
dtypes, even within one session: the engine reads what each input wants from the session itself.

A1111 checks decoded images only for an all-NaN tensor and, with option auto_vae_precision (default on),
converts the VAE to 32-bit floats and decodes again; with the option off the image comes out black. Here any
non-finite value is an error, the retry uses the fp32 decoder the export wrote beside the fp16 one
(`vae_decoder_fp32/`, built on first need and kept), and what cannot be retried is a NaNError naming why.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from .errors import NaNError

log = logging.getLogger("sdfc.engine")

# ONNX tensor element types as onnxruntime names them in NodeArg.type.
ONNX_DTYPES = {
    "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32), "tensor(bool)": np.dtype(np.bool_),
}
FLOAT_KINDS, INT_KINDS = "f", "iu"


def input_dtypes(session) -> dict[str, np.dtype | None]:
    """Each input's dtype (None: one numpy cannot hold, e.g. bfloat16), read once and kept on the session."""
    dtypes = getattr(session, "sdfc_input_dtypes", None)
    if dtypes is None:
        dtypes = {i.name: ONNX_DTYPES.get(i.type) for i in session.get_inputs()}
        session.sdfc_input_dtypes = dtypes
    return dtypes


def typed_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` with each float (integer) array cast to the float (integer) type its input declares; any other
    mismatch, or a name the session lacks, is left for onnxruntime to report."""
    dtypes = input_dtypes(session)
    typed = {}
    for name, value in feeds.items():
        want = dtypes.get(name)
        if want is not None and value.dtype != want and (
                (value.dtype.kind in FLOAT_KINDS and want.kind in FLOAT_KINDS)
                or (value.dtype.kind in INT_KINDS and want.kind in INT_KINDS)):
            value = value.astype(want)
        typed[name] = value
    return typed


def non_finite_count(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(np.isfinite(array)))


class Fp32Decoder:
    """The fp32 VAE decoder of a model whose decoder is fp16: its folder, and its sessions (plain and
    seamless) built on first need and then kept. One per loaded model, shared by the model's views."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._sessions: dict[bool, object] = {}
        self._lock = threading.Lock()
        self._warned = False

    def session(self, build, circular: bool = False):
        """The session for `circular` (seamless) decoding; `build(folder, circular)` makes it the first time."""
        with self._lock:
            if circular not in self._sessions:
                self._sessions[circular] = build(self.folder, circular)
            return self._sessions[circular]

    def warn_once(self, model_name: str) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        # A1111's words, as its log shows them, and then where this engine differs.
        log.warning("A tensor with NaNs was produced in VAE. Decoding again with the 32-bit float VAE of model "
                    "%s (%s); this is logged once per model. To disable this behavior, disable the option "
                    "auto_vae_precision ('Automatically revert VAE to 32-bit floats'); to always decode in "
                    "32-bit floats, export the model with --vae-precision fp32.", model_name, self.folder)


def decode_checked(model, latents: np.ndarray, auto_vae_precision: bool = True) -> np.ndarray:
    """`model.vae_decode(latents)` with every value finite, or a NaNError that says why it is not.

    An fp16 decoder's non-finite result is decoded again with the fp32 decoder when `auto_vae_precision`
    allows it and the export has one; a non-finite fp32 result (or latent) is an error, never an image.
    """
    name = model.info.name
    bad = non_finite_count(latents)
    if bad:
        raise NaNError(f"the latent to decode with model {name!r} has {bad} NaN or infinite values of "
                       f"{latents.size}: the sampling diverged (try a lower cfg_scale or an fp32 model)")
    decoded = model.vae_decode(latents)
    bad = non_finite_count(decoded)
    if not bad:
        return decoded
    found = f"a tensor with NaNs (or infinities: {bad} of {decoded.size} values) was produced in the VAE of " \
            f"model {name!r}"
    if model.info.precision_of("vae_decoder") != "fp16":
        raise NaNError(f"{found}, a 32-bit float VAE: the latent or the VAE's weights are broken")
    if not auto_vae_precision:
        raise NaNError(f"{found} in 16-bit floats, and the automatic revert to 32-bit floats is off (option "
                       "auto_vae_precision): turn it on, or export the model with --vae-precision fp32")
    if not model.has_fp32_vae_decoder:
        raise NaNError(f"{found} in 16-bit floats, and its export has no 32-bit float VAE decoder to retry with: "
                       "export it again with this version of sdfc export (which writes vae_decoder_fp32/), "
                       "or with --vae-precision fp32")
    model.fp32_vae.warn_once(name)
    decoded = model.vae_decode_fp32(latents)
    bad = non_finite_count(decoded)
    if bad:
        raise NaNError(f"{found} in 16-bit floats, and again ({bad} values) in 32-bit floats: the latent or "
                       "the VAE's weights are broken")
    return decoded
