"""Brownian-tree noise for the SDE samplers, as A1111 gets it from torchsde (generation-semantics.md §5.4).

A numpy re-implementation of what `torchsde.BrownianTree` (torchsde 0.2.6) computes when it is built the way
k-diffusion's `BrownianTreeNoiseSampler` builds it: one tree per image, `t0 = σ_min`, `t1 = σ_max`,
`w0 = 0`, `entropy = the image's seed`, `tol = 1e-6`, `pool_size = 24`, dyadic ("halfway") splitting, no
Lévy area. A1111 replaces torchsde's normal generator with its own `randn_local(seed, shape)` (the first
draw of a fresh generator of the selected noise source), so the values here come from
`rng.randn_local(source, seed, shape)`.

How the tree works (facts of torchsde's algorithm; the structure below follows them so that the float32
arithmetic, and hence every value, is the same):

* The root interval [t0, t1] holds W(t1) − W(t0) = N(seed₀)·sqrt(t1 − t0), where seed₀ is the first of
  `SeedSequence(entropy, pool_size).generate_state(3)`.
* Intervals split at their (rounded) midpoints on demand. When interval I (spawn key k, depth d; the root
  has k = 0, d = 0) splits, it draws its bridge seed from
  `SeedSequence(entropy, spawn_key=(k, d), pool_size).generate_state(4)[0]`; its children get keys
  2k and 2k + 1 at depth d + 1. A query point is reached by splitting at midpoints repeatedly until a
  midpoint equals it (all times are rounded to 6 decimals).
* A child's increment comes from its parent's increment W by the Brownian bridge:
  left = (Δ_left/Δ)·W + sqrt(Δ_left·Δ_right/Δ)·N(parent's bridge seed), right = W − left.
* A query [ta, tb] is answered by the sum of the increments of the existing intervals that tile it, found
  by walking the tree from the interval of the previous query.

Values are computed lazily and kept in a small LRU cache; recomputation gives bit-identical values.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .rng import randn_local

__all__ = ["BrownianTree", "BrownianNoise"]

_f32 = np.float32


class _Interval:
    __slots__ = ("start", "end", "parent", "is_left", "midway", "spawn_key", "depth", "bridge_seed",
                 "left", "right")

    def __init__(self, start: float, end: float, parent: "_Interval | None", is_left: bool | None):
        self.start, self.end = start, end
        self.parent, self.is_left = parent, is_left
        self.midway = None
        self.left = self.right = None


class BrownianTree:
    """One Brownian path on [t0, t1] with fixed entropy; `tree(ta, tb)` = W(tb) − W(ta), ta ≤ tb."""

    def __init__(self, t0: float, t1: float, shape, entropy: int, source: str = "NV",
                 tol: float = 1e-6, pool_size: int = 24, cache_size: int = 128):
        t0, t1 = float(t0), float(t1)
        if t0 > t1:
            raise ValueError(f"t0 = {t0} must not exceed t1 = {t1}")
        if tol <= 0:
            raise ValueError("tol must be positive")
        self.shape = tuple(int(s) for s in shape)
        # A seed is any int64/uint64 (torch.manual_seed's range); SeedSequence takes non-negative entropy only,
        # so a negative seed is read as its 64-bit two's complement, as torch does.
        self.entropy = int(entropy) % 2 ** 64
        self.source = source
        self.pool_size = int(pool_size)
        digits = -int(math.log10(tol))
        self._round = lambda t: round(t, digits)
        self._cache: OrderedDict[_Interval, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.root = _Interval(self._round(t0), self._round(t1), None, None)
        self.root.spawn_key, self.root.depth = 0, 0
        w_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=self.pool_size).generate_state(3)[0]
        # Note: the root increment scales with the *unrounded* interval length.
        self.root_w = self._randn(w_seed) * _f32(math.sqrt(t1 - t0))
        self._last = self.root

    def _randn(self, seed) -> np.ndarray:
        return randn_local(self.source, int(seed), self.shape).astype(_f32, copy=False)

    # ---- tree construction --------------------------------------------------------------------

    def _split_exact(self, node: _Interval, midway: float) -> None:
        node.midway = self._round(midway)
        if node.parent is not None:
            node.spawn_key = 2 * node.parent.spawn_key + (0 if node.is_left else 1)
            node.depth = node.parent.depth + 1
        sequence = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.spawn_key, node.depth),
                                          pool_size=self.pool_size)
        node.bridge_seed = sequence.generate_state(4)[0]
        node.left = _Interval(node.start, node.midway, node, True)
        node.right = _Interval(node.midway, node.end, node, False)

    def _split(self, node: _Interval, point: float) -> None:
        """Halve `node` (and then the half containing `point`, and so on) until `point` is a midpoint."""
        while True:
            self._split_exact(node, 0.5 * (node.end + node.start))
            if point > node.midway:
                node = node.right
            elif point < node.midway:
                node = node.left
            else:
                return

    def _locate(self, node: _Interval, ta: float, tb: float, out: list) -> None:
        """Append to `out`, left to right, the intervals that tile [ta, tb], creating them if needed."""
        while True:
            if ta < node.start or tb > node.end:  # outside this subtree: ask the parent
                node = node.parent
                continue
            if ta == node.start and tb == node.end:
                out.append(node)
                return
            if node.midway is None:
                if ta == node.start:
                    self._split(node, tb)
                    node = node.left
                else:
                    self._split(node, ta)
                    node = node.right
                continue
            if tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._locate(node.left, ta, node.midway, out)
                node, ta = node.right, node.midway

    # ---- increments ---------------------------------------------------------------------------

    def _increment(self, node: _Interval) -> np.ndarray:
        if node is self.root:
            return self.root_w
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        # Walk up to the nearest known ancestor, then come back down.
        chain = []
        while node is not self.root and node not in self._cache:
            chain.append(node)
            node = node.parent
        w = self._increment(node)
        for child in reversed(chain):
            left_w, right_w = self._children_increments(child.parent, w)
            # Both halves come from the same bridge draw: keep the sibling too (queries tile with siblings).
            sibling = child.parent.right if child.is_left else child.parent.left
            w, other = (left_w, right_w) if child.is_left else (right_w, left_w)
            self._store(sibling, other)
            self._store(child, w)
        return w

    def _children_increments(self, parent: _Interval, parent_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff = parent.midway - parent.start
        right_diff = parent.end - parent.midway
        # torchsde's float32 tensor arithmetic with Python-float scalars, operation by operation.
        mean = parent_w * _f32(left_diff) * _f32(h_reciprocal)
        var = left_diff * right_diff * h_reciprocal
        left_w = mean + _f32(math.sqrt(var)) * self._randn(parent.bridge_seed)
        return left_w, parent_w - left_w

    def _store(self, node: _Interval, w: np.ndarray) -> None:
        self._cache[node] = w
        self._cache.move_to_end(node)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        ta, tb = float(ta), float(tb)
        start, end = self.root.start, self.root.end
        ta, tb = min(max(ta, start), end), min(max(tb, start), end)  # torchsde clamps (with a warning)
        if ta > tb:
            raise ValueError(f"query times must satisfy ta <= tb, got {ta} and {tb}")
        if ta == tb:
            return np.zeros(self.shape, dtype=_f32)
        intervals: list[_Interval] = []
        self._locate(self._last, self._round(ta), self._round(tb), intervals)
        self._last = intervals[-1]
        w = self._increment(intervals[0])
        for interval in intervals[1:]:
            w = w + self._increment(interval)
        return w


class BrownianNoise:
    """k-diffusion's `BrownianTreeNoiseSampler` with one tree per image seed (A1111's batch determinism).

    `noise(sigma, sigma_next)` → (B, C, H, W): (W(σ_next) − W(σ)) / sqrt(|σ_next − σ|), unit variance.
    """

    def __init__(self, shape, seeds: Sequence[int], sigma_min: float, sigma_max: float, source: str = "NV"):
        lo, hi = _f32(sigma_min), _f32(sigma_max)
        self.sign = 1 if lo < hi else -1
        lo, hi = min(lo, hi), max(lo, hi)
        self.trees = [BrownianTree(lo, hi, shape, seed, source) for seed in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> np.ndarray:
        a, b = _f32(sigma), _f32(sigma_next)
        sign = 1 if a < b else -1
        lo, hi = min(a, b), max(a, b)
        w = np.stack([tree(lo, hi) for tree in self.trees])
        if self.sign * sign < 0:
            w = -w
        return w / np.sqrt(np.abs(b - a))
