"""Tokens, 77-token chunks, emphasis and concatenation of CLIP conditioning (A1111 v1.10).

Reference: docs/generation-semantics.md §1.4 (chunking, comma back-off, BREAK), §1.5 (emphasis,
concatenation), §1.6 (different lengths). The text encoder itself is not called here: callers hand
in ``encode_tokens(tokens (B, 77) int64) -> z (B, 77, C)``.
"""
from __future__ import annotations

import html
import html.entities
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .prompt_parser import is_break_marker, parse_prompt_attention

EncodeFn = Callable[[list[str]], list[list[int]]]

# §1.5: "None" skips the attention parser, "Ignore" parses but never multiplies.
EMPHASIS_MODES = ("None", "Ignore", "Original", "No norm")
DEFAULT_EMPHASIS = "Original"

SD1_COMMA, SD1_BOS, SD1_EOS = 267, 49406, 49407


def normalize_emphasis_mode(mode: str | None) -> str:
    """A1111 falls back to "Original" for an unknown option value."""
    return mode if mode in EMPHASIS_MODES else DEFAULT_EMPHASIS


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP BPE via `tokenizers`, behaving like transformers' CLIPTokenizer (with ftfy)
# ---------------------------------------------------------------------------------------------

# The ftfy.fix_text steps that change ordinary prompt text; CLIPTokenizer runs fix_text before its
# own whitespace clean-up + lower-casing (which the tokenizer.json normalizer already does).
_SINGLE_QUOTES_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES_RE = re.compile("[\u201c-\u201f]")
_LATIN_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})


def _build_width_map() -> dict[int, str]:
    width_map = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        standard = unicodedata.normalize("NFKC", chr(code))
        if standard != chr(code):
            width_map[code] = standard
    return width_map


_WIDTH_MAP = _build_width_map()
_CONTROL_CHARS_RE = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    if entity[1:] in html.entities.html5:
        return html.entities.html5[entity[1:]]
    if entity.startswith("&#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded  # only whole, well-formed references
    return entity


_LINES_RE = re.compile(r"(?<=\n)")


def _unescape_html_unless_markup(line: str) -> str:
    """ftfy decodes entities line by line, and not in a line that contains "<"."""
    return line if "<" in line else _HTML_ENTITY_RE.sub(_unescape_entity, line)


def clip_text_fixups(text: str) -> str:
    """The subset of ``ftfy.fix_text`` that CLIPTokenizer applies and that matters for prompts.

    HTML entities (only when the text has no "<"), control characters, curly quotes, Latin
    ligatures, full-/half-width forms. Not emulated: ftfy's mojibake repair (``fix_encoding``).
    """
    text = "".join(_unescape_html_unless_markup(line) for line in _LINES_RE.split(text))
    text = _CONTROL_CHARS_RE.sub("", text)
    text = _DOUBLE_QUOTES_RE.sub('"', _SINGLE_QUOTES_RE.sub("'", text))
    return text.translate(_LATIN_LIGATURES).translate(_WIDTH_MAP)


def load_clip_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tokenizer_json))


def make_clip_encode_fn(tokenizer) -> EncodeFn:
    """``encode_fn`` for a ``tokenizers.Tokenizer`` of CLIP: ids without BOS/EOS (§1.4).

    The tokenizer.json normalizer does NFC, whitespace collapsing and lower-casing, its pre-tokenizer
    drops whitespace; ``clip_text_fixups`` adds what ftfy would change before that.
    """
    def encode(texts: list[str]) -> list[list[int]]:
        fixed = [clip_text_fixups(text) for text in texts]
        return [encoding.ids for encoding in tokenizer.encode_batch(fixed, add_special_tokens=False)]
    return encode


# ---------------------------------------------------------------------------------------------
# §1.4 chunking
# ---------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """One encoder input: ``BOS + 75 tokens + EOS`` and one multiplier per position."""
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


class PromptChunker:
    """Turns a prompt line into 77-token chunks with per-token emphasis multipliers (§1.4)."""

    def __init__(self, encode_fn: EncodeFn, comma_token: int = SD1_COMMA, bos: int = SD1_BOS,
                 eos: int = SD1_EOS, pad: int = SD1_EOS, chunk_length: int = 75,
                 comma_padding_backtrack: int = 20, embeddings=None):
        self.encode_fn = encode_fn
        # Textual-inversion embeddings (sdfc/engine/embeddings.py EmbeddingVocabulary), and the names used.
        self.embeddings = embeddings
        self.used_embeddings: list[str] = []
        self.comma_token = comma_token
        self.bos, self.eos, self.pad = bos, eos, pad
        self.chunk_length = chunk_length
        self.comma_padding_backtrack = comma_padding_backtrack

    def parse(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[list]:
        """Fragments with weights; emphasis "None" keeps the line as one literal fragment (§1.5)."""
        if normalize_emphasis_mode(emphasis) == "None":
            return [[text, 1.0]]
        return parse_prompt_attention(text)

    def chunks(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[Chunk]:
        fragments = self.parse(text, emphasis)
        token_lists = self.encode_fn([fragment_text for fragment_text, _ in fragments])
        builder = _ChunkBuilder(self)
        for (fragment_text, weight), tokens in zip(fragments, token_lists):
            if is_break_marker((fragment_text, weight)):
                builder.close_chunk()
                continue
            position = 0
            while position < len(tokens):
                builder.prepare(tokens[position])
                embedding, name_length = self.embeddings.find(tokens, position) if self.embeddings else (None, None)
                if embedding is None:
                    builder.append(tokens[position], weight)
                    position += 1
                    continue
                # As A1111: an embedding's vectors stay in one chunk, each with the fragment's weight.
                ids = self.embeddings.ids[embedding.name]
                if len(builder.current.tokens) + len(ids) > self.chunk_length:
                    builder.close_chunk()
                for token in ids:
                    builder.append(token, weight)
                self.used_embeddings.append(embedding.name)
                position += name_length
        return builder.finish()

    def empty_chunk(self) -> Chunk:
        """``BOS + 76 x EOS`` with multipliers 1: the empty prompt, and the filler in batches."""
        chunk = Chunk()
        _close(chunk, self)
        return chunk

    def padded_for_encoder(self, tokens: Sequence[int]) -> list[int]:
        """Positions after the first EOS rewritten to ``pad`` (a no-op for SD1, where pad = EOS;
        OpenCLIP uses pad 0) — done just before encoding, as A1111 does (§1.4)."""
        tokens = list(tokens)
        if self.pad != self.eos and self.eos in tokens:
            first_eos = tokens.index(self.eos)
            tokens[first_eos + 1:] = [self.pad] * (len(tokens) - first_eos - 1)
        return tokens


def _close(chunk: Chunk, chunker: PromptChunker) -> None:
    """Pad with EOS (weight 1) to the chunk length, then wrap in BOS ... EOS (weights 1)."""
    missing = chunker.chunk_length - len(chunk.tokens)
    chunk.tokens = [chunker.bos] + chunk.tokens + [chunker.eos] * missing + [chunker.eos]
    chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * missing + [1.0]


class _ChunkBuilder:
    """State of the §1.4 loop: the open chunk, the closed ones, the last comma position."""

    def __init__(self, chunker: PromptChunker):
        self.chunker = chunker
        self.closed: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close_chunk(self) -> None:
        _close(self.current, self.chunker)
        self.closed.append(self.current)
        self.current = Chunk()
        self.last_comma = -1

    def prepare(self, token: int) -> None:
        """Before the token at this position: comma bookkeeping, back-off to a comma, a full chunk closed."""
        if token == self.chunker.comma_token:
            self.last_comma = len(self.current.tokens)
        elif self._should_back_off_to_comma():
            self._move_words_after_comma_to_next_chunk()
        if len(self.current.tokens) == self.chunker.chunk_length:
            self.close_chunk()

    def append(self, token: int, weight: float) -> None:
        self.current.tokens.append(token)
        self.current.multipliers.append(weight)

    def _should_back_off_to_comma(self) -> bool:
        """Full chunk, a comma no more than ``comma_padding_backtrack`` tokens back (§1.4)."""
        backtrack = self.chunker.comma_padding_backtrack
        full = len(self.current.tokens) == self.chunker.chunk_length
        return (backtrack != 0 and full and self.last_comma != -1
                and len(self.current.tokens) - self.last_comma <= backtrack)

    def _move_words_after_comma_to_next_chunk(self) -> None:
        cut = self.last_comma + 1
        moved_tokens, moved_weights = self.current.tokens[cut:], self.current.multipliers[cut:]
        del self.current.tokens[cut:], self.current.multipliers[cut:]
        self.close_chunk()
        self.current.tokens, self.current.multipliers = moved_tokens, moved_weights

    def finish(self) -> list[Chunk]:
        if self.current.tokens or not self.closed:
            self.close_chunk()
        return self.closed


# ---------------------------------------------------------------------------------------------
# §1.5 emphasis and concatenation
# ---------------------------------------------------------------------------------------------

def apply_emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str = DEFAULT_EMPHASIS) -> np.ndarray:
    """Weight encoder output ``z`` ``(B, 77, C)`` (or ``(77, C)``) by ``multipliers`` ``(B, 77)``.

    "Original": scale by the multipliers, then restore the mean; both means are scalars over the
    whole tensor, batch axis included (v1.10). "No norm": scale only. "Ignore"/"None": unchanged.
    Means are taken in float64, the result keeps ``z``'s dtype.
    """
    mode = normalize_emphasis_mode(mode)
    if mode in ("Ignore", "None"):
        return z
    weighted = z * np.asarray(multipliers, dtype=z.dtype)[..., None]
    if mode == "No norm":
        return weighted
    factor = z.mean(dtype=np.float64) / weighted.mean(dtype=np.float64)
    return weighted * np.asarray(factor, dtype=z.dtype)


def chunk_batches(chunk_lists: Sequence[Sequence[Chunk]], chunker: PromptChunker):
    """Per chunk index, ``(tokens (B, 77) int64, multipliers (B, 77) float32)`` for the batch.

    Texts with fewer chunks get the empty chunk (§1.5); tokens are encoder-ready (pad rewrite).
    """
    count = max(len(chunks) for chunks in chunk_lists)
    empty = chunker.empty_chunk()
    batches = []
    for index in range(count):
        column = [chunks[index] if index < len(chunks) else empty for chunks in chunk_lists]
        tokens = np.array([chunker.padded_for_encoder(c.tokens) for c in column], dtype=np.int64)
        multipliers = np.array([c.multipliers for c in column], dtype=np.float32)
        batches.append((tokens, multipliers))
    return batches


def encode_texts(texts: Sequence[str], chunker: PromptChunker,
                 encode_tokens: Callable[[np.ndarray], np.ndarray],
                 emphasis: str = DEFAULT_EMPHASIS) -> np.ndarray:
    """Encode one batch of texts (e.g. all distinct texts of one prompt's schedule, §1.5).

    Each chunk index is encoded for the whole batch at once and emphasised as a batch (the
    "Original" mean is batch-global), then chunks are concatenated: ``(B, 77 * n_chunks, C)``.
    """
    chunk_lists = [chunker.chunks(text, emphasis) for text in texts]
    encoded = [apply_emphasis(encode_tokens(tokens), multipliers, emphasis)
               for tokens, multipliers in chunk_batches(chunk_lists, chunker)]
    return np.concatenate(encoded, axis=1)


# ---------------------------------------------------------------------------------------------
# §1.6 different lengths (token axis = -2)
# ---------------------------------------------------------------------------------------------

def pad_to_same_length(tensors: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Pad shorter conds by repeating their last token vector (cond batch of AND sub-prompts)."""
    longest = max(t.shape[-2] for t in tensors)
    return [_repeat_last_vector(t, longest) for t in tensors]


def _repeat_last_vector(tensor: np.ndarray, length: int) -> np.ndarray:
    missing = length - tensor.shape[-2]
    if missing <= 0:
        return tensor
    last = tensor[..., -1:, :]
    return np.concatenate([tensor, np.repeat(last, missing, axis=-2)], axis=-2)


def pad_cond_uncond_with_empty(cond: np.ndarray, uncond: np.ndarray, empty: np.ndarray):
    """Option ``pad_cond_uncond``: append copies of the empty-prompt encoding ``empty``
    (``(77, C)`` or ``(1, 77, C)``) to the shorter of ``cond``/``uncond`` ``(B, T, C)``."""
    empty = empty.reshape(-1, empty.shape[-2], empty.shape[-1])[:1]
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = _append_blocks(cond, empty, -repeats)
    elif repeats > 0:
        uncond = _append_blocks(uncond, empty, repeats)
    return cond, uncond


def _append_blocks(tensor: np.ndarray, block: np.ndarray, count: int) -> np.ndarray:
    blocks = np.tile(block, (tensor.shape[0], count, 1)).astype(tensor.dtype, copy=False)
    return np.concatenate([tensor, blocks], axis=1)


def pad_cond_uncond_v0(cond: np.ndarray, uncond: np.ndarray):
    """Option ``pad_cond_uncond_v0``: uncond is padded by repeating its last vector or truncated
    to ``cond``'s length."""
    if uncond.shape[1] > cond.shape[1]:
        return cond, uncond[:, :cond.shape[1]]
    return cond, _repeat_last_vector(uncond, cond.shape[1])
