"""The gradient factor of a step: AMP's unscale times clipping by the global gradient norm.

Adan's update is elementwise, so every rank updates its own shards (:mod:`adan.state.sharded`);
only the clipping norm needs a reduction: across the shards of DTensors (FSDP2, tensor
parallelism), and across ranks whose optimizers hold disjoint partitions of the parameters
(ZeroRedundancyOptimizer), given as ``grad_norm_group`` (docs/distributed.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from adan.numeric.scalars import real_view
from adan.state.dtensor import DTensor, is_dtensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["check_grad_norm_group", "global_grad_norm", "grad_factor", "scrub_grad_norm_group"]

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


_NORM_TAKES_DTYPE = "dtype" in str(torch.ops.aten._foreach_norm.Scalar._schema)


def _norms(grads: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each gradient's 2-norm accumulated in ``dtype``: one foreach launch per device where
    torch's ``_foreach_norm`` takes a dtype, else one reduction per tensor."""
    if _NORM_TAKES_DTYPE and grads and not is_dtensor(grads[0]):  # all plain, or all DTensor
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
        (sharded_grads if is_dtensor(g) else plain_grads).append(g)
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


def grad_factor(groups: list[dict[str, Any]], norm_group: ProcessGroup | None,
                grad_scale: Tensor | None, found_inf: Tensor | None, skips: Tensor | None
                ) -> tuple[Tensor | None, Tensor | None]:
    """The factor every gradient is multiplied by, as a device tensor (None for 1), and the
    count of skipped steps. It is ``1 / grad_scale`` (AMP) times ``min(1, max_norm / (norm +
    eps))``, the norm being the unscaled gradients'; NaN, meaning "skip this step", where
    GradScaler found an overflow or the norm is not finite. ``skips``, the count so far, is
    updated in place (created on the first step that clips)."""
    factor = None if grad_scale is None else grad_scale.double().reciprocal().float()
    max_norm = groups[0]["max_grad_norm"]
    grads = [real_view(p.grad) for g in groups for p in g["params"]
             if p.grad is not None] if max_norm > 0 else []
    if grads or (max_norm > 0 and norm_group is not None):
        # Scaled gradients' squares overflow float32 once scale x norm passes ~1.8e19.
        wide = factor is not None or any(g.dtype == torch.float64 for g in grads)
        acc = torch.float64 if wide else torch.float32
        params = (p for group in groups for p in group["params"])
        device = grads[0].device if grads else next(params, torch.empty(0)).device
        norm = global_grad_norm(grads, acc, device, norm_group)
        if factor is not None:
            norm = norm * factor.to(norm.device)
        finite = torch.isfinite(norm)
        # One count, added to in place: a CUDA graph's replays add to the tensor it captured.
        if skips is None:
            skips = torch.zeros((), dtype=torch.int64, device=finite.device)
        skips.add_((~finite).to(skips.device, torch.int64))
        clip = torch.where(finite, torch.clamp(max_norm / (norm + groups[0]["eps"]), max=1.0),
                           torch.nan)
        factor = clip if factor is None else clip * factor.to(clip.device)
    if found_inf is not None:
        base = torch.ones((), device=found_inf.device) if factor is None else factor
        factor = torch.where(found_inf.to(base.device) > 0, torch.nan, base)
    return factor, skips
