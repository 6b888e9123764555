"""DTensor support (FSDP2, tensor parallelism): local-shard updates and a global gradient norm.

Adan's update is elementwise, so every rank can update its own shard of each parameter with the
plain-tensor kernels; only the clipping norm needs a reduction across shards and ranks.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch build without torch.distributed: no DTensor can exist
    _DTENSOR = ()

__all__ = ["global_grad_norm", "to_local_shards"]


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    return isinstance(t, _DTENSOR)


def global_grad_norm(grads: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 2-norm of all gradients together as a plain tensor on ``device``.

    A DTensor's norm is reduced over every shard and rank, one collective per mesh and layout.
    """
    norms = [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]
    totals = [n.to(device) for n in norms if not _is_dtensor(n)]
    by_layout: dict[tuple[object, ...], list[Tensor]] = {}
    for n in norms:
        if _is_dtensor(n):
            by_layout.setdefault((n.device_mesh, n.placements), []).append(n)
    for group in by_layout.values():
        totals.append(torch.linalg.vector_norm(torch.stack(group)).full_tensor().to(device))
    return torch.linalg.vector_norm(torch.stack(totals))


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
