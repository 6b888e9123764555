"""Gradient release: Adan steps each parameter inside backward and frees its gradient at once.

With ``Adan(..., gradient_release=True)`` (or ``"gradient_release": True`` in a param group)
every parameter of a releasing group gets a post-accumulate-grad hook. When backward has
finished accumulating a parameter's gradient, the hook steps that parameter with its group's
settings at that moment (the same checks, kernel choice and kernel call as ``Adan.step``) and
sets its ``.grad`` to None, so the model's gradients never exist all at once: at most the
gradients that are being stepped at a moment are held (autograd's gradients in flight aside).
``Adan.step()`` then has nothing left to update for released
parameters (it still runs a closure and the step hooks).

What cannot be combined with it is refused when it is set up, or at the first point where it
can be seen, never stepped wrongly:

* ``max_grad_norm > 0``: the global norm needs every gradient before the first update;
* ``differentiable=True``: the step would run inside backward;
* DTensor parameters (FSDP2): FSDP2 writes the reduce-scattered gradient to the sharded
  parameter in its own post-backward, which fires no post-accumulate-grad hook, and torch
  offers no public hook after that write (``set_all_reduce_hook`` sees the flat reduced
  buffer before it is split into the parameters' gradients);
* a GradScaler: it unscales (and looks for overflows) after backward, when the hooks have
  already stepped with the scaled gradients. Releasing optimizers claim
  ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` hands its scale to ``Adan.step``,
  which raises; the parameters have by then taken that one backward's step;
* a second backward before ``opt.step()`` or ``opt.zero_grad()`` (gradient accumulation): the
  first hook of the second backward raises, before it updates anything. Accumulation is
  spelled out instead: run every backward but the last inside
  ``with opt.pause_gradient_release():`` (the hooks then leave the gradients to accumulate),
  and the last backward steps each parameter with the accumulated gradient;
* in a multi-process run, a hook that fires on a parameter DDP does not reduce (it would step
  on the local gradient).

DDP: a parameter's post-accumulate-grad hook fires on the local gradient, before DDP has
all-reduced its bucket. ``opt.register_ddp(ddp_model)`` installs a communication hook that
all-reduces each bucket (averaged, as DDP's default hook), waits for it and steps the bucket's
released parameters with the reduced gradients; their own hooks then stand aside. The reducer is
told, as torch's own optimizer-in-backward support tells it, that the optimizer runs in
backward, and a callback at the end of backward frees the gradients it may have written back.
DDP's bucket buffers (one gradient's worth) remain: under DDP release saves the parameters'
``.grad`` copies, not the buckets. Gradient accumulation under DDP is DDP's own ``no_sync()``
(no reduction, hence no step: the gradients accumulate in ``.grad`` until a synced backward);
``pause_gradient_release()`` is refused there, since the reduced bucket is not kept for a later
step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from adan.checks import check_group
from adan.distributed import is_dtensor
from adan.state import storage_format

if TYPE_CHECKING:
    from adan.optimizer import Adan, _Plan

__all__ = ["GradientRelease", "check_release"]

# Parameters of fewer elements (biases, norm weights) are stepped together at the end of
# backward: one kernel call for all of them, as a normal step packs them on CPU, instead of one
# launch each; their gradients, a small part of a model's, are held until then.
SMALL_NUMEL = 1 << 16


def _where(index: int | None) -> str:
    return "" if index is None else f" in param group {index}"


def check_release(group: dict[str, Any], params: list[Any], index: int | None = None) -> None:
    """Raise if ``group`` (with ``params``) asks for gradient release that cannot work."""
    release = group.get("gradient_release", False)
    if not isinstance(release, bool):
        raise ValueError(f"Invalid gradient_release{_where(index)}: {release!r} (allowed: True "
                         "or False)")
    if not release:
        return
    if group["max_grad_norm"] > 0:
        raise ValueError(
            f"Invalid max_grad_norm{_where(index)}: {group['max_grad_norm']!r} with "
            "gradient_release=True (allowed: 0; clipping scales every gradient by the global "
            "norm, which needs all gradients before the first update, while gradient release "
            "steps each parameter as soon as its own gradient is ready)")
    if group["differentiable"]:
        raise ValueError(f"Invalid differentiable{_where(index)}: True with "
                         "gradient_release=True (the step would run inside backward)")
    for i, p in enumerate(params):
        if isinstance(p, Tensor) and is_dtensor(p):
            raise ValueError(
                f"Invalid gradient_release{_where(index)}: parameter {i} is a DTensor (FSDP2). "
                "FSDP2 writes the reduce-scattered gradient to the sharded parameter in its "
                "post-backward without firing post-accumulate-grad hooks, and torch has no "
                "public hook after that write; step normally (FSDP2 already frees each "
                "unsharded gradient after its reduce-scatter)")


@dataclass
class _Entry:
    """One released parameter: its group's position, its hook and its own plan (whose kernel
    caches hold, e.g., its Triton address row)."""

    param: Tensor
    group: int
    handle: RemovableHandle
    plan: _Plan | None = None
    reduced: bool = False  # stepped by a DDP communication hook, not by its own hook


class GradientRelease:
    """The hooks of one optimizer's released parameters and the bookkeeping between them."""

    def __init__(self, opt: Adan) -> None:
        self.opt = opt
        self.entries: dict[int, _Entry] = {}
        self.paused = 0
        self.fired = False  # a parameter was released since the last step() or zero_grad()
        self.in_backward = False
        self.layout: list[tuple[bool, int]] = []
        self.ddp_params: set[int] = set()
        self.freeing = False  # the end-of-backward callback of a DDP backward is queued
        self.pending: list[_Entry] = []  # small parameters released in this backward
        self.small_plans: dict[tuple[int, ...], _Plan] = {}
        self.checked: set[int] = set()  # groups whose settings this iteration has checked

    # --- set-up -------------------------------------------------------------------------------

    def sync(self) -> None:
        """Register hooks for the parameters of releasing groups and remove the others' (after
        ``add_param_group``, ``load_state_dict``, unpickling, or a group's setting changed)."""
        groups = self.opt.param_groups
        self.small_plans.clear()
        self.layout = [(bool(g.get("gradient_release", False)), len(g["params"])) for g in groups]
        wanted: dict[int, tuple[Tensor, int]] = {}
        for index, group in enumerate(groups):
            if group.get("gradient_release", False):
                check_release(group, group["params"], index)
                wanted.update({id(p): (p, index) for p in group["params"]})
        for key in [k for k in self.entries if k not in wanted]:
            self._remove(self.entries.pop(key))
        for key, (param, index) in wanted.items():
            entry = self.entries.get(key)
            if entry is None:
                self.entries[key] = self._register(param, index)
            elif entry.group != index:
                entry.group, entry.plan = index, None
        self.opt._step_supports_amp_scaling = bool(self.opt.defaults["fused"]) or bool(
            self.entries)

    def _register(self, param: Tensor, index: int) -> _Entry:
        handle = param.register_post_accumulate_grad_hook(self.hook)
        return _Entry(param, index, handle, reduced=id(param) in self.ddp_params)

    @staticmethod
    def _remove(entry: _Entry) -> None:
        entry.handle.remove()

    def register_ddp(self, model: torch.nn.Module) -> None:
        """Step ``model``'s (a ``DistributedDataParallel``) released parameters in its
        communication hook, after each bucket's all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"register_ddp takes a DistributedDataParallel, not a "
                            f"{type(model).__name__}")
        self.ddp_params.update(id(p) for p in model.parameters())
        for entry in self.entries.values():
            entry.reduced = entry.reduced or id(entry.param) in self.ddp_params
        group = model.process_group

        def hook(_, bucket):  # type: ignore[no-untyped-def]  # DDP reads real annotations
            reduced = allreduce_hook(group, bucket)  # averages, as DDP's default hook does
            reduced.wait()
            if self.paused:
                raise RuntimeError(
                    "pause_gradient_release() under DistributedDataParallel: the reduced bucket "
                    "is not kept for a later step; run the accumulating backward passes inside "
                    "model.no_sync() instead")
            for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                entry = self.entries.get(id(param))
                if entry is not None:
                    param.grad = grad
                    self.fire(entry)
            if not self.freeing:
                self.freeing = True
                torch.autograd.Variable._execution_engine.queue_callback(self._free_reduced)
            return reduced

        model.register_comm_hook(None, hook)
        model.reducer._set_optimizer_in_backward()  # as torch's optimizer-in-backward does

    def _free_reduced(self) -> None:
        """At the end of a DDP backward: free what the reducer wrote back to ``.grad``."""
        self.freeing = False
        for entry in self.entries.values():
            if entry.reduced:
                entry.param.grad = None

    def remove_all(self) -> None:
        """Remove every hook and turn release off in every group."""
        for group in self.opt.param_groups:
            group["gradient_release"] = False
        self.sync()

    def check_layout(self) -> None:
        """Re-sync if a group's ``gradient_release`` or parameter count changed (cheap)."""
        groups = self.opt.param_groups
        if len(groups) != len(self.layout) or any(
                (bool(g.get("gradient_release", False)), len(g["params"])) != seen
                for g, seen in zip(groups, self.layout, strict=False)):
            self.sync()

    # --- the iteration ------------------------------------------------------------------------

    def before_step(self) -> None:
        """At ``Adan.step()``: refuse a GradScaler, and let the next backward release again."""
        opt = self.opt
        if self.entries and (getattr(opt, "grad_scale", None) is not None
                             or getattr(opt, "found_inf", None) is not None):
            raise RuntimeError(
                "gradient release cannot be used with a GradScaler: the scaler unscales and "
                "checks for overflows after backward, but the released parameters were already "
                "stepped inside backward with the scaled gradients (use bf16 autocast, which "
                "needs no scaler, or turn gradient release off)")
        self.new_iteration()

    def new_iteration(self) -> None:
        """``step()`` or ``zero_grad()`` was called: the next backward may release again (and
        a group's changed setting takes effect)."""
        self.fired = self.in_backward = False  # (a failed backward ran no final callback)
        self.pending = []
        self.checked.clear()
        self.check_layout()

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """While active, the hooks leave gradients to accumulate in ``.grad``."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def _begin_backward(self) -> None:
        """At the first release of a backward pass: refuse a second backward without a step."""
        if self.in_backward:
            return
        if self.fired:
            raise RuntimeError(
                "gradient release: a second backward pass before opt.step() or "
                "opt.zero_grad(); the first one has already stepped and freed the gradients, so "
                "gradients cannot accumulate. For gradient accumulation, run every backward but "
                "the last inside `with opt.pause_gradient_release():`")
        self.in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self.in_backward = False
        self._flush()

    def hook(self, param: Tensor) -> None:
        """The post-accumulate-grad hook: step ``param`` unless paused or left to DDP."""
        entry = self.entries.get(id(param))
        if self.paused or entry is None or entry.reduced:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "gradient release in a run of several processes, on a parameter whose gradient "
                "no registered DistributedDataParallel reduces: its hook sees only this "
                "process's gradient. Call opt.register_ddp(ddp_model) (the parameters are then "
                "stepped after the all-reduce), or turn gradient release off")
        self.fire(entry)

    def fire(self, entry: _Entry) -> None:
        """Step ``entry``'s parameter with its complete (under DDP: averaged) gradient, then
        free it; a small parameter waits for the end of backward, to be stepped with the
        others."""
        param = entry.param
        if param.grad is None:
            return
        group = self.opt.param_groups[entry.group]
        if not group.get("gradient_release", False):  # turned off since the last sync
            return
        self._begin_backward()
        self.fired = True
        if param.numel() < SMALL_NUMEL:
            self.pending.append(entry)
            return
        with torch.no_grad():
            entry.plan = self.step_params(group, entry.group, [param], entry.plan)
        param.grad = None

    def _flush(self) -> None:
        """Step the small parameters released in this backward, one call per group."""
        pending, self.pending = self.pending, []
        by_group: dict[int, list[Tensor]] = {}
        for entry in pending:
            if entry.param.grad is not None:
                by_group.setdefault(entry.group, []).append(entry.param)
        for index, params in by_group.items():
            key = (index, *map(id, params))
            with torch.no_grad():
                self.small_plans[key] = self.step_params(
                    self.opt.param_groups[index], index, params, self.small_plans.get(key))
            for param in params:
                param.grad = None

    def step_params(self, group: dict[str, Any], index: int, params: list[Tensor],
                    plan: _Plan | None) -> _Plan:
        """One step of ``params`` (of param group ``index``, all with gradients) through the
        optimizer's own checks, plan and kernels; returns the plan, to be passed back next
        time. As in ``step()``, it is re-made only when its key (:meth:`Adan._step_key`)
        changed, and its calls' arguments follow the group's settings.

        The kernels are those the group's ``step()`` would give these parameters (routed
        beside the group's other parameters), so the update is the same.
        """
        opt = self.opt
        if index not in self.checked:  # once per group and iteration, as step() checks
            check_group(group, index, read_tensors=False)
            check_release(group, [], index)
            self.checked.add(index)
        key, grads = opt._step_key(group, opt._states_key(), params)
        if key is None or plan is None or plan.key != key:
            view = {**group, "params": params}
            checked = opt._collect(view, index)
            plan = opt._plan(view, checked, self._route(view, group, checked))
            plan.key = None if plan.sharded else opt._step_key(group, opt._keep_states(),
                                                               params)[0]
        opt._run_plan(group, plan, grads, None)
        return plan

    def _route(self, view: dict[str, Any], group: dict[str, Any],
               checked: list[tuple[Tensor, Tensor, str]]) -> list[Any]:
        """``checked``'s kernel calls as the group's step would route them: the group's other
        parameters stand in (with themselves as gradients) and are then left out."""
        count = len(checked)
        ids = {id(p) for p, _, _ in checked}
        others = [(q, q, storage_format(q, group["state_dtype"])) for q in group["params"]
                  if id(q) not in ids]
        routes = []
        for kernel, fmt, members in self.opt._route(view, checked + others):
            mine = [m for m in members if m < count]
            if mine:
                routes.append((kernel, fmt, mine))
        return routes
