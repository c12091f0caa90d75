"""The live preview of a job in progress: A1111's "Approx cheap" (a fixed latent → RGB map of the model family's
VAE, from the architecture table), cheap enough to compute on every progress poll and for every task heartbeat."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..engine.architectures import ARCHITECTURES


def preview_png(latent, factors=None) -> bytes | None:
    """The first image of a (batch, 4, h, w) latent as PNG bytes; None before the first step. `factors`: the
    model's latent → RGB rows (JobControl.preview_factors), SD 1.x's when not known."""
    if latent is None:
        return None
    factors = np.asarray(factors or ARCHITECTURES["sd1"].latent_rgb_factors, dtype=np.float32)
    rgb = np.einsum("chw,cr->hwr", latent[0], factors)
    pixels = (np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
