"""The file a trained LoRA is written as: kohya's layout, which A1111, ComfyUI, diffusers and sdfc all read.

Keys: `lora_unet_<module path with _>.lora_down.weight` (PEFT's lora_A), `.lora_up.weight` (lora_B) and
`.alpha` (a scalar: the weight's scale is alpha / rank, as PEFT's lora_alpha / r); `lora_te_…` for the text
encoder. Metadata: the `ss_*` strings kohya's sd-scripts write, which UIs show and A1111 reads
(`ss_output_name` is the LoRA's alias, `ss_tag_frequency` feeds its tag list).
"""
from __future__ import annotations

import json

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
ROLE = {"lora_A": "lora_down", "lora_B": "lora_up"}


def kohya_key(component: str, peft_key: str) -> str:
    """`down_blocks.0….to_q.lora_A.weight` (PEFT, on one component) →
    `lora_unet_down_blocks_0_…_to_q.lora_down.weight`."""
    module, role, _ = peft_key.rsplit(".", 2)
    if role not in ROLE or _ != "weight":
        raise ValueError(f"not a PEFT LoRA weight: {peft_key}")
    return f"{PREFIX[component]}{module.replace('.', '_')}.{ROLE[role]}.weight"


def kohya_tensors(peft_weights: dict[str, dict], alpha: float) -> dict:
    """{component: PEFT state dict} → kohya tensors, with each module's alpha (torch tensors, contiguous)."""
    import torch

    out = {}
    for component, weights in peft_weights.items():
        for key, tensor in weights.items():
            name = kohya_key(component, key)
            out[name] = tensor.detach().to(torch.float32).contiguous()
            out[name.rsplit(".", 2)[0] + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def metadata(*, output_name: str, rank: int, alpha: float, learning_rate: float, text_encoder_lr: float | None,
             max_train_steps: int, steps_done: int, resolution: int, batch_size: int, seed: int,
             num_images: int, bucket_counts: dict, tag_frequency: dict, dataset_name: str, base_model: str,
             started_at: float, finished_at: float, use_buckets: bool, noise_offset: float) -> dict[str, str]:
    """kohya's training metadata (every value a string, as safetensors metadata must be)."""
    te = text_encoder_lr is not None
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps({}),
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": learning_rate,
        "ss_text_encoder_lr": text_encoder_lr if te else 0.0,
        "ss_network_train_unet_only": not te,
        "ss_network_train_text_encoder_only": False,
        "ss_max_train_steps": max_train_steps,
        "ss_steps": steps_done,
        "ss_epoch": -(-steps_done * batch_size // max(1, num_images)),
        "ss_num_train_images": num_images,
        "ss_num_reg_images": 0,
        "ss_batch_size_per_device": batch_size,
        "ss_gradient_accumulation_steps": 1,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": use_buckets,
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n}
                                                  for i, (b, n) in enumerate(sorted(bucket_counts.items()))}}),
        "ss_tag_frequency": json.dumps({dataset_name: tag_frequency}),
        "ss_dataset_dirs": json.dumps({dataset_name: {"n_repeats": 1, "img_count": num_images}}),
        "ss_output_name": output_name,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": base_model,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        "ss_seed": seed,
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_lr_scheduler": "constant",
        "ss_lr_warmup_steps": 0,
        "ss_noise_offset": noise_offset,
        "ss_mixed_precision": "no",
        "ss_full_fp16": False,
        "ss_clip_skip": "None",
        "ss_cache_latents": True,
        "ss_training_comment": "sdfc train lora",
    }
    return {key: str(value) for key, value in values.items()}
