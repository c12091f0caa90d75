"""Loaded models: a least-recently-used cache bounded by count and by bytes.

Switching models on a GPU must never end in out-of-memory, so loaded models are not kept forever. The
count bound is A1111's option `sd_checkpoint_cache`: the model in use plus that many others (A1111 keeps
that many checkpoints in RAM beside the loaded one). The byte bound (SDFC_MODEL_MEMORY_MB) counts what
each model holds: its weights, and what it built since (seamless sessions, LoRA-merged session sets).

Loading a model evicts the least recently used ones until both bounds hold (before the load, so that
memory is free when the new sessions are made, and again after it). Eviction only drops the cache's
reference: a job still running on an evicted model holds its own, and the model's memory goes when that
job ends. The count bound is about what the cache holds, not about such jobs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from .models import ModelInfo, OnnxModel

log = logging.getLogger("sdfc.engine")

# sdfc's default for sd_checkpoint_cache: one model kept beside the one in use (A1111's default is 0), so that
# a base model and its refiner, or two models used in turn, are not reloaded at every switch.
DEFAULT_OTHERS = 1
MAX_OTHERS = 10  # the option's upper bound, as A1111's slider


def resident_bytes(model: OnnxModel) -> int:
    """What a loaded model holds in memory, as far as its files tell: the weights of its sessions, the
    seamless sessions once built, and its kept LoRA session sets. An fp16 export's fp32 VAE decoder (built on
    first need, precision.py) is counted from the start: its folder's files are part of `weights_bytes`."""
    profile = model.info.memory
    total = profile.weights_bytes
    if model.tiled_resident:
        total += profile.tiled_weights_bytes
    return total + model.loras.resident_bytes(model.info.path)


def _mib(n: int | None) -> str:
    return "no limit" if n is None else f"{n / 2**20:.1f} MiB"


class ModelCache:
    """The loaded models, most recently used last. `open_model(info)` makes one (the engine's loader)."""

    def __init__(self, open_model: Callable[[ModelInfo], OnnxModel], others: int = DEFAULT_OTHERS,
                 max_bytes: int | None = None):
        self._open = open_model
        self._models: OrderedDict[str, OnnxModel] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.others = self._checked_others(others)
        self.max_bytes = max_bytes or None  # None or 0: no byte bound

    @staticmethod
    def _checked_others(others: int) -> int:
        if isinstance(others, bool) or int(others) != others or not 0 <= others <= MAX_OTHERS:
            raise ValueError(f"the checkpoint cache holds 0 to {MAX_OTHERS} models besides the current one, "
                             f"got {others!r}")
        return int(others)

    @property
    def capacity(self) -> int:
        """How many models the cache holds at most: the one in use plus `others`."""
        return 1 + self.others

    # -- what is loaded -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The loaded models' names, least recently used first."""
        with self._lock:
            return list(self._models)

    def models(self) -> dict[str, OnnxModel]:
        """A snapshot of the loaded models (name → model), least recently used first."""
        with self._lock:
            return dict(self._models)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def total_bytes(self) -> int:
        return sum(resident_bytes(m) for m in self.models().values())

    # -- bounds ---------------------------------------------------------------------------------------------

    def set_others(self, others: int) -> None:
        """sd_checkpoint_cache changed: the new bound holds at once (least recently used models go)."""
        others = self._checked_others(others)
        with self._lock:
            if others == self.others:
                return
            self.others = others
            evicted = self._evict(keep=self._mru())
        log.info("checkpoint cache: %d model(s) (the current one + %d)", self.capacity, others)
        self._report_evicted(evicted)

    def clear(self) -> None:
        """Unload every model (POST /unload-checkpoint); running jobs keep theirs until they end."""
        with self._lock:
            evicted = list(self._models.items())
            self._models.clear()
        self._report_evicted(evicted)

    def _mru(self) -> str | None:
        return next(reversed(self._models), None)

    def _evict(self, keep: str | None, incoming_bytes: int = 0, incoming: int = 0) -> list:
        """Drop least-recently-used models (never `keep`) until `incoming` more models of `incoming_bytes`
        fit both bounds. Called with the lock held; returns the (name, model) pairs dropped."""
        evicted = []
        # Sizes read the models' files: only when there is a byte bound to hold.
        sizes = {name: resident_bytes(model) for name, model in self._models.items()} \
            if self.max_bytes is not None else {}

        def over() -> bool:
            if len(self._models) + incoming > self.capacity:
                return True
            return self.max_bytes is not None and sum(sizes.values()) + incoming_bytes > self.max_bytes

        while over():
            victim = next((name for name in self._models if name != keep), None)
            if victim is None:
                break
            evicted.append((victim, self._models.pop(victim)))
            sizes.pop(victim, None)
        return evicted

    @staticmethod
    def _report_evicted(evicted: list) -> None:
        for name, model in evicted:
            log.info("model %s unloaded from the cache (%s; freed when no running job holds it)",
                     name, _mib(resident_bytes(model)))

    # -- getting a model --------------------------------------------------------------------------------

    def get(self, info: ModelInfo) -> OnnxModel:
        """The loaded model `info`, loading it (and evicting others) when the cache lacks it."""
        while True:
            with self._lock:
                model = self._models.get(info.name)
                if model is not None:
                    switched = self._mru() != info.name
                    self._models.move_to_end(info.name)
                    evicted = self._evict(keep=info.name)  # what models built since (seamless, LoRA) counts now
                else:
                    pending = self._loading.get(info.name)
                    if pending is None:  # this thread loads it; others asking for it meanwhile wait
                        pending = self._loading[info.name] = threading.Event()
                        break
            if model is not None:
                if switched:
                    log.info("switched to model %s (cached: 0 s, %s)", info.name, _mib(resident_bytes(model)))
                self._report_evicted(evicted)
                return model
            pending.wait()  # loaded (next turn returns it) or failed (next turn tries again)
        try:
            return self._load(info)
        finally:
            with self._lock:
                self._loading.pop(info.name, None)
            pending.set()

    def _load(self, info: ModelInfo) -> OnnxModel:
        weights = info.memory.weights_bytes
        with self._lock:
            evicted = self._evict(keep=None, incoming_bytes=weights, incoming=1)
        self._report_evicted(evicted)
        del evicted  # the cache's last references: gone before the new sessions take their memory
        if self.max_bytes is not None and weights > self.max_bytes:
            log.warning("model %s needs %s, more than SDFC_MODEL_MEMORY_MB (%s): it is loaded alone",
                        info.name, _mib(weights), _mib(self.max_bytes))
        started = time.perf_counter()
        model = self._open(info)
        seconds = time.perf_counter() - started
        with self._lock:
            self._models[info.name] = model
            evicted = self._evict(keep=info.name)  # another load may have finished meanwhile
            held = [(name, resident_bytes(m)) for name, m in self._models.items()]
        log.info("model %s loaded in %.2f s (%s); cache: %s (%d of %d, %s of %s)", info.name, seconds,
                 _mib(resident_bytes(model)), ", ".join(name for name, _ in held), len(held), self.capacity,
                 _mib(sum(size for _, size in held)), _mib(self.max_bytes))
        self._report_evicted(evicted)
        return model
