"""Single-tensor Adan over any storage format: decode the state, update, encode it again.

The eager path of every format but plain, and the math the CPU compiled kernel compiles.
Every step-dependent scalar travels in one small tensor (:func:`scalar_vector`), so that a
compiled :func:`tensor_step` never bakes a hyperparameter into its code.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import torch
from torch import Tensor

from adan.kernels.common import (
    StepArgs,
    count_step,
    scalars_and_lr,
    step_decision,
    use_tensor_scalars,
)
from adan.numeric.codes import GOLDEN, M32, mix32, mx_rows, round_to_bf16
from adan.numeric.scalars import (
    Scalar,
    bias_corrections,
    decay_factors,
    real_view,
    step_as,
    wide_dtype,
)
from adan.state.formats import BUFFER_KEYS, BUFFERS, INT8, StateFormat, work_dtype

# Positions in the scalar vector.
(FACTOR, B1, OMB1, B2, OMB2, B3, OMB3, IBC1, B2BC2, IBC3, EPS, KEEP, LR, FIRST, STEP) = range(15)


def scalar_vector(step: Scalar, lr: Scalar, args: StepArgs, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The scalars of step ``step`` (already counted) in one tensor of ``dtype``; built without
    host synchronisation when ``step`` or ``lr`` are tensors. Every step-dependent value is
    computed in float64 and rounded once, whether ``step`` and ``lr`` are numbers or tensors,
    so that all paths (and the Triton kernel) see the same scalars."""
    beta1, beta2, beta3 = args.betas
    bc1, bc2, bc3_sqrt = bias_corrections(step, beta1, beta2, beta3)
    if isinstance(lr, Tensor):
        lr = lr.to(device=device, dtype=wide_dtype(device))
    keep, scale = decay_factors(lr, args.weight_decay, args.no_prox)
    values: list[Any] = [-1.0 if args.maximize else 1.0, beta1, 1 - beta1, beta2, 1 - beta2,
                         beta3, 1 - beta3, 1 / bc1, beta2 / bc2, 1 / bc3_sqrt, args.eps, keep,
                         scale, step == 1, step]
    if any(isinstance(x, Tensor) for x in values):
        out = torch.stack([x.to(device=device, dtype=dtype).reshape(()) if isinstance(x, Tensor)
                           else torch.tensor(x, dtype=dtype, device=device) for x in values])
    else:
        out = torch.tensor(values, dtype=dtype, device=device)
    if args.grad_factor is not None:
        out[FACTOR] = out[FACTOR] * args.grad_factor.to(device=device, dtype=dtype)
    return out


# Scalar vectors of recent calls, by their exact inputs: gradient release calls a kernel once
# per tensor, and the tensors of one step share a vector instead of each building its own.
_SCALARS: dict[tuple[Any, ...], Tensor] = {}
_SCALARS_MAX = 64


def shared_scalars(step: Scalar, lr: Scalar, args: StepArgs, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """:func:`scalar_vector` of numbers (no gradient factor), kept for the next call of the
    same values (kernels only read it); keyed by the floats' bits, so 0.0 and -0.0 differ."""
    key = (struct.pack("<7d", step, lr, *args.betas, args.eps, args.weight_decay),
           args.no_prox, args.maximize, dtype, device)
    vector = _SCALARS.get(key)
    if vector is None:
        if len(_SCALARS) >= _SCALARS_MAX:
            _SCALARS.clear()
        vector = _SCALARS[key] = scalar_vector(step, lr, args, dtype, device)
    return vector


def step_vector(step: Scalar, lr: Scalar, args: StepArgs, dtype: torch.dtype,
                device: torch.device, tensor_scalars: bool,
                vectors: dict[tuple[Any, ...], Tensor]) -> Tensor:
    """A fused kernel's scalar vector for one tensor, built as seldom as it can be: anew where
    the scalars stay tensors; with a gradient factor once per step count and dtype of the call
    (``vectors``, the call's own); else kept between calls (:func:`shared_scalars`)."""
    if tensor_scalars:
        return scalar_vector(step, lr, args, dtype, device)
    if args.grad_factor is None:
        return shared_scalars(step, lr, args, dtype, device)
    key = (step, dtype, device)
    if key not in vectors:
        vectors[key] = scalar_vector(step, lr, args, dtype, device)
    return vectors[key]


def adan_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, n: Tensor, prev: Tensor,
                s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One Adan step as a pure function: the new ``(p, m, v, n, prev)`` from decoded values.
    The Triton kernel computes the same expressions in the same order."""
    g = g * s[FACTOR]
    prev = torch.where(s[FIRST] > 0, g, prev)  # g_0 := g_1
    diff = g - prev
    m = m * s[B1] + g * s[OMB1]
    v = v * s[B2] + diff * s[OMB2]
    nesterov = g + diff * s[B2]
    n = n * s[B3] + nesterov * nesterov * s[OMB3]
    denom = rounded_sqrt(n) * s[IBC3] + s[EPS]
    update = (m * s[IBC1] + v * s[B2BC2]) / denom
    return p * s[KEEP] - update * s[LR], m, v, n, g


def rounded_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` correctly rounded (as IEEE's, NumPy's and the Triton kernel's
    ``sqrt_rn``): torch's vectorised float32 square root on CPU may be one unit off in the
    last place, so float32 takes a float64 square root, whose rounding to float32 is exact."""
    if x.dtype == torch.float64 or x.device.type == "mps":
        return torch.sqrt(x)
    return torch.sqrt(x.double()).to(x.dtype)


def noise_word(like: Tensor, seed: Tensor, step: Tensor, word: int) -> Tensor:
    """A random 32-bit word per element of ``like`` (int64 in ``[0, 2**32)``), a function of
    the tensor's seed, the step count, ``word`` and the element's index alone: the same on
    every path, for a resumed run and for a CUDA graph's replay. Words 0 and 1 round the
    state (``StateFormat.noise``), word 2 the parameter. Integer arithmetic only, so a
    compiled step fuses it into its one pass."""
    key = seed ^ mix32(step.to(torch.int64) & M32)
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    return mix32((index + mix32((key + word * GOLDEN) & M32)) & M32)


def tensor_step(p: Tensor, g: Tensor, buffers: list[Tensor], metas: list[Tensor | None],
                s: Tensor, seed: Tensor, fmt: StateFormat, stochastic_param: bool,
                may_skip: bool) -> None:
    """One step of one parameter in place: ``p`` and ``g`` real views, the four buffers (real
    views) with their flat 8-bit block scales or None, ``s`` from :func:`scalar_vector`,
    ``seed`` the state's 0-d int64 seed for stochastic rounding. With ``may_skip`` a
    non-finite gradient factor leaves everything as it was, decided on the device."""
    if fmt is INT8:
        _blocked_step(p, g, buffers, metas, s, seed, stochastic_param, may_skip)
        return
    work = s.dtype
    decoded = [fmt.load(b, meta, p.shape, signed, work)
               for b, meta, (_, signed) in zip(buffers, metas, BUFFERS, strict=True)]
    m, v, n, prev = decoded
    new, *moments = adan_update(p.to(work), g.to(work), m, v, n, prev, s)
    go = torch.isfinite(s[FACTOR]) if may_skip else None
    words = [noise_word(p, seed, s[STEP], w) for w in range(fmt.noise_words)]
    for i, (b, meta, x, (_, signed)) in enumerate(zip(buffers, metas, moments, BUFFERS,
                                                      strict=True)):
        fmt.store(b, meta, x, signed, fmt.noise(words, i), go)
    if stochastic_param and p.dtype == torch.bfloat16:
        noise = noise_word(p, seed, s[STEP], 2)
        new = round_to_bf16(new, (noise & 0xFFFF).to(torch.int32))
    p.copy_(new if go is None else torch.where(go, new.to(p.dtype), p))


def _blocked_step(p: Tensor, g: Tensor, buffers: list[Tensor], metas: list[Tensor | None],
                  s: Tensor, seed: Tensor, stochastic_param: bool, may_skip: bool) -> None:
    """:func:`tensor_step` of 8-bit state, every operand as blocks of the codes (zero-padded
    rows, ``adan.numeric.codes.mx_rows``), so that a compiled step is one loop over blocks
    (over the flat tensor, the blocks' maxima would need loops and temporaries of their own).
    The same bits: the padding is dropped, and element indices (the noise's) are unchanged."""
    work = s.dtype
    scales = [meta for meta in metas if meta is not None]
    pr, gr = (mx_rows(t.reshape(-1).to(work)) for t in (p, g))
    m, v, n, prev = (INT8.load_rows(b, meta, signed).to(work)
                     for b, meta, (_, signed) in zip(buffers, scales, BUFFERS, strict=True))
    new, *moments = adan_update(pr, gr, m, v, n, prev, s)
    go = torch.isfinite(s[FACTOR]) if may_skip else None
    word = noise_word(new, seed, s[STEP], 0)
    for i, (b, meta, x, (_, signed)) in enumerate(zip(buffers, scales, moments, BUFFERS,
                                                      strict=True)):
        INT8.store_rows(b, meta, x, signed, INT8.noise([word], i), go)
    if stochastic_param and p.dtype == torch.bfloat16:
        noise = noise_word(new, seed, s[STEP], 2)
        new = round_to_bf16(new, (noise & 0xFFFF).to(torch.int32))
    new = new.reshape(-1)[: p.numel()].view(p.shape)
    p.copy_(new if go is None else torch.where(go, new.to(p.dtype), p))


_NO_SEED = torch.zeros((), dtype=torch.int64)


def seed_of(state: dict[str, Any]) -> Tensor:
    """The state's stochastic-rounding seed (drawn when its rounding state was created and
    saved with it), or a constant for a step that rounds nothing."""
    seed = state.get("seed")
    return _NO_SEED if seed is None else seed


def step_start(states: list[dict[str, Any]], args: StepArgs
               ) -> tuple[Literal[True] | Tensor, bool, Scalar] | None:
    """What a kernel of this module's step starts from: None when the step is skipped (a
    non-finite gradient factor read on the host); else the decision (True, or a 0-d bool
    tensor applied on the device), whether the step-dependent scalars stay tensors, and the
    lr to use (a float where they don't)."""
    go = step_decision(args)
    if go is False:
        return None
    tensor_scalars = use_tensor_scalars(args.capturable, [s["step"] for s in states])
    return go, tensor_scalars, scalars_and_lr(args.lr, tensor_scalars)


def tensor_views(param: Tensor, grad: Tensor, state: dict[str, Any]
                 ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """The real views :func:`tensor_step` takes for one parameter."""
    buffers = [real_view(state[k]) for k in BUFFER_KEYS]
    metas = [state.get(k + "_exp") for k in BUFFER_KEYS]
    return real_view(param), real_view(grad), buffers, metas


def compact_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one step to every parameter in place, one eager :func:`tensor_step` each."""
    start = step_start(states, args)
    if start is None:
        return
    go, tensor_scalars, lr = start
    may_skip = go is not True
    for param, grad, state in zip(params, grads, states, strict=True):
        p, g, buffers, metas = tensor_views(param, grad, state)
        step: Scalar = (step_as(state["step"], p) + 1 if tensor_scalars
                        else state["step"].item() + 1)
        s = scalar_vector(step, lr, args, work_dtype(param), param.device)
        tensor_step(p, g, buffers, metas, s, seed_of(state), args.fmt, args.stochastic_param,
                    may_skip)
        count_step(state, go)
