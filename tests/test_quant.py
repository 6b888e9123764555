"""Blockwise 8-bit codes and bf16 rounding against the NumPy twin (tests/codes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codes import BIAS, MX_BLOCK, block_exponent, code_levels, encode, grid
from hypothesis import given, settings
from hypothesis import strategies as st

from adan.numeric.codes import e4m3_bits, mx_code, mx_decode, mx_encode, round_to_bf16


def roundtrip(x: torch.Tensor, signed: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
    codes, scales = mx_encode(x, signed, noise)
    return mx_decode(codes, scales, x.shape, signed=signed)


def random_noise(shape: tuple[int, ...], signed: bool) -> torch.Tensor:
    """Rounding addends of 10 random bits, as the kernels draw them."""
    return mx_code(signed).noise(torch.randint(0, 1024, shape, dtype=torch.int32))


def mixed_blocks(n_blocks: int, seed: int) -> torch.Tensor:
    """Blocks whose magnitudes span many decades, with a spread of values inside each."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-30, 30, size=(n_blocks, 1))
    inner = rng.normal(size=(n_blocks, MX_BLOCK)) * 10.0 ** rng.uniform(-4, 0, (n_blocks, MX_BLOCK))
    return torch.tensor((scales * inner).reshape(-1), dtype=torch.float32)


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 700), seed=st.integers(0, 10_000), signed=st.booleans())
def test_nearest_codes_are_the_twins(numel: int, seed: int, signed: bool):
    x = mixed_blocks(-(-numel // MX_BLOCK), seed)[:numel]
    if not signed:
        x = x.abs()
    codes, scales = mx_encode(x, signed)
    want_codes, want_scales = encode(x.double().numpy(), signed)
    np.testing.assert_array_equal(scales.numpy(), want_scales)
    diff = np.abs(code_levels(codes, signed) - want_codes)
    assert diff.max(initial=0) <= 1 and (diff > 0).mean() <= 0.01  # float32 ties


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(signed: bool):
    torch.manual_seed(0)
    x = torch.linspace(0.01, 3.0, 2 * MX_BLOCK)  # every value in the codes' normal range
    x[0] = 3.5
    if signed:
        x = x * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)
    draws = torch.stack([roundtrip(x, signed, random_noise(x.shape, signed))
                         for _ in range(4000)]).double().numpy()
    xs = x.double().numpy()
    unit = np.repeat([2.0 ** (block_exponent(xs[i:i + MX_BLOCK], signed) - BIAS[signed])
                      for i in range(0, xs.size, MX_BLOCK)], MX_BLOCK)
    g = grid(signed)
    hi = np.clip(np.searchsorted(g, np.abs(xs) / unit), 1, g.size - 1)
    lo_v, hi_v = g[hi - 1] * np.sign(xs) * unit, g[hi] * np.sign(xs) * unit
    assert np.all((draws == lo_v) | (draws == hi_v) | (draws == xs))
    stderr = np.abs(hi_v - lo_v) * 0.5 / np.sqrt(4000)
    # 10 random bits: a bias of at most 2**-11 of a code gap beside the sampling error
    assert np.all(np.abs(draws.mean(axis=0) - xs) <= 5 * stderr + np.abs(hi_v - lo_v) / 2000)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "values",
    [
        np.zeros(MX_BLOCK),
        np.full(MX_BLOCK, 3.0e38),
        np.full(MX_BLOCK, -7.5),
        np.full(MX_BLOCK, 1e-42),  # subnormal
        np.random.default_rng(0).normal(size=MX_BLOCK) * 1e-39,
        np.linspace(-1e38, 3e38, MX_BLOCK),
        np.concatenate([np.full(MX_BLOCK - 1, 1e-30), [1e30]]),
        np.concatenate([np.zeros(MX_BLOCK), np.full(10, 2.5)]),
    ],
    ids=["zero", "huge", "constant", "tiny", "near-1e-39", "huge-range", "outlier",
         "zero-then-partial"],
)
def test_special_blocks_stay_finite(values: np.ndarray, signed: bool):
    x = torch.tensor(values, dtype=torch.float32)
    if not signed:
        x = x.abs()
    for noise in (None, random_noise(x.shape, signed)):
        got = roundtrip(x, signed, noise)
        assert torch.isfinite(got).all()
        xs = x.double().numpy()
        err = np.abs(got.double().numpy() - xs)
        # within a code gap of the element's block: 2**-3 (e4m3, e5m3) of the
        # block's largest magnitude's binade; below float32's normal range (the scale's
        # floor is 2**-126) values may flush to zero
        top = np.repeat([np.abs(xs[i:i + MX_BLOCK]).max() for i in range(0, xs.size, MX_BLOCK)],
                        MX_BLOCK)[: xs.size]
        assert np.all(err <= np.maximum(np.abs(xs), top) * 2.0**-3 + 2.0**-126)
        if not signed:  # a nonzero second moment never decodes to zero (but below float32)
            assert np.all((got.numpy() > 0) | (x.numpy() == 0) | (top < 1e-30))


@pytest.mark.parametrize("signed", [True, False])
def test_non_finite_elements_take_the_reserved_code_alone(signed: bool):
    """inf and NaN decode as non-finite values (signed NaN, n +inf) and leave the others'
    scale and codes as without them."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0.5, 1.5, size=3 * MX_BLOCK), dtype=torch.float32)
    if signed:
        x = x * torch.tensor(rng.choice([-1.0, 1.0], size=x.numel()), dtype=torch.float32)
    clean = mx_encode(x, signed)
    x[[MX_BLOCK + 3, MX_BLOCK + 9]] = torch.tensor([float("inf"), float("nan")])
    codes, scales = mx_encode(x, signed)
    got = mx_decode(codes, scales, x.shape, signed=signed)
    want = float("nan") if signed else float("inf")
    assert (torch.isnan(got[[MX_BLOCK + 3, MX_BLOCK + 9]]).all() if signed
            else (got[[MX_BLOCK + 3, MX_BLOCK + 9]] == want).all())
    rest = torch.ones(x.numel(), dtype=torch.bool)
    rest[[MX_BLOCK + 3, MX_BLOCK + 9]] = False
    assert torch.equal(codes[rest], clean[0][rest]) and torch.equal(scales, clean[1])


def test_a_nonzero_second_moment_never_encodes_to_zero():
    """n 1e-12 of its block's largest (two 1e6x outliers' squares beside it) keeps code 1:
    its update is bounded by the code gap, never a division by eps alone."""
    x = torch.full((MX_BLOCK,), 1e-12)
    x[[3, 17]] = 1.0
    for noise in (None, random_noise(x.shape, False)):
        codes, _ = mx_encode(x, False, noise)
        assert (codes >= 1).all()


def test_bf16_nearest_matches_cast_and_stochastic_is_unbiased():
    torch.manual_seed(0)
    x = torch.tensor([1.0 + 2.0**-10, -3.0 - 2.0**-9, 0.0, 1e-40, float("inf"), -float("inf")])
    assert torch.equal(round_to_bf16(x), x.to(torch.bfloat16))
    draws = torch.stack(
        [round_to_bf16(x, torch.randint(0, 65536, x.shape, dtype=torch.int32))
         for _ in range(20000)]
    ).double()
    # bf16 is the top 16 bits of float32: the neighbours truncate the low bits, or step past.
    bits = x.numpy().view(np.int32)
    trunc = bits & np.int32(-65536)
    lo = trunc.view(np.float32).astype(np.float64)
    hi = np.where(bits != trunc, trunc + 65536, trunc).view(np.float32).astype(np.float64)
    d = draws.numpy()
    assert np.all((d == lo) | (d == hi))
    target = x.double().numpy()
    keep = np.isfinite(target)
    stderr = np.abs(hi[keep] - lo[keep]) * 0.5 / np.sqrt(20000)
    assert np.all(np.abs(d.mean(axis=0)[keep] - target[keep]) <= 5 * stderr + 1e-300)
    nan = round_to_bf16(torch.tensor([float("nan")]), torch.tensor([65535], dtype=torch.int32))
    assert torch.isnan(nan).all()


def test_stochastic_rounding_keeps_a_slow_average_moving():
    """n <- 0.99 n + 0.01 * 1.5 from 1: each increment (<= 0.005) is below bf16's spacing."""
    torch.manual_seed(0)
    exact = 1.5 - 0.5 * 0.99**500
    means = {}
    for stochastic in (False, True):
        n = torch.ones(1024)
        for _ in range(500):
            noise = torch.randint(0, 65536, n.shape, dtype=torch.int32) if stochastic else None
            n = round_to_bf16(0.99 * n + 0.01 * 1.5, noise).float()
        means[stochastic] = n.double().mean().item()
    assert means[False] < 1.2  # round-to-nearest stalls far from the target
    assert abs(means[True] - exact) < 2e-3


def slow_ema(steps: int, rounding) -> tuple[float, float]:
    """(mean of n, the float64 mean) for n <- 0.999 n + 0.001 x**2 over ``steps`` steps of
    x = 0.01 + 0.001 * noise, 1024 elements, n stored by ``rounding(n, step)`` each step."""
    gen = torch.Generator().manual_seed(0)
    n = torch.zeros(1024)
    exact = torch.zeros(1024, dtype=torch.float64)
    for step in range(steps):
        x = 0.01 + 0.001 * torch.randn(1024, generator=gen, dtype=torch.float64)
        exact = exact * 0.999 + x * x * 0.001
        n = rounding(n * 0.999 + (x * x).float() * 0.001, step)
    return n.double().mean().item(), exact.mean().item()


def test_slow_average_of_a_small_value_is_unbiased():
    """b3 = 0.999 over 5,000 steps: each increment is 1/1000 of n, 1/125 of a code gap, so
    only stochastic rounding moves n; the 10 random bits keep its mean on float64's."""
    def minifloat(n: torch.Tensor, step: int) -> torch.Tensor:
        word = torch.randint(0, 1 << 30, n.shape, generator=torch.Generator().manual_seed(step))
        return roundtrip(n, False, mx_code(False).noise(word & 0x3FF))

    got, want = slow_ema(5000, minifloat)
    assert abs(got / want - 1) < 2e-3


def test_e4m3_by_bits_is_torchs_float8_conversion():
    """The integer E4M3 encoding (which the C++ kernel and Triton's interpreter repeat, and
    which devices without float8 types run) is torch's ``float8_e4m3fn`` conversion (to
    nearest even, saturated at 448, as the GPU's ``cvt.rn.satfinite`` rounds): on random
    float32 bit patterns of every magnitude, at every code, halfway between codes and one
    float32 step either side; and the decoding gives torch's values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**31 - 1, (1_000_000,), generator=gen).to(torch.int32)
    x = x.view(torch.float32)
    values = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()
    edges = torch.cat([values, (values[:-1] + values[1:]) / 2])
    edges = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, 1e9)),
                       torch.nextafter(edges, torch.full_like(edges, -1e9))])
    x = torch.cat([x[torch.isfinite(x)], edges, torch.tensor([1e30, 3e38, 0.0, -0.0])])
    x = torch.cat([x, -x])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(e4m3_bits(x) & 0xFF, want)
    codes = torch.arange(256).to(torch.uint8).view(torch.int8)
    decoded = mx_decode(codes, torch.full((9,), 135, dtype=torch.uint8), codes.shape,
                        signed=True)  # scale 2**0
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(decoded.nan_to_num(), expected.nan_to_num())
    nan = expected.isnan()
    assert torch.equal(decoded.isnan(), nan)
    assert torch.equal(decoded.signbit()[~nan], expected.signbit()[~nan])  # zeros' too
