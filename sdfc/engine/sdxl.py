"""SDXL's prompt conditioning and its refiner hand-off, as A1111 (1.6+) does them.

Prompts. A1111's SDXL conditioner runs each text encoder on its own over the same text: CLIP ViT-L
(FrozenCLIPEmbedderForSDXLWithCustomWords, padding chunks with its end token) and OpenCLIP bigG
(FrozenOpenCLIPEmbedder2WithCustomWords, padding with 0 after the first end token). Both chunk the prompt the
same way (same vocabulary, comma back-off, BREAK) and apply emphasis to their own output; each takes the
hidden state of its penultimate layer (SDXL's fixed layer: CLIP skip does not apply). The hidden states are
concatenated on the channel axis (768 + 1280 = 2048 for the real model) and the chunks on the token axis; the
UNet's `text_embeds` are the second encoder's projected pooled output of the *first* chunk. An all-empty
negative prompt gives zeros for both (A1111's force_zero_negative_prompt; diffusers' force_zeros_for_empty_prompt
with no negative prompt); the size conditioning stays.

`time_ids`: the base takes (original height, original width, crop top, crop left, target height, target
width), A1111 sets original = target = the image size and crop from the options sdxl_crop_top/left; the
refiner takes (original height, original width, crop top, crop left, aesthetic score), the score being
sdxl_refiner_high_aesthetic_score for prompts and sdxl_refiner_low_aesthetic_score for negative prompts.

Refiner (A1111's sd_samplers_common.apply_refiner, refiner_switch_by_sample_steps off): before each denoiser
call, the completed ratio is (999 − t) / 1000 where t is the index of the model's discrete sigma nearest to the
call's sigma (DDIM family: the timestep itself); once it is not below refiner_switch_at (or at once when that
is null), the rest of sampling runs on the refiner's UNet with the refiner's own conditioning, on the same
sigmas and noise, and the refiner's VAE decodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conditioning import BatchConditioning, PromptEncoder, ScheduledCond, batch_conditioning
from .errors import InvalidRequestError, ModelLoadError
from .prompt_chunks import SD1_EOS, PromptChunker, apply_emphasis, chunk_batches, make_clip_encode_fn
from .prompt_parser import get_learned_conditioning_prompt_schedules, schedule_index_at_call

POOLED_OUTPUT = "text_embeds"  # CLIPTextModelWithProjection's projected pooled output, as optimum names it


@dataclass(frozen=True)
class SizeConditioning:
    """A1111's SDXL options (names and defaults as in its settings)."""

    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_refiner_low_aesthetic_score: float = 2.5
    sdxl_refiner_high_aesthetic_score: float = 6.0

    def time_ids(self, refiner: bool, width: int, height: int, negative: bool) -> np.ndarray:
        crop = [self.sdxl_crop_top, self.sdxl_crop_left]
        if refiner:
            score = self.sdxl_refiner_low_aesthetic_score if negative else self.sdxl_refiner_high_aesthetic_score
            return np.array([height, width, *crop, score], dtype=np.float32)
        return np.array([height, width, *crop, height, width], dtype=np.float32)


def is_sdxl(info) -> bool:
    """SDXL base or refiner: the architectures whose UNet takes size conditioning (architectures.py)."""
    return "time_ids" in info.arch.extra_unet_inputs


def penultimate_output(session) -> str:
    """The `hidden_states.N` output holding the penultimate layer's output (N = layers − 1)."""
    layers = [int(o.name.split(".")[1]) for o in session.get_outputs() if o.name.startswith("hidden_states.")]
    if len(layers) < 2:
        raise ModelLoadError("this SDXL text encoder export has no hidden_states outputs: export it again "
                             "with `sdfc export`")
    return f"hidden_states.{max(layers) - 1}"


@dataclass(frozen=True)
class SDXLScheduledCond(ScheduledCond):
    """A text schedule with, per text, the pooled embedding, and the size ids of every text."""

    pooled: tuple[np.ndarray, ...] = ()  # each (pooled width,)
    time_ids: np.ndarray | None = None

    def unet_inputs_at(self, call: int) -> dict:
        index = schedule_index_at_call([[end, None] for end in self.end_at_steps], call)
        return {"text_embeds": self.pooled[index], "time_ids": self.time_ids}


class SDXLPromptEncoder(PromptEncoder):
    """Text → (hidden states of every encoder concatenated, pooled output) with A1111's SDXL handling."""

    def __init__(self, model, width: int, height: int, size: SizeConditioning | None = None,
                 emphasis: str = "Original", comma_padding_backtrack: int = 20):
        self.model = model
        self.emphasis = emphasis
        self.width, self.height = width, height
        self.size = size or SizeConditioning()
        self.refiner = model.info.arch.refiner
        encode = make_clip_encode_fn(model.tokenizer)
        # No textual-inversion vocabulary: SDXL embeddings carry a vector set per encoder (refused in the pipeline).
        self.encoders = [(spec, PromptChunker(encode, pad=SD1_EOS if spec.pad_with_end_token else 0,
                                              comma_padding_backtrack=comma_padding_backtrack))
                         for spec in model.info.arch.text_encoders]
        self.chunker = self.encoders[0][1]  # the pipeline reads `chunker.used_embeddings` (none here)
        self._cache: dict[tuple, SDXLScheduledCond] = {}

    def encode(self, texts: list[str], negative: bool) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states (B, 77·chunks, Σ widths), pooled (B, pooled width)) of one batch of texts."""
        hidden_parts, pooled = [], None
        for spec, chunker in self.encoders:
            chunk_lists = [chunker.chunks(text, self.emphasis) for text in texts]
            encoded = []
            for index, (tokens, multipliers) in enumerate(chunk_batches(chunk_lists, chunker)):
                hidden, chunk_pooled = self.model.encode_sdxl_tokens(spec.component, tokens, spec.pooled)
                encoded.append(apply_emphasis(hidden, multipliers, self.emphasis))
                if spec.pooled and index == 0:
                    pooled = chunk_pooled  # A1111: the first chunk's pooled output
            hidden_parts.append(np.concatenate(encoded, axis=1))
        hidden = np.concatenate(hidden_parts, axis=2)
        if negative and all(t == "" for t in texts):  # A1111's force_zero_negative_prompt
            return np.zeros_like(hidden), np.zeros_like(pooled)
        return hidden, pooled

    def scheduled(self, prompt: str, steps: int, hires_steps: int | None = None,
                  negative: bool = False) -> SDXLScheduledCond:
        key = (prompt, steps, hires_steps, negative)
        if key not in self._cache:
            schedule = get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]
            hidden, pooled = self.encode([text for _, text in schedule], negative)
            time_ids = self.size.time_ids(self.refiner, self.width, self.height, negative)
            self._cache[key] = SDXLScheduledCond(tuple(end for end, _ in schedule), tuple(hidden), tuple(pooled),
                                                 time_ids)
        return self._cache[key]

    def batch(self, prompts: list[str], negative_prompts: list[str], steps: int,
              hires_steps: int | None = None) -> BatchConditioning:
        return batch_conditioning(lambda text, negative: self.scheduled(text, steps, hires_steps, negative),
                                  prompts, negative_prompts)


def check_no_embeddings(prompts: list[str], folder, tokenizer) -> None:
    """Refuse a prompt naming a textual-inversion embedding of `folder`: SDXL embeddings (one vector set per
    text encoder) are not supported yet, and reading the name as plain words would silently differ from A1111."""
    from .embeddings import folder_signature

    names = sorted({Path(entry[0]).stem for entry in folder_signature(folder)})
    if not names:
        return
    encode = make_clip_encode_fn(tokenizer)
    name_tokens = dict(zip(names, encode(names)))
    for prompt in prompts:
        tokens = encode([prompt])[0]
        for name, ids in name_tokens.items():
            if ids and any(tokens[i:i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1)):
                raise InvalidRequestError(f"the prompt names the embedding {name!r}: textual-inversion embeddings "
                                          "are not supported on SDXL models yet")


NO_REFINER = (None, "", "None", "none")  # what A1111 reads as "no refiner"


def wants_refiner(req) -> bool:
    return req.refiner_checkpoint not in NO_REFINER


def embeddings_folder(info, folder):
    """The embeddings folder a model's prompts read: none for SDXL (see check_no_embeddings)."""
    return None if is_sdxl(info) else folder


def prompt_encoder(model, req) -> SDXLPromptEncoder | None:
    """The SDXL prompt encoder for this job, or None for a single-encoder model."""
    if not is_sdxl(model.info):
        return None
    return SDXLPromptEncoder(model, req.width, req.height, req.sdxl, emphasis=req.emphasis,
                             comma_padding_backtrack=req.comma_padding_backtrack)


def check_request(req, info, embeddings_dir, tokenizer) -> None:
    """What an SDXL job (or a job with a refiner) cannot honour yet: refused, never run differently from A1111."""
    from .lora import parse_networks

    if is_sdxl(info):
        # CLIP skip: A1111 encodes SDXL prompts at fixed layers and ignores the option (without sdxl_clip_l_skip).
        if parse_networks(req.prompt):
            raise InvalidRequestError(f"LoRAs are not supported on SDXL models yet (model {info.name!r})")
        check_no_embeddings([req.prompt, req.negative_prompt], embeddings_dir, tokenizer)
    if wants_refiner(req):
        if req.hires is not None:
            raise InvalidRequestError("a refiner together with the hires fix is not supported yet: leave out "
                                      "refiner_checkpoint or enable_hr")
        if parse_networks(req.prompt):
            raise InvalidRequestError("LoRAs together with a refiner are not supported yet")
        at = req.refiner_switch_at
        if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at <= 1):
            raise InvalidRequestError(f"refiner_switch_at must be a number from 0 to 1, got {at!r}")


def refiner_infotext(refiner_info, switch_at) -> dict:
    """A1111's entries once the refiner took over: `Refiner: <name [short hash]>, Refiner switch at: <x>`."""
    return {"Refiner": refiner_info.title, "Refiner switch at": switch_at}


@dataclass
class RefinerSwitch:
    """The hand-off to the refiner during sampling (A1111's apply_refiner), one per batch; `done` once it
    happened (then the refiner's VAE decodes, as A1111's current model)."""

    model: object                  # the refiner's OnnxModel
    switch_at: float | None
    conditioning: BatchConditioning | None = None  # the refiner's own, built with the batch's prompts
    done: bool = False

    def completed_ratio(self, denoiser, sigma: float | None = None, timestep: float | None = None) -> float:
        if sigma is not None:
            index = int(np.argmin(np.abs(denoiser.model.sigmas.sigmas - np.float32(sigma))))
        else:
            index = int(timestep)
        return (999 - index) / 1000

    def check(self, denoiser, sigma: float | None = None, timestep: float | None = None) -> None:
        """Switch `denoiser` to the refiner when sampling has got far enough."""
        if self.done:
            return
        if self.switch_at is not None and self.completed_ratio(denoiser, sigma, timestep) < self.switch_at:
            return
        denoiser.model, denoiser.conditioning = self.model, self.conditioning
        self.done = True
