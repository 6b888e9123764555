"""Compact state rebuilt in float64 NumPy from the formats' documentation (adan.quant), and a
check of one compact-state kernel against the float64 reference Adan applying the same codes.

Shared by the tests of every kernel that stores compact state (compact, CPU compiled, Triton).
"""

from __future__ import annotations

import numpy as np
import torch
from reference import ReferenceAdan, RefGroup, RefState

from adan.kernels.common import StepArgs
from adan.state.formats import FORMATS
from adan.state.lifecycle import init_state

BLOCK = 256
KEYS = (("exp_avg", True), ("exp_avg_diff", True), ("exp_avg_sq", False), ("prev_grad", True))
HP = dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8)


def levels(signed: bool) -> tuple[int, int]:
    return (127, 3) if signed else (255, 4)


def decode(state: dict, key: str, signed: bool, shape: tuple[int, ...]) -> np.ndarray:
    """A buffer as float64: codes k mean scale*(k/127)^3 (signed) or scale*(k/255)^4, except
    each block's top element, stored exactly in its meta row (scale, top, position)."""
    if key + "_meta" not in state:
        return state[key].double().cpu().numpy().reshape(shape)
    top, power = levels(signed)
    k = state[key].cpu().numpy().astype(np.float64).ravel()
    meta = state[key + "_meta"].double().cpu().numpy().reshape(-1, 3)
    values = np.repeat(meta[:, 0], BLOCK)[: k.size] * (k / top) ** power
    for b, (_, value, pos) in enumerate(meta):
        if b * BLOCK + int(pos) < k.size:
            values[b * BLOCK + int(pos)] = value
    return values.reshape(shape)


def encode(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest code per element (ties down) and the meta rows: per 256-block the scale (the
    largest magnitude but the top's), the top (largest magnitude, first of equals) and its
    position; a block past the end (none partial) has meta (0, 0, 0)."""
    top, power = levels(signed)
    flat = x.ravel()
    codes = np.zeros(flat.size, dtype=np.int64)
    meta = []
    grid = (np.arange(top + 1) / top) ** power
    for start in range(0, flat.size + 1, BLOCK):
        block = flat[start:start + BLOCK]
        if block.size == 0:
            meta.append((0.0, 0.0, 0.0))
            continue
        pos = int(np.argmax(np.abs(block)))
        rest = np.abs(block)
        rest[pos] = 0
        scale = float(np.float32(rest.max()))
        t = rest / scale if scale > 0 else np.zeros_like(rest)
        hi = np.clip(np.searchsorted(grid, t), 1, top)
        k = np.where(t - grid[hi - 1] > grid[hi] - t, hi, hi - 1)
        k[pos] = 0
        codes[start:start + block.size] = k * np.sign(block)
        meta.append((scale, block[pos], pos))
    return codes, np.array(meta)


def assert_codes_close(got: torch.Tensor, want: np.ndarray, mismatch: float = 0.01) -> None:
    """Codes agree within one level, and differ in at most ``mismatch`` of the elements
    (rounding boundaries; stochastic rounding picks either neighbour: pass 1.0)."""
    diff = np.abs(got.cpu().numpy().astype(np.int64).ravel() - want)
    assert diff.max(initial=0) <= 1 and (diff > 0).mean() <= mismatch


def assert_rounds(state: dict, key: str, signed: bool, want: np.ndarray,
                  terms: np.ndarray | float = 0.0) -> None:
    """The stored buffer holds ``want`` rounded to one of its two neighbouring code values.
    ``terms``: the magnitudes of what the kernel added up in float32 to make ``want``, whose
    rounding (2**-22 of them) can exceed a bf16 spacing of a result that nearly cancels."""
    if key + "_meta" not in state:  # bfloat16: within one bf16 spacing (2**-7 relative)
        got = state[key].double().cpu().numpy().reshape(want.shape)
        assert np.all(np.abs(got - want) <= 2.0**-7 * np.abs(want) + 2.0**-22 * terms), key
        return
    codes, meta = encode(want, signed)
    assert_codes_close(state[key], codes, mismatch=1.0)
    got = state[key + "_meta"].double().cpu().numpy().reshape(-1, 3)
    np.testing.assert_array_equal(got[:, 2], meta[:, 2], err_msg=key)
    np.testing.assert_allclose(got[:, :2], meta[:, :2], rtol=1e-5, atol=1e-30, err_msg=key)


def mixed_gradient(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gradients whose magnitudes span four decades."""
    return rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 1, size=shape)


def check_kernel_step(kernel, fmt: str, device: str, shape: tuple[int, ...], no_prox: bool,
                      factor: float | None, maximize: bool, steps: int = 4,
                      gradient=mixed_gradient) -> None:
    """Run ``kernel`` for ``steps`` on one tensor; after each, the parameter must equal the
    float64 reference applied to the decoded state of the step before, and every buffer must
    hold the reference's new value stochastically rounded to its format."""
    rng = np.random.default_rng(0)
    p = torch.tensor(rng.normal(size=shape), dtype=torch.float32, device=device)
    state = init_state(p, FORMATS[fmt])
    lr, wd = 0.01, 0.05
    for k in range(1, steps + 1):
        g = torch.tensor(gradient(rng, shape), dtype=torch.float32, device=device)
        rs = RefState(k=k - 1, **{name: decode(state, key, signed, shape) for name, (key, signed)
                                  in zip(("m", "v", "n", "prev"), KEYS, strict=True)})
        m_old, v_old, n_old = np.abs(rs.m), np.abs(rs.v), np.abs(rs.n)
        prev = np.abs(rs.prev if k > 1 else g.double().cpu().numpy() * (factor or 1.0))
        group = RefGroup([p.double().cpu().numpy()], lr=lr,
                         betas=(HP["beta1"], HP["beta2"], HP["beta3"]), eps=HP["eps"],
                         weight_decay=wd, no_prox=no_prox, maximize=maximize)
        group.states = [rs]
        ReferenceAdan([group]).step([[g.double().cpu().numpy() * (factor or 1.0)]])
        args = StepArgs(lr=lr, weight_decay=wd, no_prox=no_prox, maximize=maximize,
                        fmt=FORMATS[fmt],
                        grad_factor=None if factor is None else torch.tensor(factor,
                                                                             device=device),
                        **HP)
        kernel([p], [g], [state], args)
        assert state["step"].item() == k
        np.testing.assert_allclose(p.double().cpu().numpy(), group.params[0], rtol=1e-5,
                                   atol=1e-7)
        g64 = np.abs(g.double().cpu().numpy()) * (factor or 1.0)
        sizes = (m_old + g64, v_old + g64 + prev, n_old + (g64 + prev) ** 2, 0.0)
        for (key, signed), want, terms in zip(KEYS, (rs.m, rs.v, rs.n, rs.prev), sizes,
                                              strict=True):
            assert_rounds(state, key, signed, want, terms)
