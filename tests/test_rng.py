"""Noise sources (docs/generation-semantics.md §5): torch is only the reference here."""
import math
import subprocess
import sys

import numpy as np
import pytest

try:  # the reference only; everything else runs without torch
    import torch
except ImportError:
    torch = None

from sdfc.engine import rng
from sdfc.engine.rng import (ImageRNG, PhiloxGenerator, TorchCPUGenerator, make_generator,
                             philox4x32_10, randn_local, slerp)

SEEDS = [0, 1, 42, 1234, 4294967294, 2_760_537_351, 91_823_475]
SHAPES = [(4, 64, 64), (1, 4, 64, 64), (4, 8, 8), (3,), (1,), (15,), (16,), (17,), (33,),
          (2, 4, 96, 64), ()]


def f32(values):
    return np.array(values, dtype=np.float32)


def same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


# --------------------------------------------------------------------------------------------
# CPU source: MT19937 + torch's randn kernels (§5.5)
# --------------------------------------------------------------------------------------------

def _init_genrand_reference(seed):
    key = [seed & 0xFFFFFFFF]
    for k in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + k) & 0xFFFFFFFF)
    return key


@pytest.mark.parametrize("seed", [0, 1, 1234, 4294967294])
def test_mt19937_seeding_is_init_genrand(seed):
    assert rng._mt19937_init_genrand(seed).tolist() == _init_genrand_reference(seed)


@pytest.mark.parametrize("seed, first_words", [
    (0, [0x8C7F0AAC, 0x97C4AA2F, 0xB716A675, 0xD821CCC0]),
    (1234, [0x31076B2F, 0x7F66E2D3, 0x9F428526, 0xD15DDC35]),
])
def test_mt19937_first_outputs(seed, first_words):
    assert TorchCPUGenerator(seed)._raw(4).tolist() == first_words


# Literal vectors of §5.5: fail if torch (or this port) ever changes.
CPU_VECTORS = {
    0: dict(
        head=[-1.12583983, -1.1523602, -0.250578582, -0.433878809, 0.848710358, 0.692009151,
              -0.31601277, -2.11521935, 0.322274923, -1.26333475, 0.349983186, 0.30813393,
              0.119841509, 1.2376579, 1.11677718, -0.247278154],
        tail=[-1.04071403, 0.0907838792, -1.36646974, -1.07820797], total=-124.112700,
        second=[-0.551836073, 1.53980732, 1.00355875, -0.794789433]),
    1234: dict(
        head=[-0.111718565, -0.496590108, 0.163073704, -0.88168776, 0.0539001934, 0.668373704,
              -0.0596576072, -0.467497945, -0.215252936, 0.883961618, -0.758416891, -0.368867904,
              -0.342393607, -1.40197182, 0.320647985, -1.0218575],
        tail=[1.38833761, -1.0849719, 0.544309497, 1.57986307], total=-6.569934, second=None),
}


@pytest.mark.parametrize("seed", sorted(CPU_VECTORS))
def test_cpu_literal_vectors(seed):
    want = CPU_VECTORS[seed]
    gen = TorchCPUGenerator(seed)
    flat = gen.randn((4, 64, 64)).ravel()
    assert same_bits(flat[:16], f32(want["head"]))
    assert same_bits(flat[-4:], f32(want["tail"]))
    assert flat.astype(np.float64).sum() == pytest.approx(want["total"], abs=1e-6)
    if want["second"] is not None:
        assert same_bits(gen.randn((4, 64, 64)).ravel()[:4], f32(want["second"]))


def test_cpu_literal_small_shapes():
    assert same_bits(TorchCPUGenerator(0).randn((3,)), f32([1.54099607, -0.293428898, -2.17878938]))
    want17 = [-1.12583983, -1.6959312, 0.566650629, 0.793508351, 0.598839462, -1.55509508,
              -0.34136039, 1.85300612, 0.468096405, -0.585497558, -0.173396751, 0.183477938,
              1.38936615, 1.58633423, 0.946298361, -0.843676746, 0.931826591]
    assert same_bits(TorchCPUGenerator(0).randn((17,)), f32(want17))


def test_cpu_output_dtype_and_shape():
    for shape in [(2, 3, 5), (1,), ()]:
        out = TorchCPUGenerator(7).randn(shape)
        assert out.dtype == np.float32 and out.shape == shape
    assert TorchCPUGenerator(7).randn(16).shape == (16,)


def _exact_fma(a, b, c):
    # Correctly rounded fma: round-to-odd in float64 (exact TwoSum error), then round to float32.
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.broadcast_to(np.asarray(c, np.float64), p.shape)
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    nudge = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def test_exact_fma_helper_catches_double_rounding():
    # (24929 * 2**-15) * (673 * 2**-9) == 1 + 2**-24 exactly: a float32 tie broken by c only.
    a, b, c = f32([24929 * 2.0 ** -15]), f32([673 * 2.0 ** -9]), f32([2.0 ** -70])
    assert _exact_fma(a, b, c)[0] == np.float32(1 + 2.0 ** -23)
    assert rng._fma(a, b, c)[0] == np.float32(1.0)  # the cast double-rounds here...


def test_float64_fma_emulation_is_exact_on_reachable_inputs(monkeypatch):
    # ...but never on the kernel's inputs (k * 2**-24). This samples every 16th of the 2**24
    # inputs; an offline run over all of them found no difference either.
    u = np.arange(0, 2 ** 24, 16, dtype=np.uint32).astype(np.float32) * np.float32(2.0 ** -24)
    x, theta = np.float32(1) - u, np.float32(2 * math.pi) * u
    fast = rng._avx2_log(x), *rng._avx2_sincos(theta)
    monkeypatch.setattr(rng, "_fma", _exact_fma)
    exact = rng._avx2_log(x), *rng._avx2_sincos(theta)
    for a, b in zip(fast, exact):
        assert same_bits(a, b)


@pytest.mark.skipif(torch is None, reason="torch (the reference) is not installed")
class TestAgainstTorch:
    def reference(self, seed):
        return torch.Generator().manual_seed(seed)

    def draw(self, generator, shape):
        return torch.randn(shape, generator=generator).numpy()

    @pytest.mark.parametrize("seed", SEEDS)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_first_draw_bit_exact(self, seed, shape):
        assert same_bits(TorchCPUGenerator(seed).randn(shape), self.draw(self.reference(seed), shape))

    @pytest.mark.parametrize("seed", [0, 1234, 2 ** 40 + 3, 2 ** 64 - 1])
    @pytest.mark.parametrize("sequence", [
        [(4, 64, 64), (4, 64, 64)],
        [(3,), (3,), (20,)],                     # small path cache survives between calls
        [(1,), (4, 8, 8), (1,), (2,), (5,)],     # the >=16 path neither uses nor clears the cache
        [(17,), (3,), (33,), (15,), (16,), (1,)],
        [(0, 4), (5,), (0,), (16,)],             # empty draws consume nothing
    ], ids=str)
    def test_consecutive_draws_bit_exact(self, seed, sequence):
        ours, ref = TorchCPUGenerator(seed), self.reference(seed)
        for shape in sequence:
            assert same_bits(ours.randn(shape), self.draw(ref, shape)), shape

    def test_image_rng_cpu_matches_torch_per_image(self):
        rngs = ImageRNG((4, 8, 8), [5, 6], source="CPU")
        first, second = rngs.next(), rngs.next()
        for i, seed in enumerate([5, 6]):
            ref = self.reference(seed)
            assert same_bits(first[i], self.draw(ref, (4, 8, 8)))
            assert same_bits(second[i], self.draw(ref, (4, 8, 8)))


# --------------------------------------------------------------------------------------------
# NV source: Philox4x32-10 (§5.6)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, want):
    out = philox4x32_10(counter, key)
    assert out.dtype == np.uint32 and out.tolist() == list(want)


def test_philox_vectorised_matches_scalar():
    counters = np.arange(5, dtype=np.uint64) * 0x01234567
    batch = philox4x32_10((3, 9, counters, 11), (123, 456))
    for i, c in enumerate(counters):
        assert batch[:, i].tolist() == philox4x32_10((3, 9, int(c), 11), (123, 456)).tolist()


NV_VECTORS = {
    0: dict(head=[-0.924662411, -0.425343961, -2.6438458, 0.145183876, -0.120866507, -0.579725683,
                  -0.622851312, -0.328387141],
            tail=[-0.664592266, -0.13154991, -0.42083317, -2.9543159], total=-113.793990,
            second=[0.180825889, -0.552262723, 0.923813403, -0.734970331]),
    1234: dict(head=[-1.61649036, 0.568455219, -0.510224581, -0.911339402, -1.1555171, -0.22615087,
                     -1.28913248, 1.06538224],
               tail=[-0.640332758, -1.27125549, -0.795480549, -1.68973804], total=103.428152,
               second=None),
}


@pytest.mark.parametrize("seed", sorted(NV_VECTORS))
def test_nv_literal_vectors(seed):
    want = NV_VECTORS[seed]
    gen = PhiloxGenerator(seed)
    flat = gen.randn((4, 64, 64)).ravel()
    assert flat.dtype == np.float32
    assert same_bits(flat[:8], f32(want["head"]))
    assert same_bits(flat[-4:], f32(want["tail"]))
    assert flat.astype(np.float64).sum() == pytest.approx(want["total"], abs=1e-6)
    if want["second"] is not None:
        assert same_bits(gen.randn((4, 64, 64)).ravel()[:4], f32(want["second"]))


def test_nv_is_elementwise_and_offset_per_call():
    small = PhiloxGenerator(0).randn((3, 4)).ravel()
    big = PhiloxGenerator(0).randn((4, 64, 64)).ravel()
    assert same_bits(small, big[:12])
    gen = PhiloxGenerator(0)
    gen.randn((5,))
    assert gen.offset == 1
    assert same_bits(gen.randn((4, 64, 64)).ravel()[:4], f32(NV_VECTORS[0]["second"]))


def _nv_from_philox(seed, offset, n):
    out = philox4x32_10((offset, 0, np.arange(n), 0), (seed & 0xFFFFFFFF, seed >> 32))
    u = out[0] * np.float64(np.float32(2.3283064e-10)) + np.float64(np.float32(2.3283064e-10) / 2)
    b = np.float32(2.3283064e-10 * 6.2831855)
    v = out[1] * np.float64(b) + np.float64(b / np.float32(2))
    return (np.sqrt(-2 * np.log(u)) * np.sin(v)).astype(np.float32)


@pytest.mark.parametrize("seed", [2 ** 32, 2 ** 40 + 7, 4294967294 + 5, 2 ** 63 + 12345])
def test_nv_seed_high_word_is_key_hi(seed):
    gen = PhiloxGenerator(seed)
    for offset in range(2):
        assert same_bits(gen.randn((64,)), _nv_from_philox(seed, offset, 64))
    assert not np.array_equal(PhiloxGenerator(seed).randn((64,)),
                              PhiloxGenerator(seed & 0xFFFFFFFF).randn((64,)))


# --------------------------------------------------------------------------------------------
# Source selection
# --------------------------------------------------------------------------------------------

def test_make_generator_sources():
    assert isinstance(make_generator("CPU", 1), TorchCPUGenerator)
    assert isinstance(make_generator("NV", 1), PhiloxGenerator)
    assert isinstance(make_generator("GPU", 1), PhiloxGenerator)


def test_gpu_source_equals_nv():
    a = ImageRNG((4, 8, 8), [3, 4], source="GPU", eta_noise_seed_delta=7)
    b = ImageRNG((4, 8, 8), [3, 4], source="NV", eta_noise_seed_delta=7)
    for _ in range(3):
        assert same_bits(a.next(), b.next())
    assert same_bits(randn_local("GPU", 9, (4, 4)), randn_local("NV", 9, (4, 4)))


@pytest.mark.parametrize("bad", ["cuda", "cpu", "", None])
def test_unknown_source_is_rejected(bad):
    with pytest.raises(ValueError) as info:
        make_generator(bad, 0)
    message = str(info.value)
    assert repr(bad) in message and all(name in message for name in ("CPU", "NV", "GPU"))
    with pytest.raises(ValueError):
        ImageRNG((4, 8, 8), [0], source=bad)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_randn_local_is_first_draw_of_fresh_generator(source):
    assert same_bits(randn_local(source, 77, (2, 16)), make_generator(source, 77).randn((2, 16)))


# --------------------------------------------------------------------------------------------
# ImageRNG (§5.2)
# --------------------------------------------------------------------------------------------

SHAPE = (4, 12, 10)


def draws(source, seed, k, shape=SHAPE):
    gen = make_generator(source, seed)
    return [gen.randn(shape) for _ in range(k)]


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_first_and_next_are_per_image_generator_draws(source):
    seeds = [10, 11, 12]
    rngs = ImageRNG(SHAPE, seeds, source=source)
    got = [rngs.first()] + [rngs.next() for _ in range(3)]
    assert got[0].shape == (3, *SHAPE) and got[0].dtype == np.float32
    for i, seed in enumerate(seeds):
        for k, want in enumerate(draws(source, seed, 4)):
            assert same_bits(got[k][i], want)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_batch_reproduces_single_image_runs(source):
    seeds = [500, 501, 502]
    kwargs = dict(subseeds=[9, 8, 7], subseed_strength=0.3, seed_resize_from_h=64,
                  seed_resize_from_w=128, source=source, eta_noise_seed_delta=31337)
    batch = ImageRNG(SHAPE, seeds, **kwargs)
    singles = [ImageRNG(SHAPE, [s], **{**kwargs, "subseeds": [kwargs["subseeds"][i]]})
               for i, s in enumerate(seeds)]
    for _ in range(4):
        out = batch.next()
        for i, single in enumerate(singles):
            assert same_bits(out[i], single.next()[0])


def test_next_before_first_returns_first():
    a, b = ImageRNG(SHAPE, [1, 2]), ImageRNG(SHAPE, [1, 2])
    assert same_bits(a.next(), b.first())
    assert same_bits(a.next(), b.next())


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_eta_noise_seed_delta_replaces_generators_after_first(source):
    seeds, ensd = [40, 41], 31337
    rngs = ImageRNG(SHAPE, seeds, source=source, eta_noise_seed_delta=ensd)
    plain = ImageRNG(SHAPE, seeds, source=source)
    assert same_bits(rngs.first(), plain.first())  # ENSD never touches the initial latent
    got = [rngs.next() for _ in range(3)]
    for i, seed in enumerate(seeds):
        for k, want in enumerate(draws(source, seed + ensd, 3)):
            assert same_bits(got[k][i], want)  # draw k (not k+1) of Generator(seed + ENSD)


def test_subseed_strength_zero_equals_no_subseed():
    with_sub = ImageRNG(SHAPE, [3, 4], subseeds=[100, 101], subseed_strength=0.0)
    without = ImageRNG(SHAPE, [3, 4])
    for _ in range(2):
        assert same_bits(with_sub.next(), without.next())


def test_subseed_strength_one_gives_subseed_noise():
    out = ImageRNG(SHAPE, [3, 3], subseeds=[100, 101], subseed_strength=1.0).first()
    for i, sub in enumerate([100, 101]):
        np.testing.assert_allclose(out[i], randn_local("NV", sub, SHAPE), atol=2e-5)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_subseed_blend_is_slerp_and_leaves_generators_alone(source):
    strength = 0.37
    rngs = ImageRNG(SHAPE, [3], subseeds=[100], subseed_strength=strength, source=source)
    want = slerp(strength, randn_local(source, 3, SHAPE), randn_local(source, 100, SHAPE))
    assert same_bits(rngs.first()[0], want)
    assert same_bits(rngs.next()[0], draws(source, 3, 2)[1])


def test_slerp_endpoints_and_formula():
    low, high = draws("NV", 1, 1)[0], draws("NV", 2, 1)[0]
    np.testing.assert_allclose(slerp(0.0, low, high), low, atol=1e-6)
    np.testing.assert_allclose(slerp(1.0, low, high), high, atol=1e-5)
    # Float64 restatement of §5.2, norms along axis 1 (H).
    lo, hi, val = low.astype(np.float64), high.astype(np.float64), 0.25
    dot = np.sum(lo / np.linalg.norm(lo, axis=1, keepdims=True)
                 * hi / np.linalg.norm(hi, axis=1, keepdims=True), axis=1)
    omega = np.arccos(dot)[:, None, :]
    want = (np.sin((1 - val) * omega) * lo + np.sin(val * omega) * hi) / np.sin(omega)
    np.testing.assert_allclose(slerp(val, low, high), want, atol=1e-5)
    assert slerp(val, low, high).dtype == np.float32


def test_slerp_near_parallel_falls_back_to_reversed_linear():
    low = draws("NV", 1, 1)[0]
    high = low * np.float32(2) + np.float32(1e-3) * draws("NV", 2, 1)[0]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    assert np.sum(unit(low) * unit(high), axis=1).mean() > 0.9995
    got = slerp(0.3, low, high)
    assert same_bits(got, low * np.float32(0.3) + high * np.float32(0.7))
    assert not np.allclose(got, low * np.float32(0.7) + high * np.float32(0.3))


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_seed_resize_from_larger_crops_source_centre(source):
    # 96x96 px -> 12x12 latent into a (12, 10) latent: dy = 0, dx = -1.
    shape = (4, 12, 10)
    out = ImageRNG(shape, [8], seed_resize_from_h=96, seed_resize_from_w=96, source=source).first()[0]
    noise = randn_local(source, 8, (4, 12, 12))
    assert same_bits(out, noise[:, :, 1:11])


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_seed_resize_from_smaller_pastes_into_centre(source):
    # 48x40 px -> (6, 5) latent into (12, 10): dy = 3, dx = 2; the rest is the image's own draw.
    shape = (4, 12, 10)
    rngs = ImageRNG(shape, [8], seed_resize_from_h=48, seed_resize_from_w=40, source=source)
    out = rngs.first()[0]
    own = draws(source, 8, 2, shape)
    want = own[0].copy()
    want[:, 3:9, 2:7] = randn_local(source, 8, (4, 6, 5))
    assert same_bits(out, want)
    assert same_bits(rngs.next()[0], own[1])  # the image generator was drawn once


def test_seed_resize_mixed_and_odd_offsets():
    # Source (4, 17, 3) into (4, 12, 10): dy = (12-17)//2 = -3 -> source rows 3..11 (17-6 = 11
    # rows) at target row 0; dx = (10-3)//2 = 3 -> all 3 columns at target column 3.
    shape = (4, 12, 10)
    out = ImageRNG(shape, [5], seed_resize_from_h=136, seed_resize_from_w=24).first()[0]
    want = draws("NV", 5, 1, shape)[0]
    want[:, 0:11, 3:6] = randn_local("NV", 5, (4, 17, 3))[:, 3:14, :]
    assert same_bits(out, want)


def test_seed_resize_with_subseed_blends_at_source_size():
    shape = (4, 12, 10)
    rngs = ImageRNG(shape, [5], subseeds=[6], subseed_strength=0.5,
                    seed_resize_from_h=64, seed_resize_from_w=64)
    small = slerp(0.5, randn_local("NV", 5, (4, 8, 8)), randn_local("NV", 6, (4, 8, 8)))
    want = draws("NV", 5, 1, shape)[0]
    want[:, 2:10, 1:9] = small
    assert same_bits(rngs.first()[0], want)


@pytest.mark.parametrize("h, w", [(0, 0), (96, 0), (0, 80), (96, 80)])
def test_seed_resize_inactive_or_same_size_is_plain_noise(h, w):
    shape = (4, 12, 10)
    rngs = ImageRNG(shape, [5, 6], seed_resize_from_h=h, seed_resize_from_w=w)
    assert same_bits(rngs.first(), ImageRNG(shape, [5, 6]).first())


def test_image_rng_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ImageRNG((4, 8), [1])
    with pytest.raises(ValueError):
        ImageRNG(SHAPE, [1, 2], subseeds=[3], subseed_strength=0.5)


# --------------------------------------------------------------------------------------------
# Serving constraints
# --------------------------------------------------------------------------------------------

def test_module_does_not_import_torch():
    code = ("import sys, sdfc.engine.rng as r; r.ImageRNG((4, 8, 8), [1], source='CPU').next(); "
            "r.randn_local('NV', 1, (4,)); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
