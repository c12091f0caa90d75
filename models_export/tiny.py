"""Build a random-weight Stable Diffusion 1.x model in diffusers layout, deterministically.

No weights can be downloaded here, so tests and the default local server run on a model we make
ourselves: the real SD 1.x architecture shrunk (8x8 latents for 64x64 images, VAE factor 8 as in real
SD), random weights from a fixed seed, and the real CLIP BPE vocabulary so that token ids equal real
CLIP's. `--size mid` builds a larger UNet (> 50 M parameters) for benchmarks; it is never committed.
`architecture` picks the family (TINY_ARCHITECTURES): SD 1.x (default), its inpainting UNet, SD 2.x with
epsilon or v-prediction (SD2_FAMILY: OpenCLIP-like gelu text encoder, pad token 0, linear attention
projections), and the SDXL ones registered in BUILDERS.

The vocabulary comes from the open-clip-torch wheel (fetched with pip from the package registry), or,
with `tokenizer_from`, from an existing tokenizer folder such as an exported model's `tokenizer/` (only
`tokenizer.json` is needed): no download then. Both give the same files, so the model is the same.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# SD 1.5's real scheduler configuration; the engine reads betas and spacing from it.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "trained_betas": None,
}

SIZES = {
    # about 0.8 M UNet parameters: fast enough for every test on 2 cores.
    "tiny": dict(unet_channels=(32, 64), layers=1, heads=(2, 4), cross_dim=32, sample_size=8,
                 text_hidden=32, text_layers=2, text_heads=4, vae_channels=(32, 64, 64, 64)),
    # above 50 M UNet parameters: a benchmark model with SD's block structure.
    "mid": dict(unet_channels=(128, 256, 384), layers=2, heads=(4, 8, 8), cross_dim=512, sample_size=32,
                text_hidden=512, text_layers=4, text_heads=8, vae_channels=(64, 128, 128, 128)),
}

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_merges(cache_dir: Path | None = None) -> list[str]:
    """The real CLIP BPE merge list, read from the open-clip-torch wheel (a registry package)."""
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(cache_dir or tmp)
        wheels = sorted(where.glob("open_clip_torch-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(where),
                            "open-clip-torch==3.3.0"], check=True)
            wheels = sorted(where.glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as wheel:
            text = gzip.decompress(wheel.read(BPE_MEMBER)).decode("utf-8")
    lines = text.split("\n")
    # CLIP's own tokenizer keeps exactly these merges: 49408 tokens in all.
    return lines[1: 49152 - 256 - 2 + 1]


def clip_vocab(merges: list[str]) -> dict[str, int]:
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-character table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def vocab_and_merges_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[str]]:
    """The BPE vocabulary and merge lines stored in a fast tokenizer's tokenizer.json."""
    model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path} does not hold a BPE tokenizer")
    # tokenizers writes merges as "a b" strings in old files and as ["a", "b"] pairs in new ones.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(out: Path, cache_dir: Path | None = None, tokenizer_from: Path | None = None) -> None:
    """Write a CLIP tokenizer to `out`, from the open-clip wheel or from `tokenizer_from`/tokenizer.json."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    if tokenizer_from is not None:
        vocab, merges = vocab_and_merges_from_tokenizer_json(Path(tokenizer_from) / "tokenizer.json")
    else:
        merges = clip_bpe_merges(cache_dir)
        vocab = clip_vocab(merges)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        slow = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             pad_token="<|endoftext|>")
        fast = CLIPTokenizerFast.from_pretrained(tmp, from_slow=True, pad_token="<|endoftext|>")
        slow.model_max_length = fast.model_max_length = 77
        fast.save_pretrained(str(out))


# UNet input channels per architecture: "inpaint" is SD's inpainting UNet (latent + mask + masked-image
# latent), the layout A1111 feeds to models whose conditioning key is "hybrid".
ARCHITECTURES = {"sd1": 4, "inpaint": 9, "sd2": 4, "sd2-v": 4}
# SD 2.x's traits (OpenCLIP family): linear attention projections in the UNet, a gelu text encoder whose last
# layer is the one the UNet reads (diffusers' SD 2.x encoders end at OpenCLIP's penultimate layer), a tokenizer
# padding with token 0 ("!"), and the prediction type in the scheduler config.
SD2_FAMILY = ("sd2", "sd2-v")
# Stable Diffusion 2's (768-v) scheduler configuration; "sd2" (epsilon) uses SD 2-base's, equal to SD15_SCHEDULER.
SD2_V_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}
# Every `sdfc export tiny --architecture`; BUILDERS (end of file) maps each to the function that writes it.
TINY_ARCHITECTURES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "inpaint")


def unet_config(size: str, architecture: str = "sd1") -> dict:
    """UNet2DConditionModel keyword arguments for a model size."""
    cfg = _size(size)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    n_blocks = len(cfg["unet_channels"])
    # SD 2.x: linear proj_in/proj_out; SD 2.1-v also upcasts attention (a no-op in fp32).
    family = dict(use_linear_projection=True, **({"upcast_attention": True} if architecture == "sd2-v" else {})) \
        if architecture in SD2_FAMILY else {}
    return dict(
        **family,
        sample_size=cfg["sample_size"],
        in_channels=ARCHITECTURES[architecture], out_channels=4,
        block_out_channels=cfg["unet_channels"],
        layers_per_block=cfg["layers"],
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=cfg["cross_dim"],
        attention_head_dim=cfg["heads"],
        norm_num_groups=32,
    )


def vae_config(size: str) -> dict:
    cfg = _size(size)
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=cfg["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae_channels"]),
        layers_per_block=1, norm_num_groups=32, sample_size=cfg["sample_size"] * 8,
        scaling_factor=0.18215,
    )


def text_config(size: str, architecture: str = "sd1") -> dict:
    cfg = _size(size)
    if cfg["text_hidden"] != cfg["cross_dim"]:
        raise ValueError("text hidden size must equal the UNet's cross-attention size")
    open_clip = architecture in SD2_FAMILY  # OpenCLIP: gelu, pad token 0
    return dict(
        hidden_size=cfg["text_hidden"], intermediate_size=cfg["text_hidden"] * 4,
        num_hidden_layers=cfg["text_layers"], num_attention_heads=cfg["text_heads"],
        vocab_size=49408, max_position_embeddings=77, projection_dim=cfg["cross_dim"],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if open_clip else 49407,
        hidden_act="gelu" if open_clip else "quick_gelu",
    )


def _size(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


def build(out: Path, size: str = "tiny", seed: int = 0, cache_dir: Path | None = None,
          tokenizer_from: Path | None = None, architecture: str = "sd1") -> Path:
    """Write the random-weight diffusers model of `architecture` (one of TINY_ARCHITECTURES) to `out`."""
    from models_export.onnx_export import ExportError

    if architecture not in TINY_ARCHITECTURES:
        raise ExportError(f"unknown architecture {architecture!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    if architecture not in BUILDERS:
        raise ExportError(f"no tiny-model builder for architecture {architecture!r} in this version")
    return BUILDERS[architecture](out, size=size, seed=seed, cache_dir=cache_dir, tokenizer_from=tokenizer_from,
                                  architecture=architecture)


def build_sd(out: Path, size: str = "tiny", seed: int = 0, cache_dir: Path | None = None,
             tokenizer_from: Path | None = None, architecture: str = "sd1") -> Path:
    """SD 1.x, its inpainting variant, SD 2.x (ε) and SD 2.x v-prediction: one UNet, one text encoder."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_kwargs, vae_kwargs = unet_config(size, architecture), vae_config(size)
    text_kwargs = text_config(size, architecture)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The weights depend on this seed and on the order the three models are created in: keep both.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(**vae_kwargs)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    tok_dir = out / "tokenizer"
    build_tokenizer(tok_dir, cache_dir, tokenizer_from)
    # OpenCLIP pads with token 0 ("!"), as SD 2.x's diffusers tokenizer does.
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), **({"pad_token": "!"} if architecture in SD2_FAMILY
                                                               else {}))
    scheduler = DDIMScheduler.from_config(SD2_V_SCHEDULER) if architecture == "sd2-v" \
        else PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def unet_parameter_count(size: str) -> int:
    """Parameters of a size's UNet, counted on the meta device: no memory, no weights initialised."""
    import torch
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(size))
    return sum(p.numel() for p in unet.parameters())


def count_unet_parameters(model_dir: Path) -> int:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
    return sum(p.numel() for p in unet.parameters())


# --architecture → the function writing that diffusers model (same keywords as `build`); the SDXL builders
# register here as "sdxl" and "sdxl-refiner".
BUILDERS = {name: build_sd for name in ("sd1", "inpaint", *SD2_FAMILY)}
# SDXL base and refiner: two text encoders, size conditioning (tiny_sdxl.py).
from models_export.tiny_sdxl import build_tiny_sdxl  # noqa: E402

BUILDERS.update({"sdxl": build_tiny_sdxl, "sdxl-refiner": build_tiny_sdxl})
