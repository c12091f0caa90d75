"""The live preview of a job in progress: A1111's "Approx cheap" (a fixed latent → RGB map of the SD 1.x VAE),
cheap enough to compute on every progress poll and for every task heartbeat."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

PREVIEW_COEFFICIENTS = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                                 [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], dtype=np.float32)


def preview_png(latent) -> bytes | None:
    """The first image of a (batch, 4, h, w) latent as PNG bytes; None before the first step."""
    if latent is None:
        return None
    rgb = np.einsum("chw,cr->hwr", latent[0], PREVIEW_COEFFICIENTS)
    pixels = (np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
