"""Distributed support: local-shard updates of DTensors and a global gradient norm.

Adan's update is elementwise, so every rank can update its own shard of each parameter with the
plain-tensor kernels; only the clipping norm needs a reduction: across the shards of DTensors
(FSDP2, tensor parallelism), and across ranks whose optimizers hold disjoint partitions of the
parameters (ZeroRedundancyOptimizer), given as ``grad_norm_group``. State of a DTensor
parameter is sharded like it; 8-bit codes live with the local shard and are saved dequantised
as DTensors, so that ``torch.distributed.checkpoint`` can reshard them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch build without torch.distributed: no DTensor can exist
    _DTENSOR = ()

from adan.kernels.common import BUFFER_KEYS, BUFFERS
from adan.state import decode, init_state

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "check_grad_norm_group",
    "dequantize_for_saving",
    "global_grad_norm",
    "init_sharded_state",
    "is_dtensor",
    "local_views",
]

GRAD_NORM_GROUP = "grad_norm_group"


def check_grad_norm_group(group: ProcessGroup | None) -> None:
    """Raise a clear ValueError if ``group`` is given but torch.distributed cannot use it."""
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"Invalid grad_norm_group: {group!r} (allowed: None, or a process group once "
            "torch.distributed.init_process_group has been called)"
        )


def scrub_grad_norm_group(param_group: dict[str, Any], group: ProcessGroup | None) -> None:
    """Replace a ``grad_norm_group`` entry of ``param_group`` (one wrapper put there) by None.

    ZeroRedundancyOptimizer copies every keyword it forwards into its own param groups and then
    from the inner optimizer's groups back into its own; an unpicklable ProcessGroup there breaks
    ``consolidate_state_dict``, ``torch.save`` and ``load_state_dict``. The group lives on the
    optimizer instead, and a different one in a group is an error (it is one for all groups).
    """
    if GRAD_NORM_GROUP not in param_group:
        return
    if param_group[GRAD_NORM_GROUP] not in (None, group):
        raise ValueError(
            "Invalid grad_norm_group in a param group: it is one for the whole optimizer; "
            "pass it to the constructor"
        )
    param_group[GRAD_NORM_GROUP] = None


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    return isinstance(t, _DTENSOR)


_NORM_TAKES_DTYPE = "dtype" in str(torch.ops.aten._foreach_norm.Scalar._schema)


def _norms(grads: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each gradient's 2-norm accumulated in ``dtype``: one foreach launch per device where
    torch's ``_foreach_norm`` takes a dtype, else one reduction per tensor."""
    if _NORM_TAKES_DTYPE and grads and not _is_dtensor(grads[0]):  # all plain, or all DTensor
        return list(torch._foreach_norm(grads, 2.0, dtype=dtype))
    return [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]


def global_grad_norm(
    grads: list[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    group: ProcessGroup | None = None,
) -> Tensor:
    """The 2-norm of all gradients together as a plain tensor on ``device``.

    A DTensor's norm is reduced over every shard and rank, one collective per mesh and layout.
    With ``group``, the squared norm of the plain tensors is also summed over ``group`` (one
    all-reduce, in float64 so that every rank reduces the same dtype); the DTensor part is
    already global and is added after, so it is not counted once per rank. Every rank of
    ``group`` must call this, also with no gradients (``grads`` empty).
    """
    plain_grads: list[Tensor] = []
    sharded_grads: list[Tensor] = []
    for g in grads:
        (sharded_grads if _is_dtensor(g) else plain_grads).append(g)
    plain = [n if n.device == device else n.to(device) for n in _norms(plain_grads, dtype)]
    by_layout: dict[tuple[object, ...], list[Tensor]] = {}
    for n in _norms(sharded_grads, dtype):
        spec = cast(DTensor, n)
        by_layout.setdefault((spec.device_mesh, spec.placements), []).append(n)
    sharded = [torch.linalg.vector_norm(torch.stack(ns)).full_tensor().to(device)
               for ns in by_layout.values()]
    if group is None:
        return torch.linalg.vector_norm(torch.stack(plain + sharded))
    local = torch.zeros((), dtype=torch.float64, device=device)
    if plain:
        local += torch.linalg.vector_norm(torch.stack(plain), dtype=torch.float64).square()
    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    if sharded:
        local += torch.linalg.vector_norm(torch.stack(sharded), dtype=torch.float64).square()
    return local.sqrt().to(dtype)


def _local(t: Tensor, param: Tensor, name: str) -> Tensor:
    """``t``'s local shard, laid out like ``param``'s (only a gradient may be redistributed)."""
    if not _is_dtensor(param):
        return t
    if not _is_dtensor(t):
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


def is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (a sharded parameter under FSDP2 or tensor parallelism)."""
    return _is_dtensor(t)


def local_views(param: Tensor, grad: Tensor, state: dict[str, Any]
                ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The local shards a kernel updates for a DTensor ``param``: its shard, its gradient's
    shard laid out like it, and the state with every DTensor replaced by its shard (a view,
    so the kernel's in-place writes land in the DTensors). Plain tensors pass unchanged."""
    if not _is_dtensor(param):
        return param, grad, state
    local = {k: _local(v, param, k) if k in BUFFER_KEYS and "exp_avg_meta" not in state else v
             for k, v in state.items()}
    return param.to_local(), _local(grad, param, "grads"), local


def init_sharded_state(param: DTensor, fmt: str) -> dict[str, Tensor]:
    """Zeroed state for a DTensor parameter: buffers are DTensors laid out like it, except
    8-bit codes, which belong to the local shard (they are saved dequantised, see
    :func:`dequantize_for_saving`)."""
    state = init_state(param.to_local(), fmt)
    if fmt != "int8":
        for key in BUFFER_KEYS:
            state[key] = DTensor.from_local(state[key], param.device_mesh, param.placements,
                                            shape=param.shape, stride=param.stride())
    return state


def dequantize_for_saving(state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """A DTensor parameter's 8-bit state as float32 DTensors (what DCP can reshard); others
    unchanged. Loading converts them back to the group's format."""
    if not (_is_dtensor(param) and "exp_avg_meta" in state):
        return state
    out = {k: v for k, v in state.items() if not k.endswith("_meta")}
    local = param.to_local()
    for key, signed in BUFFERS:
        value = decode(state, key, signed, local, torch.float32)
        out[key] = DTensor.from_local(value, param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())
    return out


def check_loaded_sharding(state: dict[str, Any], param: Tensor) -> str | None:
    """What is wrong with loaded state for a DTensor ``param``, or None: its buffers must be
    DTensors laid out like it (as ``set_optimizer_state_dict`` hands them over)."""
    if not _is_dtensor(param):
        return None
    for key in BUFFER_KEYS:
        value = state.get(key)
        if not isinstance(value, Tensor):
            continue
        if not _is_dtensor(value):
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
        if _is_dtensor(param) and isinstance(value, Tensor) and _is_dtensor(value):
            state[key] = value.to_local()
