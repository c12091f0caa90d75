"""Names of SD 1.x weights in the original (CompVis LDM) single-file layout, from diffusers names.

A1111-style checkpoints hold one flat state dict with three prefixes:
    model.diffusion_model.   the UNet (LDM `openaimodel.UNetModel`)
    first_stage_model.       the VAE (LDM `AutoencoderKL`: `Encoder`/`Decoder`)
    cond_stage_model.transformer.   the text encoder, already in Hugging Face CLIPTextModel naming

The rules below follow the LDM module structure:
- UNet input blocks: `input_blocks.0` is conv_in; each resolution level then has `layers_per_block` blocks
  (`.0` resnet, `.1` transformer when the level has attention) and, except on the last level, one more
  block holding the downsampler (`.0.op`). Output blocks: `layers_per_block + 1` blocks per level, lowest
  resolution first; the last block of a level also holds the upsampler, at `.1` (no attention) or `.2`.
- `middle_block` is resnet `.0`, transformer `.1`, resnet `.2`.
- VAE decoder `up.{i}` counts from the highest resolution, diffusers' `up_blocks` from the lowest;
  VAE mid-attention q/k/v/proj_out are 1x1 convolutions in LDM and linear layers in diffusers.

Each function raises KeyError for a name it has no rule for, so that an unsupported architecture fails
loudly instead of writing a checkpoint that loads with silently missing weights.
"""
from __future__ import annotations

import re
from typing import Any, Callable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# Present in every SD 1.x checkpoint (a buffer HF CLIP no longer saves); written for fidelity.
TEXT_POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_SAME = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
             "quant_conv", "post_quant_conv")


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module name of `rest` ('norm1.weight' -> 'in_layers.0.weight')."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_name(key: str, config: dict[str, Any]) -> str:
    """LDM name (with prefix) of a diffusers UNet2DConditionModel weight."""
    per_level = config["layers_per_block"] + 1
    up_has_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    module, param = _split_param(key)
    if module in _UNET_FIXED:
        return f"{UNET_PREFIX}{_UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + j
        inner = f"0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
        return f"{UNET_PREFIX}input_blocks.{block}.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        block = 1 + int(m[1]) * per_level + per_level - 1
        return f"{UNET_PREFIX}input_blocks.{block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"{UNET_PREFIX}middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"{UNET_PREFIX}middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per_level + j
        inner = f"0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
        return f"{UNET_PREFIX}output_blocks.{block}.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = int(m[1])
        block = level * per_level + per_level - 1
        slot = 2 if up_has_attention[level] else 1
        return f"{UNET_PREFIX}output_blocks.{block}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_name(key: str, config: dict[str, Any]) -> str:
    """LDM name (with prefix) of a diffusers AutoencoderKL weight."""
    levels = len(config["block_out_channels"])
    module, param = _split_param(key)
    if module in _VAE_SAME:
        return f"{VAE_PREFIX}{key}"
    if module in _VAE_FIXED:
        return f"{VAE_PREFIX}{_VAE_FIXED[module]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        ldm_level = levels - 1 - int(m[1])
        return f"{VAE_PREFIX}decoder.up.{ldm_level}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"{VAE_PREFIX}decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
    raise KeyError(key)


def is_vae_attention_matrix(ldm_key: str) -> bool:
    """True for the VAE mid-attention weights stored as 1x1 convolutions in LDM."""
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def ldm_shape(ldm_key: str, diffusers_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a weight in the LDM layout given its diffusers shape."""
    if is_vae_attention_matrix(ldm_key) and len(diffusers_shape) == 2:
        return (*diffusers_shape, 1, 1)
    return tuple(diffusers_shape)


def text_name(key: str, config: dict[str, Any] | None = None) -> str:
    """LDM name of a transformers CLIPTextModel weight: SD 1.x keeps the Hugging Face names."""
    if not key.startswith("text_model."):
        raise KeyError(key)
    return TEXT_PREFIX + key


NAMERS: dict[str, Callable[[str, dict[str, Any]], str]] = {
    "unet": unet_name, "vae": vae_name, "text_encoder": text_name,
}
