"""Compact state rebuilt in float64 NumPy from the formats' documentation (docs/lowmem.md), and a
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
"""Elements per block of the old power codes (loaded only)."""
MX_BLOCK = 32
KEYS = (("exp_avg", True), ("exp_avg_diff", True), ("exp_avg_sq", False), ("prev_grad", True))
HP = dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8)


def levels(signed: bool) -> tuple[int, int]:
    return (127, 3) if signed else (255, 4)


BIAS = {True: 135, False: 142}
"""A block's scale is ``2**(s - BIAS)`` (docs/lowmem.md)."""
LOWEST = {True: 9, False: 16}
RESERVED = {True: 127, False: 248}
"""The level (:func:`code_levels`) of a non-finite value: signed NaN, n +inf."""


def grid(signed: bool) -> np.ndarray:
    """The magnitudes of codes 0, 1, ... over the block scale (docs/lowmem.md): the
    subnormals k/8 * 2**emin, then (1 + j/8) * 2**e per exponent: FP8 E4M3 (emin -6, up to
    448, code 0x7F reserved) for signed buffers, float16's top byte (e5m3: emin -14, up to
    61440, codes from 0xF8 reserved) for n."""
    emin, top = (-6, 127) if signed else (-14, 248)
    values = [k / 8 * 2.0**emin for k in range(8)]
    values += [(1 + j / 8) * 2.0**e for e in range(emin, 16) for j in range(8)]
    return np.array(values[:top])


def code_levels(codes, signed: bool) -> np.ndarray:
    """Stored codes (a tensor or array of int8 or uint8) as integer levels: signed sign and
    magnitude as +-magnitude (negative zero is 0, NaN codes 127), unsigned as they are."""
    k = np.asarray(codes.cpu().numpy() if isinstance(codes, torch.Tensor) else codes)
    k = k.astype(np.int64).ravel() & 0xFF
    if not signed:
        return k
    mag = k & 0x7F
    return np.where(((k & 0x80) != 0) & (mag != 127), -mag, mag)


def _scale_byte(block: np.ndarray, top: float, bias: int, lowest: int, highest: int) -> int:
    """The smallest ``s`` with the block's largest finite magnitude * 2**(bias - s) at most
    ``top``, within [lowest, highest]."""
    biggest = float(np.abs(block[np.isfinite(block)]).max(initial=0.0))
    if biggest == 0:
        return lowest
    s = int(np.ceil(bias + np.log2(biggest / top))) - 1
    while biggest * 2.0 ** (bias - s) > top:
        s += 1
    return min(max(s, lowest), highest)


def block_exponent(block: np.ndarray, signed: bool) -> int:
    """The block's scale byte ``s``: the smallest with (largest finite magnitude) *
    2**(BIAS - s) at most the top code, at least LOWEST."""
    return _scale_byte(block, grid(signed)[-1], BIAS[signed], LOWEST[signed], 255)


def _blockwise(x: np.ndarray, code_block) -> tuple[np.ndarray, np.ndarray]:
    """``code_block(block) -> (codes, s)`` over the blocks of ``x`` (flat, float64): one per
    started block, plus one (a block past the end is empty when none is partial)."""
    flat = x.ravel().astype(np.float64)
    codes = np.zeros(flat.size, dtype=np.int64)
    exps = []
    for start in range(0, flat.size + 1, MX_BLOCK):
        block = flat[start:start + MX_BLOCK]
        k, s = code_block(block)
        codes[start:start + block.size] = k
        exps.append(s)
    return codes, np.array(exps)


def grid_v2(signed: bool) -> np.ndarray:
    """Version 2's code magnitudes over its scale ``2**(s - 128)`` (two's complement e4m3 up
    to 3.75, -128 reserved; e5m3 up to 3.5, 255 reserved)."""
    mb, emin = (3, -13) if signed else (3, -29)
    steps = 2**mb
    values = [k / steps * 2.0**emin for k in range(steps)]
    values += [(1 + j / steps) * 2.0**e for e in range(emin, 2) for j in range(steps)]
    return np.array(values[:128] if signed else values[:255])


def decode(state: dict, key: str, signed: bool, shape: tuple[int, ...]) -> np.ndarray:
    """A buffer as float64: codes mean sign * grid[level] * 2**(s - BIAS) (NaN, +inf reserved);
    version 2 (``int8_codes == 2``) sign * grid_v2[|k|] * 2**(s - 128); old power codes
    scale*(k/127)^3 (signed) or scale*(k/255)^4, except each block's top element, stored
    exactly in its meta row (scale, top, position)."""
    if key + "_exp" in state:
        s = np.repeat(state[key + "_exp"].cpu().numpy().astype(np.int64), MX_BLOCK)
        if state.get("int8_codes") == 2:
            k = state[key].cpu().numpy().astype(np.int64).ravel()
            g, bias, reserved = grid_v2(signed), 128, (-128 if signed else 255)
        else:
            k = code_levels(state[key], signed)
            g, bias, reserved = grid(signed), BIAS[signed], RESERVED[signed]
        s = s[: k.size]
        special = k == reserved
        values = np.sign(k) * g[np.where(special, 0, np.abs(k))] * 2.0 ** (s - bias)
        values[special] = np.nan if signed else np.inf
        return values.reshape(shape)
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
    """Nearest code per element as levels (:func:`code_levels`; ties: signed to the even
    code, n away from zero) and the blocks' scale bytes (one per started block, plus one; a
    block past the end has LOWEST); a non-finite element takes the reserved level and a
    nonzero n at least 1."""
    g = grid(signed)

    def code_block(block: np.ndarray) -> tuple[np.ndarray, int]:
        s = block_exponent(block, signed)
        with np.errstate(invalid="ignore"):
            t = np.abs(block) * 2.0 ** (BIAS[signed] - s)
        hi = np.clip(np.searchsorted(g, t), 1, g.size - 1)
        below, above = t - g[hi - 1], g[hi] - t
        if signed:
            k = np.where(below < above, hi - 1, np.where(below > above, hi, hi - hi % 2))
        else:
            k = np.maximum(np.where(below >= above, hi, hi - 1), block > 0)
        k = np.where(block < 0, -k, k)
        return np.where(np.isfinite(block), k, RESERVED[signed]), s

    return _blockwise(x, code_block)


def encode_v2(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Version 2's nearest codes (ties away from zero; signed subnormal codes towards zero)
    and scale bytes (finite values only), as its checkpoints hold them."""
    g = grid_v2(signed)

    def code_block(block: np.ndarray) -> tuple[np.ndarray, int]:
        s = _scale_byte(block, g[-1], 128, 2, 254)
        t = np.abs(block) * 2.0 ** (128 - s)
        hi = np.clip(np.searchsorted(g, t), 1, g.size - 1)
        k = np.where(t - g[hi - 1] >= g[hi] - t, hi, hi - 1)
        if signed:
            k = np.where(t < g[8], np.floor(t / g[1]).astype(np.int64), k)
        else:
            k = np.maximum(k, block > 0)
        return np.where(block < 0, -k, k), s

    return _blockwise(x, code_block)


def encode_power(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The old power codes (what checkpoints of before hold): nearest code per element (ties
    down) and the meta rows: per 256-block the scale (the largest magnitude but the top's),
    the top (largest magnitude, first of equals) and its position; a block past the end
    (none partial) has meta (0, 0, 0)."""
    top, power = levels(signed)
    flat = x.ravel()
    codes = np.zeros(flat.size, dtype=np.int64)
    meta = []
    grid_ = (np.arange(top + 1) / top) ** power
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
        hi = np.clip(np.searchsorted(grid_, t), 1, top)
        k = np.where(t - grid_[hi - 1] > grid_[hi] - t, hi, hi - 1)
        k[pos] = 0
        codes[start:start + block.size] = k * np.sign(block)
        meta.append((scale, block[pos], pos))
    return codes, np.array(meta)


def assert_rounds(state: dict, key: str, signed: bool, want: np.ndarray,
                  terms: np.ndarray | float = 0.0) -> None:
    """The stored buffer holds ``want`` rounded to one of its two neighbouring code values,
    or, signed, zero below E4M3's normal range (``2**-6`` of the scale: m and v, rounded
    stochastically, are zero there). ``terms``: the magnitudes of what the kernel added up in
    float32 to make ``want``, whose rounding (2**-22 of them) can exceed a bf16 spacing of a
    result that nearly cancels."""
    if key + "_exp" not in state:  # bfloat16: within one bf16 spacing (2**-7 relative)
        got = state[key].double().cpu().numpy().reshape(want.shape)
        assert np.all(np.abs(got - want) <= 2.0**-7 * np.abs(want) + 2.0**-22 * terms), key
        return
    codes, exps = encode(want, signed)
    # float32 rounding of the kernel's sums may move a block's largest value over a binade
    exps_got = state[key + "_exp"].cpu().numpy().astype(np.int64)
    assert np.abs(exps_got - exps).max() <= 1 and (exps_got != exps).mean() <= 0.01, key
    same = np.repeat(exps_got == exps, MX_BLOCK)[: codes.size]
    got = code_levels(state[key], signed)
    diff = np.abs(got - codes)
    if signed:
        unit = 2.0 ** (np.repeat(exps_got, MX_BLOCK)[: codes.size] - BIAS[signed])
        diff[(got == 0) & (np.abs(want.ravel()) < 2.0**-6 * unit)] = 0
    assert diff[same].max(initial=0) <= 1, key


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


OUTLIER_BLOCK = range(288, 320)
"""The 32-block of a 512-element tensor that takes the outliers."""


def outlier_distances(make_opt, device: str, count: int, scale: float, steps: int = 50
                      ) -> dict[str, np.ndarray]:
    """|p_T - p_0| of every element after ``steps`` steps with fp32 and 8-bit state, where
    ``count`` elements of one 32-block take gradients ``scale`` times the others' (each
    element's gradient keeps its sign, so that every element moves steadily); checks that a
    nonzero second moment never decodes to zero. ``make_opt(params, state_dtype)``."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(512, generator=gen).sign() * torch.rand(512, generator=gen).add(0.5)
    outliers = list(OUTLIER_BLOCK)[12:12 + count]
    distances = {}
    for fmt in ("fp32", "int8"):
        torch.manual_seed(0)
        p = torch.zeros(512, device=device)
        opt = make_opt([p], fmt)
        for k in range(steps):
            g = direction * (1 + 0.3 * torch.randn(512, generator=torch.Generator().manual_seed(k)))
            g[outliers] *= scale
            p.grad = g.to(device)
            opt.step()
            if fmt == "int8":
                n = decode(opt.state[p], "exp_avg_sq", False, (512,))
                assert np.all(n > 0), "a nonzero second moment decoded to zero"
        distances[fmt] = p.abs().double().cpu().numpy()
    return {"ratio": distances["int8"] / distances["fp32"],
            "outlier": np.isin(np.arange(512), outliers)}


def spike_finals(make_opt, device: str, spike: float) -> dict[str, torch.Tensor]:
    """The parameters after 4 steps with fp32 and 8-bit state where element 300 takes the
    gradient ``spike`` (inf, NaN) at the second step."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(512, generator=gen) for _ in range(4)]
    finals = {}
    for fmt in ("fp32", "int8"):
        torch.manual_seed(0)
        p = torch.zeros(512, device=device)
        opt = make_opt([p], fmt)
        for k, g in enumerate(grads):
            p.grad = g.clone().to(device)
            if k == 1:
                p.grad[300] = spike
            opt.step()
        finals[fmt] = p.cpu()
    return finals
