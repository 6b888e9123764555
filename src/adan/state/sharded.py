"""DTensor parameters' state (FSDP2, tensor parallelism): each rank updates its own shard.

Buffers of a DTensor parameter are DTensors laid out like it, except 8-bit codes, which
belong to the local shard and are saved dequantised, so that ``torch.distributed.checkpoint``
can reshard them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adan.state.dtensor import DTensor, is_dtensor
from adan.state.formats import BLOCK_SUFFIXES, BUFFER_KEYS, BUFFERS, CODES_KEY, StateFormat, decode
from adan.state.lifecycle import init_state

__all__ = ["check_loaded_sharding", "dequantize_for_saving", "init_sharded_state",
           "local_views", "localize"]


def _local(t: Tensor, param: Tensor, name: str) -> Tensor:
    """``t``'s local shard, laid out like ``param``'s (only a gradient may be redistributed)."""
    if not is_dtensor(param):
        return t
    if not is_dtensor(t):
        raise ValueError(
            f"Adan {name} is a plain tensor but its parameter is a DTensor; load sharded state "
            "with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
        )
    if (t.device_mesh, t.placements) != (param.device_mesh, param.placements):
        if name != "grads":
            raise ValueError(
                f"Adan {name} has placements {t.placements} but its parameter has "
                f"{param.placements}; they must match"
            )
        t = t.redistribute(param.device_mesh, param.placements)
    return t.to_local()


def local_views(param: Tensor, grad: Tensor, state: dict[str, Any]
                ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The local shards a kernel updates for a DTensor ``param``: its shard, its gradient's
    shard laid out like it, and the state with every DTensor replaced by its shard (a view,
    so the kernel's in-place writes land in the DTensors). Plain tensors pass unchanged."""
    if not is_dtensor(param):
        return param, grad, state
    local = {k: _local(v, param, k) if k in BUFFER_KEYS and "exp_avg_exp" not in state else v
             for k, v in state.items()}
    return param.to_local(), _local(grad, param, "grads"), local


def init_sharded_state(param: DTensor, fmt: StateFormat) -> dict[str, Any]:
    """Zeroed state for a DTensor parameter: buffers are DTensors laid out like it, except
    8-bit codes, which belong to the local shard (they are saved dequantised, see
    :func:`dequantize_for_saving`)."""
    state = init_state(param.to_local(), fmt)
    if not fmt.quantized:
        for key in BUFFER_KEYS:
            state[key] = DTensor.from_local(state[key], param.device_mesh, param.placements,
                                            shape=param.shape, stride=param.stride())
    return state


def dequantize_for_saving(state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """A DTensor parameter's 8-bit state as float32 DTensors (what DCP can reshard); others
    unchanged. Loading converts them back to the group's format."""
    if not (is_dtensor(param) and any("exp_avg" + s in state for s in BLOCK_SUFFIXES)):
        return state
    out = {k: v for k, v in state.items()
           if k != CODES_KEY and not k.endswith(BLOCK_SUFFIXES)}
    local = param.to_local()
    for key, signed in BUFFERS:
        value = decode(state, key, signed, local, torch.float32)
        out[key] = DTensor.from_local(value, param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())
    return out


def check_loaded_sharding(state: dict[str, Any], param: Tensor) -> str | None:
    """What is wrong with loaded state for a DTensor ``param``, or None: its buffers must be
    DTensors laid out like it (as ``set_optimizer_state_dict`` hands them over)."""
    if not is_dtensor(param):
        return None
    for key in BUFFER_KEYS:
        value = state.get(key)
        if not isinstance(value, Tensor):
            continue
        if not is_dtensor(value):
            return (f"the parameter is a DTensor (FSDP2) but its saved {key} is a plain "
                    "tensor; load sharded state with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict")
        if value.placements != param.placements:
            return (f"its saved {key} has placements {value.placements} but the parameter "
                    f"has {param.placements}")
    return None


def localize(state: dict[str, Any], param: Tensor) -> None:
    """Replace a DTensor parameter's DTensor buffers by their local shards, in place (before
    encoding them as 8-bit codes, which belong to the shard)."""
    for key in BUFFER_KEYS:
        value = state.get(key)
        if is_dtensor(param) and isinstance(value, Tensor) and is_dtensor(value):
            state[key] = value.to_local()
