"""Textual-inversion embeddings, as A1111 1.10 loads and applies them.

An embedding is a few token vectors saved under a name (its file name without the suffix). A prompt that
contains the name's tokens gets the vectors in their place: A1111 puts placeholder tokens there and swaps the
token-embedding rows inside CLIP; here each vector gets a token id past CLIP's vocabulary and the text
encoder's token-embedding table is extended by those rows (an initializer override when its session is made,
sdfc/engine/models.py), so the graph itself does the swap. Position embeddings and emphasis apply as to any
token, as in A1111.

Only `.safetensors` files are read (a small parser below: no torch, no pickle). `.pt`/`.bin` embeddings are
Python pickles that can run code when loaded: they are listed as skipped, with the reason in the log.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .safetensors_file import SafetensorsError as EmbeddingFileError
from .safetensors_file import read_safetensors

log = logging.getLogger("sdfc.engine")

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
MAX_HEADER_BYTES = 1 << 20
MAX_VECTORS = 75  # one chunk: A1111 could not place a longer embedding either


@dataclass
class Embedding:
    name: str
    vectors: np.ndarray          # (count, width) float32; empty for a skipped file that could not be read
    path: Path
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]  # A1111's shorthash, as in "TI hashes"

    @property
    def shape(self) -> int:
        return int(self.vectors.shape[-1]) if self.vectors.size else 0

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0]) if self.vectors.size else 0

    def listing(self) -> dict:
        """A1111's /sdapi/v1/embeddings entry."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.count}


def _vectors_of(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """A1111's accepted layouts: one tensor (diffusers concepts, `emb_params`), or `string_to_param` flattened
    to one `string_to_param.*` key. SDXL's clip_l/clip_g pair is not an SD 1.x embedding."""
    if "clip_l" in tensors and "clip_g" in tensors:
        raise EmbeddingFileError("an SDXL embedding (clip_l + clip_g)")
    params = {k: v for k, v in tensors.items() if k.startswith("string_to_param")} or tensors
    if len(params) != 1:
        raise EmbeddingFileError(f"embedding file has {len(params)} terms in it (A1111 takes exactly one)")
    vectors = next(iter(params.values()))
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise EmbeddingFileError(f"embedding tensor of shape {list(vectors.shape)} is not (1..{MAX_VECTORS}, width)")
    if not np.isfinite(vectors).all():
        raise EmbeddingFileError("embedding holds non-finite values")
    return vectors


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class EmbeddingDatabase:
    """The embeddings of one folder for a text encoder of `width`: loaded ones and skipped ones, by name."""

    folder: Path | None
    width: int
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    signature: tuple = ()

    @classmethod
    def scan(cls, folder: Path | None, width: int) -> "EmbeddingDatabase":
        db = cls(folder, width)
        if folder is None or not folder.is_dir():
            return db
        db.signature = folder_signature(folder)
        for path in (Path(entry[0]) for entry in db.signature):
            suffix = path.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                log.warning("embedding %s skipped: %s files are Python pickles (they can run code); convert it "
                            "to .safetensors", path.name, suffix)
                db.skipped[path.stem] = Embedding(path.stem, np.zeros((0, 0), np.float32), path, "")
            elif suffix == ".safetensors":
                db._load(path)
        return db

    def _load(self, path: Path) -> None:
        name = path.stem
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            tensors, metadata = read_safetensors(path)
            vectors = _vectors_of(tensors)
        except EmbeddingFileError as exc:
            log.warning("embedding %s skipped: %s", path.name, exc)
            self.skipped[name] = Embedding(name, np.zeros((0, 0), np.float32), path, digest)
            return
        embedding = Embedding(name, vectors, path, digest, step=_int_or_none(metadata.get("step")),
                              sd_checkpoint=metadata.get("sd_checkpoint") or metadata.get("hash"),
                              sd_checkpoint_name=metadata.get("sd_checkpoint_name"))
        if name in self.loaded:
            log.warning("embedding %s: a second file with this name, %s, is ignored", name, path)
        elif embedding.shape != self.width:
            # As A1111: made for another text encoder (e.g. SD 2's 1024-wide OpenCLIP), listed as skipped.
            self.skipped[name] = embedding
        else:
            self.loaded[name] = embedding


class EmbeddingVocabulary:
    """Token ids for the loaded embeddings of one model, and how prompts find them.

    Embedding k's vectors take ids `vocab_size + offset_k …`: `table()` is CLIP's token-embedding table with
    those rows appended, `find(tokens, position)` A1111's longest-match lookup by the name's tokens."""

    def __init__(self, db: EmbeddingDatabase, vocab_size: int, encode_name):
        self.db = db
        self.vocab_size = vocab_size
        self.ids: dict[str, list[int]] = {}
        self._by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        next_id = vocab_size
        for name, embedding in db.loaded.items():
            self.ids[name] = list(range(next_id, next_id + embedding.count))
            next_id += embedding.count
            name_tokens = encode_name(name)
            if not name_tokens:
                continue
            matches = self._by_first.setdefault(name_tokens[0], [])
            matches.append((name_tokens, embedding))
            matches.sort(key=lambda m: len(m[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self.ids)

    def find(self, tokens: list[int], position: int) -> tuple[Embedding, int] | tuple[None, None]:
        for name_tokens, embedding in self._by_first.get(tokens[position], ()):
            if tokens[position:position + len(name_tokens)] == name_tokens:
                return embedding, len(name_tokens)
        return None, None

    def table(self, base: np.ndarray) -> np.ndarray:
        rows = [e.vectors.astype(base.dtype) for e in self.db.loaded.values()]
        return np.ascontiguousarray(np.concatenate([base, *rows])) if rows else base


def infotext(names: list[str], vocabulary: "EmbeddingVocabulary | None") -> dict:
    """A1111's "TI hashes" infotext entry for the embeddings a job used, in order of first use ({} for none)."""
    parts = []
    for name in dict.fromkeys(names):
        embedding = vocabulary.db.loaded.get(name) if vocabulary else None
        if embedding is not None and embedding.shorthash:
            parts.append(f"{name.replace(':', '').replace(',', '')}: {embedding.shorthash}")
    return {"TI hashes": ", ".join(parts)} if parts else {}


def folder_signature(folder: Path | None) -> tuple:
    """What changes when an embedding file is added, removed or replaced (checked before each job, as A1111
    checks its folder's mtime)."""
    if folder is None or not folder.is_dir():
        return ()
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.stat().st_size > 0
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def sync_embeddings(model, folder: Path | None, force: bool = False) -> "EmbeddingVocabulary":
    """Give `model` (an OnnxModel) the embeddings now in `folder`, unless nothing changed since last time."""
    from .prompt_chunks import make_clip_encode_fn

    current = model.embeddings
    signature = folder_signature(folder)
    if current is not None and not force and current.db.signature == signature:
        return current
    if not signature:
        vocabulary = EmbeddingVocabulary(EmbeddingDatabase(folder, 0), 0, lambda name: [])
    else:
        base = model.token_embedding_table()
        db = EmbeddingDatabase.scan(folder, int(base.shape[1]))
        encode = make_clip_encode_fn(model.tokenizer)
        vocabulary = EmbeddingVocabulary(db, int(base.shape[0]), lambda name: encode([name])[0])
        log.info("embeddings for %s: %d loaded (%s), %d skipped", model.info.name, len(db.loaded),
                 ", ".join(db.loaded) or "-", len(db.skipped))
    if vocabulary or (current is not None and current):
        model.set_embeddings(vocabulary)
    else:
        model.embeddings = vocabulary
    return vocabulary
