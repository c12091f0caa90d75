"""What differs between model families, in one table; samplers, noise and prompt syntax are shared.

An exported model declares its architecture in its manifest (`sdfc.json`, written by `sdfc export`, which
detects it from the source). The engine looks the name up here and refuses anything else with a message that
names what it found, instead of running an unknown family as SD 1.x.

Each text encoder is described by what its prompt encoding needs: the ONNX component folder, how a chunk is
padded (CLIP ViT-L pads with its end token, OpenCLIP with token 0), and which output holds the hidden states
the UNet reads. SDXL concatenates the hidden states of its encoders and takes the pooled output of the last.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Flags for distilled few-step models (manifest "distilled"): they sample with CFG 1 and few steps.
DISTILLED = ("lcm", "turbo")


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str            # ONNX folder: text_encoder, text_encoder_2
    pad_with_end_token: bool  # True: CLIP ViT-L (pads with <|endoftext|>); False: OpenCLIP (pads with 0)
    pooled: bool = False      # its pooled (projected) output conditions the UNet (SDXL: the last encoder)


@dataclass(frozen=True)
class Architecture:
    name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    default_size: int                    # the training resolution: the web UI's and warm-up's default
    extra_unet_inputs: tuple[str, ...] = ()  # SDXL: text_embeds (pooled) and time_ids (size conditioning)
    has_vae_encoder: bool = True
    # Latent → RGB for the live preview (A1111's "Approx cheap"): rows are latent channels, columns R, G, B.
    latent_rgb_factors: tuple[tuple[float, float, float], ...] = (
        (0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
    refiner: bool = False                # an SDXL refiner: conditioned on aesthetic score instead of target size
    # A1111's CLIP skip (CLIP_stop_at_last_layers) exists only for CLIP ViT-L; for SD 2.x's OpenCLIP it uses the
    # encoder's fixed layer (penultimate + final norm, which is a diffusers SD 2.x encoder's last_hidden_state).
    clip_skip: bool = True

    @property
    def components(self) -> tuple[str, ...]:
        """The ONNX folders an export of this architecture must hold."""
        return (*(e.component for e in self.text_encoders), "unet", "vae_decoder",
                *(("vae_encoder",) if self.has_vae_encoder else ()))


CLIP_L = TextEncoderSpec("text_encoder", pad_with_end_token=True)
OPEN_CLIP_H = TextEncoderSpec("text_encoder", pad_with_end_token=False)

# SDXL's VAE has its own latent space (published linear fit of its latents to RGB).
_SDXL_FACTORS = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
                 (-0.3112, -0.2359, -0.2076))

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("sd1", (CLIP_L,), 512),
    Architecture("sd2", (OPEN_CLIP_H,), 768, clip_skip=False),
    Architecture("sdxl", (CLIP_L, TextEncoderSpec("text_encoder_2", False, pooled=True)), 1024,
                 extra_unet_inputs=("text_embeds", "time_ids"), latent_rgb_factors=_SDXL_FACTORS, clip_skip=False),
    Architecture("sdxl-refiner", (TextEncoderSpec("text_encoder_2", False, pooled=True),), 1024,
                 extra_unet_inputs=("text_embeds", "time_ids"), latent_rgb_factors=_SDXL_FACTORS,
                 refiner=True, clip_skip=False),
)}


def find_architecture(name: str, where: str = "") -> Architecture:
    """The architecture called `name`, or a ModelLoadError naming what was found and what is supported."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        at = f" in {where}" if where else ""
        raise ModelLoadError(f"unsupported model architecture {name!r}{at}; this engine runs "
                             f"{', '.join(ARCHITECTURES)}") from None


def check_prediction_type(prediction_type: str, where: str = "") -> str:
    """`prediction_type` if the engine samples it (ε or v), else a ModelLoadError naming what was found."""
    if prediction_type not in PREDICTION_TYPES:
        at = f" in {where}" if where else ""
        raise ModelLoadError(f"unsupported prediction type {prediction_type!r}{at}; this engine runs "
                             f"{', '.join(PREDICTION_TYPES)}")
    return prediction_type


def check_distilled(distilled, where: str = "") -> str | None:
    """None (a normal model) or one of DISTILLED, else a ModelLoadError naming what was found."""
    if distilled is not None and distilled not in DISTILLED:
        at = f" in {where}" if where else ""
        raise ModelLoadError(f"unknown distilled flag {distilled!r}{at}; expected none or one of "
                             f"{', '.join(DISTILLED)}")
    return distilled
