"""Single-tensor Adan over any storage format: decode the state, update, encode it again.

The reference for state stored in another dtype than the parameter's (``"fp32"`` for bf16,
fp16 or fp64 parameters, ``"bf16"``, ``"int8"``; see :mod:`adan.state`), and the math that the
CPU compiled kernel compiles for every format. The update itself uses the freshly computed
full-precision moments; rounding only affects what is carried to the next step. Compact
formats re-encode with stochastic rounding: Adan's averages move by 1-8 % of their value per
step, less than a bf16 or 8-bit step, so round-to-nearest would freeze them, while stochastic
rounding keeps every average unbiased at no memory cost.

Every step-dependent scalar travels in one small tensor (:func:`scalar_vector`), so a
compiled version of :func:`tensor_step` never bakes a hyperparameter into its code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import (
    BUFFER_KEYS,
    BUFFERS,
    Scalar,
    StepArgs,
    bias_corrections,
    real_view,
    scalars_and_lr,
    skip_step,
    step_as,
    use_tensor_scalars,
)
from adan.quant import dequantize_blockwise, quantize_blockwise_flat, round_to_bf16
from adan.state import work_dtype

# Positions in the scalar vector.
(FACTOR, B1, OMB1, B2, OMB2, B3, OMB3, IBC1, B2BC2, IBC3, EPS, KEEP, LR, FIRST) = range(14)


def scalar_vector(step: Scalar, lr: Scalar, args: StepArgs, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The scalars of step ``step`` (already counted) in one tensor; built without host
    synchronisation when ``step`` or ``lr`` are tensors."""
    beta1, beta2, beta3 = args.betas
    bc1, bc2, bc3_sqrt = bias_corrections(step, beta1, beta2, beta3)
    if args.no_prox:
        keep, scale = 1 - lr * args.weight_decay, lr
    else:
        keep = 1 / (1 + lr * args.weight_decay)
        scale = lr * keep
    values: list[Any] = [-1.0 if args.maximize else 1.0, beta1, 1 - beta1, beta2, 1 - beta2,
                         beta3, 1 - beta3, 1 / bc1, beta2 / bc2, 1 / bc3_sqrt, args.eps, keep,
                         scale, step == 1]
    if any(isinstance(x, Tensor) for x in values):
        out = torch.stack([torch.as_tensor(x, device=device).to(dtype).reshape(())
                           for x in values])
    else:
        out = torch.tensor(values, dtype=dtype, device=device)
    if args.grad_factor is not None:
        out[FACTOR] = out[FACTOR] * args.grad_factor.to(device=device, dtype=dtype)
    return out


def adan_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, n: Tensor, prev: Tensor,
                s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One Adan step as a pure function: the new ``(p, m, v, n, prev)`` from decoded values."""
    g = g * s[FACTOR]
    prev = torch.where(s[FIRST] > 0, g, prev)  # g_0 := g_1
    diff = g - prev
    m = m * s[B1] + g * s[OMB1]
    v = v * s[B2] + diff * s[OMB2]
    nesterov = g + diff * s[B2]
    n = n * s[B3] + nesterov * nesterov * s[OMB3]
    denom = torch.sqrt(n) * s[IBC3] + s[EPS]
    update = (m * s[IBC1] + v * s[B2BC2]) / denom
    return p * s[KEEP] - update * s[LR], m, v, n, g


def random_bits(like: Tensor, seed: Tensor, stream: int) -> Tensor:
    """16 pseudo-random bits per element of ``like`` (int32 in ``[0, 65536)``): an integer hash
    of (seed, stream, element index). Elementwise integer arithmetic, so a compiled step fuses
    it into its one pass, where drawing from torch's generator per element would cost more than
    the whole update; the seed (below 2**31) comes from torch's generator at every step."""
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    x = (index + seed * 40503 + stream * 0x5BD1E995) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (((x >> 16) ^ x) & 0xFFFF).to(torch.int32)


def _store(buffer: Tensor, meta: Tensor | None, x: Tensor, fmt: str, signed: bool,
           noise: Tensor | None) -> None:
    """Encode ``x`` into ``buffer`` (and its block ``meta``) in format ``fmt``; ``noise``
    (:func:`random_bits`) rounds stochastically."""
    if meta is not None:
        uniform = None if noise is None else (noise.to(x.dtype) + 0.5) / 65536
        codes, new_meta = quantize_blockwise_flat(x, signed=signed, noise=uniform)
        buffer.copy_(codes.view(buffer.shape))
        meta.copy_(new_meta)
    elif fmt == "bf16":
        buffer.copy_(round_to_bf16(x, noise).view(buffer.shape))
    else:
        buffer.copy_(x.view(buffer.shape))


def tensor_step(p: Tensor, g: Tensor, buffers: list[Tensor], metas: list[Tensor | None],
                s: Tensor, seed: Tensor, fmt: str, stochastic_param: bool) -> None:
    """One step of one parameter in place: ``p`` and ``g`` real views, the four buffers (real
    views) with their flat 8-bit block data or None, ``s`` from
    :func:`scalar_vector`, ``seed`` a 0-d int64 tensor for stochastic rounding
    (:func:`draw_seed`)."""
    work = s.dtype
    decoded = [
        dequantize_blockwise(b, meta, p.shape, signed=signed, dtype=work) if meta is not None
        else b.to(work).view(p.shape)
        for b, meta, (_, signed) in zip(buffers, metas, BUFFERS, strict=True)
    ]
    m, v, n, prev = decoded
    new, *moments = adan_update(p.to(work), g.to(work), m, v, n, prev, s)
    stochastic = fmt in ("bf16", "int8")
    for stream, (b, meta, x, (_, signed)) in enumerate(zip(buffers, metas, moments, BUFFERS,
                                                           strict=True)):
        _store(b, meta, x, fmt, signed, random_bits(x, seed, stream) if stochastic else None)
    if stochastic_param and p.dtype == torch.bfloat16:
        p.copy_(round_to_bf16(new, random_bits(new, seed, 4)))
    else:
        p.copy_(new)


_NO_SEED = torch.zeros((), dtype=torch.int64)


def draw_seed(param: Tensor, args: StepArgs) -> Tensor:
    """A seed for one tensor's stochastic rounding in one step, from torch's generator (so that
    ``torch.manual_seed`` reproduces a run), as a 0-d int64 CPU tensor; a constant where
    nothing rounds stochastically, so that, as with AdamW, the step leaves the generator (and
    so the user's dropout masks and sampling) untouched."""
    if args.rounds_stochastically(param.dtype):
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    return _NO_SEED


def step_scalars(states: list[dict[str, Any]], args: StepArgs) -> tuple[bool, Scalar]:
    """Whether the step's scalars stay tensors, and the lr to use (a float where they don't)."""
    tensor_scalars = use_tensor_scalars(args.capturable, [s["step"] for s in states])
    return tensor_scalars, scalars_and_lr(args.lr, tensor_scalars)


def tensor_views(param: Tensor, grad: Tensor, state: dict[str, Any]
                 ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """The real views :func:`tensor_step` takes for one parameter."""
    buffers = [real_view(state[k]) for k in BUFFER_KEYS]
    metas = [state.get(k + "_meta") for k in BUFFER_KEYS]
    return real_view(param), real_view(grad), buffers, metas


def compact_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs
) -> None:
    """Apply one step to every parameter in place, one eager :func:`tensor_step` each."""
    if skip_step(args):
        return
    tensor_scalars, lr = step_scalars(states, args)
    for param, grad, state in zip(params, grads, states, strict=True):
        p, g, buffers, metas = tensor_views(param, grad, state)
        step: Scalar = (step_as(state["step"], p) + 1 if tensor_scalars
                        else state["step"].item() + 1)
        s = scalar_vector(step, lr, args, work_dtype(param), param.device)
        tensor_step(p, g, buffers, metas, s, draw_seed(p, args), args.fmt,
                    args.stochastic_param)
        state["step"] += 1
