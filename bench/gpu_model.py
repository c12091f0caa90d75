"""The GPU proof's model: SD 1.5's architecture at full size with random weights, or the tiny one for --dry-run.

"sd15" is Stable Diffusion 1.5's published configuration (the UNet of v1-inference.yaml: 320/640/1280/1280
channels, 2 layers per block, 8 heads, 768-wide cross-attention, about 860 M parameters; CLIP ViT-L/14's text
tower, 12 layers 768 wide; the KL-f8 VAE, 128/256/512/512 channels, 2 layers per block). "tiny" is
models_export/tiny.py's tiny size, so the dry run exercises the same architecture family the tests use.

The weights are drawn on the target device, in the target dtype, from one seed: the same seed on the same
device and library versions gives the same model. Needs torch, diffusers and transformers (build-time tools).
"""
from __future__ import annotations

from pathlib import Path

SIZES = ("sd15", "tiny")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
    max_position_embeddings=77, projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_act="quick_gelu",
)


def configs(size: str) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) keyword arguments for `size`."""
    if size == "sd15":
        return SD15_UNET, SD15_VAE, SD15_TEXT
    if size == "tiny":
        from models_export import tiny
        return tiny.unet_config("tiny"), tiny.vae_config("tiny"), tiny.text_config("tiny")
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")


def build(out: Path, size: str, seed: int, device: str, dtype: str, tokenizer_from: Path) -> dict:
    """Write the random-weight diffusers pipeline of `size` to `out`; returns what was built."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from models_export import tiny

    unet_kw, vae_kw, text_kw = configs(size)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # seeds the CUDA generators too; the creation order below is part of the model
    previous = torch.get_default_dtype()
    try:
        # Drawn where they will live, in their final dtype: no fp32 copy of 860 M parameters on the host.
        torch.set_default_dtype(torch_dtype)
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_kw)
            vae = AutoencoderKL(**vae_kw)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_kw))
    finally:
        torch.set_default_dtype(previous)
    tiny.build_tokenizer(out / "tokenizer", tokenizer_from=tokenizer_from)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(
        str(out / "tokenizer")), unet=unet, scheduler=PNDMScheduler.from_config(tiny.SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"size": size, "seed": seed, "device": device, "dtype": dtype, "unet_parameters": count(unet),
            "text_encoder_parameters": count(text_encoder), "vae_parameters": count(vae)}


def unet_flops(size: str, batch: int, latent_side: int, text_tokens: int = 77) -> dict:
    """Floating-point operations of one UNet call, counted on the meta device (shapes only, no memory).

    Multiply-adds count 2: every convolution, linear layer and the two attention products (Q·Kᵀ and the
    weighted sum of V) of each attention layer, which hold all but a fraction of a percent of the work.
    Counted from the modules' shapes rather than by torch's FLOP counter, which misses attention on backends it
    has no formula for.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet_kw, _, text_kw = configs(size)
    totals = {"conv": 0, "linear": 0, "attention": 0}

    def conv(module, inputs, output):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        totals["conv"] += 2 * output.numel() * per_output

    def linear(module, inputs, output):
        totals["linear"] += 2 * output.numel() * module.in_features

    def attention(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        queries = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        keys = context.shape[1] if context is not None else queries
        totals["attention"] += 2 * 2 * hidden.shape[0] * queries * keys * module.inner_dim

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kw)
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
        elif isinstance(module, Attention):
            module.register_forward_hook(attention, with_kwargs=True)
    sample = torch.empty(batch, unet_kw["in_channels"], latent_side, latent_side, device="meta")
    context = torch.empty(batch, text_tokens, text_kw["hidden_size"], device="meta")
    with torch.no_grad():
        unet(sample, torch.tensor(500.0, device="meta"), context)
    return {"batch": batch, "latent": [latent_side, latent_side], **{f"{k}_flops": v for k, v in totals.items()},
            "total_flops": sum(totals.values()), "parameters": sum(p.numel() for p in unet.parameters())}
