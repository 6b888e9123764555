"""Distributed support: local-shard updates of DTensors and a global gradient norm.

Adan's update is elementwise, so every rank can update its own shard of each parameter with the
plain-tensor kernels; only the clipping norm needs a reduction: across the shards of DTensors
(FSDP2, tensor parallelism), and across ranks whose optimizers hold disjoint partitions of the
parameters (ZeroRedundancyOptimizer), given as ``grad_norm_group``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch build without torch.distributed: no DTensor can exist
    _DTENSOR = ()

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["check_grad_norm_group", "global_grad_norm", "to_local_shards"]

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
    norms = [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]
    plain = [n.to(device) for n in norms if not _is_dtensor(n)]
    by_layout: dict[tuple[object, ...], list[Tensor]] = {}
    for n in norms:
        if _is_dtensor(n):
            by_layout.setdefault((n.device_mesh, n.placements), []).append(n)
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


def reject_dtensors(params: list[Tensor], what: str) -> None:
    """Raise, before anything is written, if ``what`` cannot run on DTensor parameters yet."""
    if any(_is_dtensor(p) for p in params):
        raise NotImplementedError(
            f"{what} does not support DTensor (FSDP2) parameters yet; use the default "
            "state_dtype='fp32' with sharded parameters"
        )


def to_local_shards(tensors: dict[str, list[Tensor]]) -> None:
    """Replace, in place, every DTensor in the kernel's lists by its local shard (a view).

    The lists are keyed as the optimizer collects them; ``steps`` are plain tensors.
    """
    params = tensors["params"]
    if not any(_is_dtensor(p) for p in params):
        return
    for name, values in tensors.items():
        if name == "steps":
            continue
        tensors[name] = [_local(t, p, name) for t, p in zip(values, params, strict=True)]
