"""A parameter's state over its life: created, seeded, converted between formats, checked.

A state is ``step`` (a 0-d float tensor on the parameter's device) and four buffers stored in
a :class:`~adan.state.formats.StateFormat`. State that rounds stochastically also keeps
``seed``, a 0-d int64 tensor made once and saved with it: rounding noise is a function of
(seed, step count, element) alone, so every path, a resumed run and a graph replay agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adan.numeric.codes import GOLDEN, M32, mix32
from adan.numeric.scalars import real_view
from adan.state.dtensor import local
from adan.state.formats import BLOCK_SUFFIXES, BUFFERS, CODES_KEY, StateFormat, decode

__all__ = ["convert_state", "init_state", "rounding_seed",
           "rounds_stochastically", "shape_mismatch", "state_bytes", "step_dtype"]


def step_dtype() -> torch.dtype:
    """The dtype of step counts: float64 when that is torch's default dtype, as torch's own
    optimizers do, else float32 (exact up to 2**24 steps)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_state(param: Tensor, fmt: StateFormat) -> dict[str, Any]:
    """Zeroed state for ``param`` in format ``fmt``, the step count on the parameter's device."""
    return {"step": torch.zeros((), dtype=step_dtype(), device=param.device),
            **fmt.new_buffers(param), **fmt.records}


def rounds_stochastically(param: Tensor, fmt: StateFormat, stochastic_param: bool) -> bool:
    """Whether a step of ``param`` rounds anything stochastically (compact state, or a
    bfloat16 parameter written with stochastic rounding): such a state keeps a seed."""
    return fmt.rounds or (stochastic_param and real_view(param).dtype == torch.bfloat16)


def rounding_seed(base: int, index: int, device: torch.device) -> Tensor:
    """The stochastic-rounding seed of the optimizer's ``index``-th parameter, as a 0-d int64
    tensor on ``device``: a hash of the optimizer's base seed (drawn once from torch's
    generator) and the index, so that it does not depend on the order in which states are
    created (gradient release creates them in backward's order)."""
    value = int(mix32((base + index * GOLDEN) & M32)) & 0x7FFFFFFF
    return torch.full((), value, dtype=torch.int64, device=device)


def shape_mismatch(state: dict[str, Any], param: Tensor) -> str | None:
    """Why ``state`` cannot belong to ``param`` (it was made for another shape), or None."""
    buffer = state.get("exp_avg")
    if not isinstance(buffer, Tensor):
        return None
    if any("exp_avg" + suffix in state for suffix in BLOCK_SUFFIXES):
        param = local(param)  # 8-bit codes belong to the local shard
    if tuple(real_view(buffer).shape) == tuple(real_view(param).shape):
        return None
    return (f"its state was made for shape {tuple(buffer.shape)} but the parameter now has "
            f"shape {tuple(param.shape)}; a reshaped or resized parameter needs fresh state "
            "(del optimizer.state[param])")


def device_mismatch(state: dict[str, Any], param: Tensor) -> str | None:
    """Which tensor of ``state`` is not on ``param``'s device, or None (a fused kernel reads
    every state tensor's address on the parameter's device)."""
    device = local(param).device
    for key, value in state.items():
        if isinstance(value, Tensor) and local(value).device != device:
            return (f"its state's {key!r} is on {local(value).device}, not on the parameter's "
                    f"device {device}; move it there (or del optimizer.state[param])")
    return None


def convert_state(state: dict[str, Any], param: Tensor, fmt: StateFormat) -> None:
    """Re-encode ``state``'s buffers in place into format ``fmt``, rounding to nearest
    (deterministic; a state already in ``fmt`` is left untouched; 8-bit codes of an older
    kind are decoded and encoded again). For a DTensor parameter
    each rank converts its shard: 8-bit codes belong to the shard, other buffers are DTensors
    laid out like the parameter."""
    if "exp_avg" not in state or fmt.matches(state, param):
        return
    shard = local(param)
    view = {k: local(v) for k, v in state.items()}  # as it was: the loop rewrites ``state``
    for key, signed in BUFFERS:
        value = decode(view, key, signed, shard, torch.float64)
        for suffix in BLOCK_SUFFIXES:
            state.pop(key + suffix, None)
        for suffix, new in fmt.encode(value, shard, signed).items():
            if shard is not param and not fmt.quantized:
                sharded: Any = param
                new = type(param).from_local(  # type: ignore[attr-defined]
                    new, sharded.device_mesh, sharded.placements, shape=param.shape,
                    stride=param.stride())
            state[key + suffix] = new
    state.pop(CODES_KEY, None)
    state.update(fmt.records)


def state_bytes(states: list[dict[str, Any]]) -> int:
    """Bytes held by the buffers of the given per-parameter states (the step count excluded)."""
    return sum(v.numel() * v.element_size() for s in states for k, v in s.items()
               if k not in ("step", "seed") and isinstance(v, Tensor))
