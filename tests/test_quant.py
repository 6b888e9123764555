"""Blockwise 8-bit codes and bf16 rounding against grids rebuilt here in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adan.numeric.codes import dequantize_blockwise, quantize_blockwise, round_to_bf16

BLOCK = 256


def grid(signed: bool) -> np.ndarray:
    """All code values for scale 1, from the documented formulas (k/127)^3 and (k/255)^4."""
    if signed:
        return (np.arange(-127, 128) / 127.0) ** 3
    return (np.arange(0, 256) / 255.0) ** 4


def block_scale(x: np.ndarray) -> np.ndarray:
    """Each element's block scale: the largest magnitude in its 256-block other than the
    block's top (its largest, first of equals), which is kept exactly instead."""
    flat = np.abs(x.reshape(-1))
    out = np.empty_like(flat)
    for start in range(0, flat.size, BLOCK):
        block = flat[start:start + BLOCK].copy()
        block[np.argmax(block)] = 0
        out[start:start + BLOCK] = block.max()
    return out


def neighbours(t: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The grid values just below and above each normalised value ``t``."""
    g = grid(signed)
    hi_i = np.clip(np.searchsorted(g, t, side="left"), 1, g.size - 1)
    return g[hi_i - 1], g[hi_i]


def roundtrip(x: torch.Tensor, signed: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
    codes, scale = quantize_blockwise(x, signed=signed, noise=noise)
    return dequantize_blockwise(codes, scale, x.shape, signed=signed)


def mixed_blocks(n_blocks: int, seed: int) -> torch.Tensor:
    """Blocks whose magnitudes span many decades, with a spread of values inside each."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-20, 20, size=(n_blocks, 1))
    inner = rng.normal(size=(n_blocks, BLOCK)) * 10.0 ** rng.uniform(-4, 0, size=(n_blocks, BLOCK))
    return torch.tensor((scales * inner).reshape(-1), dtype=torch.float32)


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 1500), seed=st.integers(0, 10_000), signed=st.booleans())
def test_nearest_roundtrip_within_half_a_grid_step(numel: int, seed: int, signed: bool):
    x = mixed_blocks(-(-numel // BLOCK), seed)[:numel]
    if not signed:
        x = x.abs()
    got = roundtrip(x, signed).double().numpy()
    xs = x.double().numpy()
    scale = block_scale(xs)
    t = np.divide(xs, scale, out=np.zeros_like(xs), where=scale > 0)
    lo, hi = neighbours(t, signed)
    bound = 0.5 * (hi - lo) * scale * (1 + 1e-5) + 1e-6 * np.abs(xs)
    assert np.all(np.abs(got - xs) <= bound)
    # Each block's largest element is represented exactly (its top).
    for start in range(0, numel, BLOCK):
        i = start + int(np.argmax(np.abs(xs[start:start + BLOCK])))
        assert got[i] == xs[i]


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(signed: bool):
    torch.manual_seed(0)
    base = torch.linspace(0.001, 0.9, BLOCK - 2)
    x = torch.cat([base, torch.ones(2)])  # the top is 1 and the scale 1, so t = x
    if signed:
        x = x * torch.where(torch.arange(BLOCK) % 2 == 0, 1.0, -1.0)
    draws = torch.stack([roundtrip(x, signed, torch.rand(BLOCK)) for _ in range(4000)]).double()
    xs = x.double().numpy()
    lo, hi = neighbours(np.abs(xs), signed)
    sign = np.sign(xs)
    d = draws.numpy()
    on_grid = np.isclose(d, sign * lo, rtol=1e-6, atol=0) | np.isclose(d, sign * hi, rtol=1e-6,
                                                                       atol=0)
    assert on_grid.all()
    # Mean of 4000 Bernoulli picks between neighbours: within 5 standard errors of x.
    stderr = (hi - lo) * 0.5 / np.sqrt(4000)
    assert np.all(np.abs(d.mean(axis=0) - xs) <= 5 * stderr + 1e-7)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "values",
    [
        np.zeros(BLOCK),
        np.full(BLOCK, 3.0e38),
        np.full(BLOCK, -7.5),
        np.full(BLOCK, 1e-42),  # subnormal
        np.linspace(-1e38, 3e38, BLOCK),
        np.concatenate([np.full(BLOCK - 1, 1e-30), [1e30]]),
        np.concatenate([np.zeros(BLOCK), np.full(10, 2.5)]),
    ],
    ids=["zero", "huge", "constant", "tiny", "huge-range", "outlier", "zero-then-partial"],
)
def test_special_blocks_stay_finite(values: np.ndarray, signed: bool):
    x = torch.tensor(values, dtype=torch.float32)
    if not signed:
        x = x.abs()
    for noise in (None, torch.rand(x.numel())):
        codes, meta = quantize_blockwise(x, signed=signed, noise=noise)
        got = dequantize_blockwise(codes, meta, x.shape, signed=signed)
        assert torch.isfinite(got).all() and torch.isfinite(meta).all()
        xs = x.double().numpy()
        err = np.abs(got.double().numpy() - xs)
        assert np.all(err <= block_scale(xs) * 0.03 + 1e-45)
    if np.ptp(np.abs(x.numpy())) == 0:  # constant magnitude: exact
        assert torch.equal(got, x)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("spike", [float("inf"), float("nan"), 1e30, 1e6])
def test_one_spike_does_not_spread_to_its_block(spike: float, signed: bool):
    """A non-finite or huge element is stored exactly, as float32 would store it; its 255
    neighbours keep their usual precision (they would all round to 0 against its scale)."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0.5, 1.5, size=3 * BLOCK), dtype=torch.float32)
    if signed:
        x = x * torch.tensor(rng.choice([-1.0, 1.0], size=x.numel()), dtype=torch.float32)
    x[BLOCK + 17] = spike
    for noise in (None, torch.rand(x.numel())):
        codes, meta = quantize_blockwise(x, signed=signed, noise=noise)
        got = dequantize_blockwise(codes, meta, x.shape, signed=signed)
        assert torch.equal(got[BLOCK + 17:BLOCK + 18], x[BLOCK + 17:BLOCK + 18]) or (
            np.isnan(spike) and torch.isnan(got[BLOCK + 17]))
        others = torch.ones(x.numel(), dtype=torch.bool)
        others[BLOCK + 17] = False
        rel = (got[others] - x[others]).abs() / x[others].abs()
        assert torch.isfinite(got[others]).all() and rel.max() < 0.1


def test_a_second_non_finite_element_in_a_block_is_coded_as_zero():
    x = torch.ones(BLOCK)
    x[3], x[9] = float("inf"), float("nan")
    codes, meta = quantize_blockwise(x, signed=True)
    got = dequantize_blockwise(codes, meta, x.shape, signed=True)
    assert got[3] == float("inf") and got[9] == 0  # the first non-finite one is the top
    rest = torch.ones(BLOCK, dtype=torch.bool)
    rest[[3, 9]] = False
    assert torch.equal(got[rest], x[rest])


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
