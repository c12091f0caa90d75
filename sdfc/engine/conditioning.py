"""Prompts to text-encoder hidden states (the cond and uncond tensors the UNet attends to)."""
from __future__ import annotations

import numpy as np

BOS, EOS = 49406, 49407
CONTEXT_LENGTH = 77


def token_ids(tokenizer, text: str) -> np.ndarray:
    """77 ids: BOS, up to 75 prompt tokens, EOS, EOS padding (CLIP's fixed context)."""
    ids = [i for i in tokenizer.encode(text).ids if i not in (BOS, EOS)][: CONTEXT_LENGTH - 2]
    ids = [BOS] + ids + [EOS] * (CONTEXT_LENGTH - 1 - len(ids))
    return np.asarray(ids, dtype=np.int64)


def encode_prompts(model, prompts: list[str]) -> np.ndarray:
    """(len(prompts), 77, hidden) hidden states, identical prompts encoded once."""
    unique = list(dict.fromkeys(prompts))
    hidden = model.encode_tokens(np.stack([token_ids(model.tokenizer, p) for p in unique]))
    index = {p: i for i, p in enumerate(unique)}
    return hidden[[index[p] for p in prompts]]
