"""Prompts to the conditioning the CFG denoiser uses at each call, in A1111's prompt language.

A prompt becomes, per AND sub-prompt, a schedule of texts (prompt editing and alternation switch the
text at given denoiser calls); every distinct text of one schedule is encoded in one batch, because
A1111's emphasis normalisation takes its mean over that batch (generation-semantics.md §1.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .lora import strip_extra_networks
from .prompt_chunks import SD1_EOS, PromptChunker, encode_texts, make_clip_encode_fn, pad_to_same_length
from .prompt_parser import (get_learned_conditioning_prompt_schedules, get_multicond_prompt_list,
                            schedule_index_at_call)


@dataclass(frozen=True)
class ScheduledCond:
    """One text schedule: the tensor for text k is used up to denoiser call `end_at_steps[k]`."""

    end_at_steps: tuple[int, ...]
    tensors: tuple[np.ndarray, ...]  # each (tokens, hidden)

    def index_at(self, call: int) -> int:
        """Which text of the schedule denoiser call `call` uses."""
        return schedule_index_at_call([[end, None] for end in self.end_at_steps], call)

    def at(self, call: int) -> np.ndarray:
        return self.tensors[self.index_at(call)]

    def unet_inputs_at(self, call: int) -> dict:
        """UNet inputs besides the hidden states for this text (SDXL's pooled text and size ids; none here)."""
        return {}


@dataclass(frozen=True)
class BatchConditioning:
    """Per image: its AND sub-prompts with weights, and its negative prompt's schedule."""

    cond: tuple[tuple[tuple[ScheduledCond, float], ...], ...]
    uncond: tuple[ScheduledCond, ...]
    # The batches of each schedule segment, stacked once: the same arrays (same objects) for every call of a
    # segment, so that the UNet's conditioning can be kept on the device while they last (denoiser.CFGDenoiser).
    _segments: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def segment(self, call: int) -> tuple:
        """Which text every row uses at denoiser call `call`: the calls of one segment share their tensors."""
        return tuple(s.index_at(call) for subprompts in self.cond for s, _ in subprompts) + \
            tuple(u.index_at(call) for u in self.uncond)

    def at(self, call: int) -> tuple[np.ndarray, list[list[tuple[int, float]]], np.ndarray]:
        """(cond batch, [(row, weight)...] per image, uncond batch) for denoiser call `call`; the same objects
        for every call of one segment (read them, never write them)."""
        key = ("at", self.segment(call))
        if key not in self._segments:
            self._segments[key] = self._stack(call)
        return self._segments[key]

    def _stack(self, call: int):
        rows, weights = [], []
        for subprompts in self.cond:
            mine = []
            for scheduled, weight in subprompts:
                mine.append((len(rows), weight))
                rows.append(scheduled.at(call))
            weights.append(mine)
        cond = np.stack(pad_to_same_length(rows))
        uncond = np.stack(pad_to_same_length([u.at(call) for u in self.uncond]))
        return cond, weights, uncond

    def unet_inputs(self, call: int) -> tuple[dict, dict]:
        """The extra UNet inputs ({name: rows}) of the cond rows and of the uncond rows, in `at`'s row order;
        like `at`, the same objects for every call of one segment."""
        key = ("unet_inputs", self.segment(call))
        if key not in self._segments:
            self._segments[key] = self._stack_unet_inputs(call)
        return self._segments[key]

    def _stack_unet_inputs(self, call: int) -> tuple[dict, dict]:
        def stacked(per_row: list[dict]) -> dict:
            return {name: np.stack([row[name] for row in per_row]) for name in (per_row[0] if per_row else {})}
        cond = [scheduled.unet_inputs_at(call) for subprompts in self.cond for scheduled, _ in subprompts]
        return stacked(cond), stacked([u.unet_inputs_at(call) for u in self.uncond])


class PromptEncoder:
    """Text → hidden states with A1111's chunking, emphasis and clip skip, cached per prompt."""

    def __init__(self, model, emphasis: str = "Original", clip_skip: int = 1, comma_padding_backtrack: int = 20):
        self.model = model
        self.emphasis = emphasis
        self.clip_skip = clip_skip
        # CLIP ViT-L pads a chunk with its end token, OpenCLIP (SD 2.x) with 0 (A1111's id_pad).
        pad = SD1_EOS if model.info.arch.text_encoders[0].pad_with_end_token else 0
        self.chunker = PromptChunker(make_clip_encode_fn(model.tokenizer), pad=pad,
                                     comma_padding_backtrack=comma_padding_backtrack,
                                     embeddings=getattr(model, "embeddings", None))
        self._cache: dict[tuple[str, int], ScheduledCond] = {}

    def _encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.model.encode_tokens(tokens, clip_skip=self.clip_skip)

    def scheduled(self, prompt: str, steps: int, hires_steps: int | None = None) -> ScheduledCond:
        key = (prompt, steps, hires_steps)
        if key not in self._cache:
            schedule = get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]
            texts = [text for _, text in schedule]
            tensors = encode_texts(texts, self.chunker, self._encode_tokens, self.emphasis)
            self._cache[key] = ScheduledCond(tuple(end for end, _ in schedule), tuple(tensors))
        return self._cache[key]

    def batch(self, prompts: list[str], negative_prompts: list[str], steps: int,
              hires_steps: int | None = None) -> BatchConditioning:
        """`hires_steps`: a hires second pass's steps (then `steps` are the first pass's, §1.2)."""
        return batch_conditioning(lambda text, negative: self.scheduled(text, steps, hires_steps),
                                  prompts, negative_prompts)


def batch_conditioning(scheduled, prompts: list[str], negative_prompts: list[str]) -> BatchConditioning:
    """Per image its AND sub-prompts with their weights and its negative prompt, each through `scheduled(text,
    negative)` (an encoder's cached schedule of one text). A1111 removes extra-network tags (<lora:…>) from the
    prompts, not from the negative prompts."""
    indexes, texts, _ = get_multicond_prompt_list([strip_extra_networks(p) for p in prompts])
    cond = tuple(tuple((scheduled(texts[i], False), weight) for i, weight in per_image) for per_image in indexes)
    uncond = tuple(scheduled(p, True) for p in negative_prompts)
    return BatchConditioning(cond, uncond)
