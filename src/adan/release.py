"""Gradient release: each parameter is stepped inside backward, from a post-accumulate-grad
hook, as soon as its gradient is complete, and its gradient is freed at once, so the model's
gradients never coexist. What it cannot be combined with, and how accumulation and DDP work
with it: docs/lowmem.md (Gradient release). Steps go through :class:`adan.stepping.Stepper`,
the same seam as ``Adan.step()``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from adan.checks import check_release
from adan.state.store import States
from adan.stepping import Stepper

__all__ = ["GradientRelease"]

# Parameters of fewer elements (biases, norm weights) are stepped together at the end of
# backward: one kernel call for all of them, as a normal step packs them on CPU, instead of one
# launch each; their gradients, a small part of a model's, are held until then.
SMALL_NUMEL = 1 << 16


# Which release steps each parameter (by id, with weak references to both): a parameter
# registered by a second optimizer is handed over to it, so that no two optimizers step it.
_OWNERS: dict[int, tuple[weakref.ref[Tensor], weakref.ref[GradientRelease]]] = {}


class Owner(Protocol):
    """What release reads of its optimizer: torch's public attributes."""

    param_groups: list[dict[str, Any]]
    state: States


@dataclass
class _Entry:
    """One released parameter: its group's position and its hook."""

    param: Tensor
    group: int
    handle: RemovableHandle
    reduced: bool = False  # stepped by a DDP communication hook, not by its own hook


class GradientRelease:
    """The hooks of one optimizer's released parameters and the bookkeeping between them.
    It holds its optimizer weakly: hooks left on parameters do not keep it alive."""

    def __init__(self, opt: Owner, stepper: Stepper) -> None:
        self._owner = weakref.ref(opt)
        self.stepper = stepper
        self.entries: dict[int, _Entry] = {}
        self.paused = 0
        self.discarding = 0  # paused with discard=True
        self.fired = False  # a parameter was released since the last step() or zero_grad()
        self.in_backward = False
        self.layout: list[tuple[bool, int]] = []
        self.ddp_params: set[int] = set()
        self.freeing = False  # the end-of-backward callback of a DDP backward is queued
        self.pending: list[_Entry] = []  # small parameters released in this backward
        self.checked: set[int] = set()  # groups whose settings this iteration has checked

    @property
    def opt(self) -> Owner:
        """The optimizer (the caller has checked that it is alive)."""
        opt = self._owner()
        assert opt is not None
        return opt

    @property
    def active(self) -> bool:
        """Whether any parameter is released."""
        return bool(self.entries)

    # --- set-up -------------------------------------------------------------------------------

    def sync(self) -> None:
        """Register hooks for the parameters of releasing groups and remove the others' (after
        ``add_param_group``, ``load_state_dict``, unpickling, or a group's setting changed)."""
        groups = self.opt.param_groups
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
                entry.group = index

    def _register(self, param: Tensor, index: int) -> _Entry:
        owner = _OWNERS.get(id(param))
        other = owner[1]() if owner is not None and owner[0]() is param else None
        if other is not None and other is not self:
            other._hand_over(param)
        _OWNERS[id(param)] = (weakref.ref(param), weakref.ref(self))
        handle = param.register_post_accumulate_grad_hook(self.hook)
        return _Entry(param, index, handle, reduced=id(param) in self.ddp_params)

    def _hand_over(self, param: Tensor) -> None:
        """Another optimizer now releases ``param``: stop stepping it."""
        entry = self.entries.pop(id(param), None)
        if entry is not None:
            entry.handle.remove()

    def _remove(self, entry: _Entry) -> None:
        entry.handle.remove()
        owner = _OWNERS.get(id(entry.param))
        if owner is not None and owner[1]() is self:
            del _OWNERS[id(entry.param)]

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
            if self._owner() is None:
                return reduced
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

    def before_step(self, scaled: bool) -> None:
        """At ``Adan.step()``: refuse a GradScaler's step (``scaled``), and let the next
        backward release again."""
        if self.entries and scaled:
            raise RuntimeError(
                "gradient release cannot be used with a GradScaler: the scaler unscales and "
                "checks for overflows after backward, but the released parameters were already "
                "stepped inside backward with the scaled gradients (use bf16 autocast, which "
                "needs no scaler, or turn gradient release off)")
        self.new_iteration()

    def free_stepped(self) -> None:
        """After ``Adan.step()``: free the gradients it stepped of released parameters (left by
        a paused backward), so that the next backward does not add to them."""
        for entry in self.entries.values():
            if entry.param.grad is not None:
                entry.param.grad = None

    def new_iteration(self) -> None:
        """``step()`` or ``zero_grad()`` was called: the next backward may release again (and
        a group's changed setting takes effect)."""
        self.fired = self.in_backward = False  # (a failed backward ran no final callback)
        self.pending = []
        self.checked.clear()
        self.check_layout()

    @contextlib.contextmanager
    def pause(self, discard: bool = False) -> Iterator[None]:
        """While active, the hooks leave gradients to accumulate in ``.grad``, or with
        ``discard`` free them (a backward that is not this optimizer's, e.g. a GAN's generator
        loss reaching the discriminator)."""
        self.paused += 1
        self.discarding += discard
        try:
            yield
        finally:
            self.paused -= 1
            self.discarding -= discard

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
        if self._owner() is None:  # the optimizer is gone: leave gradients as AdamW would
            self.remove_hooks()
            return
        entry = self.entries.get(id(param))
        if entry is not None and self.discarding:
            param.grad = None
            return
        if self.paused or entry is None or entry.reduced:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "gradient release in a run of several processes, on a parameter whose gradient "
                "no registered DistributedDataParallel reduces: its hook sees only this "
                "process's gradient. Call opt.register_ddp(ddp_model) (the parameters are then "
                "stepped after the all-reduce), or turn gradient release off")
        self.fire(entry)

    def remove_hooks(self) -> None:
        """Remove every hook (its optimizer was deleted)."""
        for entry in self.entries.values():
            self._remove(entry)
        self.entries.clear()

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
        if param.grad.is_sparse:
            index = next(i for i, p in enumerate(group["params"]) if p is param)
            raise RuntimeError(
                f"gradient release: parameter {index} of param group {entry.group} (shape "
                f"{tuple(param.shape)}) has a sparse gradient, which Adan cannot step (e.g. "
                "nn.Embedding(sparse=True)); give it a group with gradient_release=False and "
                "a dense gradient. Its gradient is left in .grad")
        self._begin_backward()
        self.fired = True
        if param.numel() < SMALL_NUMEL:
            self.pending.append(entry)
            return
        self._step(entry.group, [param])

    def _flush(self) -> None:
        """Step the small parameters released in this backward, one call per group."""
        pending, self.pending = self.pending, []
        if self._owner() is None:
            return
        by_group: dict[int, list[Tensor]] = {}
        for entry in pending:
            if entry.param.grad is not None:
                by_group.setdefault(entry.group, []).append(entry.param)
        for index, params in by_group.items():
            self._step(index, params)

    def _step(self, index: int, params: list[Tensor]) -> None:
        """Step ``params`` of group ``index`` through the seam, then free their gradients."""
        opt = self.opt
        if index not in self.checked:  # once per group and iteration
            check_release(opt.param_groups[index], [], index)
            self.checked.add(index)
        with torch.no_grad():
            self.stepper.step_part(opt.param_groups, index, opt.state, params)
        for param in params:
            param.grad = None
