"""The stepping seam: what a step of some parameters of one param group is.

:class:`Stepper` checks the parameters, routes them to kernels, prepares their state and runs
the kernels, keeping what it planned for the next step. ``Adan.step()`` steps every group
through it, and gradient release steps the parameters whose gradients are ready; both get
the same checks, kernels and plans (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_, is_not
from typing import Any

import torch
from torch import Tensor

from adan.checks import check_group, check_same_max_grad_norm
from adan.kernels.common import CAPTURED, Kernel, StepArgs, traced
from adan.kernels.routing import builds_finished, route
from adan.state.dtensor import is_dtensor, local
from adan.state.formats import PLAIN, StateFormat, storage_format
from adan.state.lifecycle import (
    convert_state,
    device_mismatch,
    init_state,
    rounding_seed,
    rounds_stochastically,
    shape_mismatch,
)
from adan.state.sharded import init_sharded_state, local_views, localize
from adan.state.store import StateMap, States

__all__ = ["Plan", "Stepper"]

_grad, _dtype, _shape = (attrgetter(a) for a in ("grad", "dtype", "shape"))

PART_PLANS_MAX = 256
"""Plans kept for parts of groups (gradient release): past this many, the least recently used
is dropped (and re-made if needed), so that a varying set of parameters with gradients (the
experts a mixture-of-experts batch reaches) cannot grow the cache."""


@dataclass
class _Call:
    """One kernel call of a plan: its kernel and format, the positions of its parameters
    among the plan's, their (local) tensors and states, the kernel's own data between steps
    (``cache``), and the last step's arguments with the settings they were made from."""

    kernel: Kernel
    fmt: StateFormat
    members: list[int]
    params: list[Tensor]
    states: list[dict[str, Any]]
    whole: bool
    cache: dict[Any, Any]
    settings: tuple[Any, ...] = ()
    args: StepArgs | None = None


@dataclass
class Plan:
    """Checked parameters and their kernel calls, valid while ``key`` (settings, parameters
    and their gradients' dtypes, shapes and layouts) and ``version`` (the state map's) hold.
    ``key`` None: made for one step only (DTensor parameters, a step traced by Dynamo)."""

    key: list[Any] | None
    version: list[int]
    params: list[Tensor]
    calls: list[_Call]
    sharded: bool


class Stepper:
    """Steps parameters of param groups, keeping one plan per group (and per part of a group
    that gradient release steps) until what it was made from changes."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, tuple[int, ...] | None], Plan] = {}
        # What CUDA graphs captured, kept while this optimizer lives (kernels add to it through
        # their cache's CAPTURED entry); it grows by a plan per capture that follows a re-plan.
        self.captured: list[Any] = []
        self._refs: list[Any] = []  # what versions name by identity, kept alive
        self._checked: dict[int, tuple[list[str], list[Any]]] = {}
        self._rounding_base: int | None = None
        self._indices: dict[int, int] | None = None

    def forget(self) -> None:
        """Drop every plan (the param groups or the state map were replaced)."""
        self.plans.clear()
        self._checked.clear()
        self._indices = None

    # --- the two entry points -----------------------------------------------------------------

    def step(self, groups: list[dict[str, Any]], state: States,
             grad_factor: Callable[[], Tensor | None]) -> None:
        """One step of every group's parameters that have gradients. Everything that can fail
        is checked before anything is written; ``grad_factor`` is called after the checks."""
        self.check_groups(groups)
        version = self._version(state)
        current = [self._key(group) for group in groups]
        stale = [i for i, (key, _) in enumerate(current)
                 if key is None or self._stale((i, None), key, version)]
        checked = {i: self._collect(groups[i], i, groups[i]["params"], state) for i in stale}
        routes = {i: self._route(groups[i], state, checked[i]) for i in stale}
        factor = grad_factor()
        for i in stale:
            self.plans[(i, None)] = self._plan(groups, i, state, checked[i], routes[i],
                                               current[i][0])
        if stale:
            self._renew(state, version)
        for i, (_, grads) in enumerate(current):
            self._run(groups[i], self.plans[(i, None)], grads, factor)

    def step_part(self, groups: list[dict[str, Any]], index: int, state: States,
                  params: list[Tensor]) -> None:
        """One step of ``params`` (all with gradients) of group ``index``, as that group's
        step would make it: the same checks, kernels and arguments (no gradient factor)."""
        self.check_group(groups, index)
        group = groups[index]
        version = self._version(state)
        key, grads = self._key(group, params)
        slot = (index, tuple(map(id, params)))
        if key is None or self._stale(slot, key, version):
            checked = self._collect(group, index, params, state)
            routes = self._route(group, state, checked)
            self.plans.pop(slot, None)
            parts = [k for k in self.plans if k[1] is not None]
            for old in parts[:max(0, len(parts) + 1 - PART_PLANS_MAX)]:
                del self.plans[old]
            self.plans[slot] = self._plan(groups, index, state, checked, routes, key)
            self._renew(state, version)
        else:  # the most recently used last (dicts keep their insertion order)
            self.plans[slot] = self.plans.pop(slot)
        self._run(group, self.plans[slot], grads, None)

    # --- checks -------------------------------------------------------------------------------

    def check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Settings changed since the last check must still be valid (see :meth:`check_group`)."""
        for index in range(len(groups)):
            self.check_group(groups, index)
        for index in list(self._checked):
            if index >= len(groups):
                del self._checked[index]

    def check_group(self, groups: list[dict[str, Any]], index: int) -> None:
        """Check group ``index`` unless it holds, under the same keys, the very objects its
        last check left (what the check reads of them cannot change in place), a tensor lr's
        value aside (reading it would synchronise with its device)."""
        group = groups[index]
        keys, values = list(group), list(group.values())
        seen = self._checked.get(index, ([], []))
        if (isinstance(group["lr"], Tensor) or keys != seen[0]
                or not all(map(is_, values, seen[1]))):
            check_group(group, index, read_tensors=False)
            keys, values = list(group), list(group.values())
        self._checked[index] = (keys, values)
        check_same_max_grad_norm(group["max_grad_norm"], groups[0]["max_grad_norm"], index)

    @staticmethod
    def _collect(group: dict[str, Any], index: int, params: list[Tensor], state: States
                 ) -> list[tuple[Tensor, Tensor, StateFormat]]:
        """Those of ``params`` that have gradients, with their storage formats, after checking
        everything that could make the step fail (nothing is changed)."""
        out = []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"Adan does not support sparse gradients (a parameter of "
                                   f"shape {tuple(p.shape)} in param group {index})")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"a gradient of shape {tuple(p.grad.shape)} for a parameter "
                                   f"of shape {tuple(p.shape)} in param group {index}")
            fmt = storage_format(p, group["state_dtype"])
            if group["differentiable"] and fmt is not PLAIN:
                raise ValueError(f"differentiable=True needs state in the parameter's dtype, "
                                 f"but a {p.dtype} parameter in param group {index} keeps "
                                 f"{fmt} state (state_dtype='param' keeps bfloat16 state "
                                 "rounded to nearest)")
            entry = state.get(p)
            if entry:
                problem = shape_mismatch(entry, p) or device_mismatch(entry, p)
                if problem:
                    raise RuntimeError(f"Cannot step a parameter of param group {index}: "
                                       f"{problem}")
                if group["differentiable"] and entry["step"].requires_grad:
                    raise RuntimeError(
                        "`requires_grad` is not supported for `step` in differentiable mode")
            out.append((p, p.grad, fmt))
        return out

    # --- plans --------------------------------------------------------------------------------

    @staticmethod
    def _key(group: dict[str, Any], params: list[Tensor] | None = None
             ) -> tuple[list[Any] | None, list[Tensor]]:
        """What a plan depends on besides the state map (settings that pick kernels, which
        parameters have gradients, their dtypes, shapes and layouts), read with C-level maps;
        with the gradients, in the plan's order. None where no plan is kept (Dynamo)."""
        params = group["params"] if params is None else params
        if traced():
            return None, [p.grad for p in params if p.grad is not None]
        grads = list(map(_grad, params))
        if not all(map(is_not, grads, repeat(None))):
            params = [p for p, g in zip(params, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        return [builds_finished(), group["state_dtype"], group["foreach"], group["fused"],
                group["differentiable"], group["stochastic_param_rounding"],
                group["capturable"], *map(id, params),
                *map(_dtype, grads), *map(_shape, grads), *map(Tensor.is_contiguous, grads)
                ], grads

    def _stale(self, slot: tuple[int, tuple[int, ...] | None], key: list[Any],
               version: list[int]) -> bool:
        plan = self.plans.get(slot)
        return plan is None or plan.key != key or plan.version != version

    @staticmethod
    def _version(state: States) -> list[int]:
        """The state map's change count, or, where someone put a plain dict into it, the
        identities of every state and tensor in it: a replaced one renews the plans, so that
        no kernel goes on writing an orphaned buffer."""
        if type(state) is StateMap and not state.untracked:
            return [state.changes[0]]
        states = list(state.values())
        return [-1, *map(id, state), *map(id, states),
                *map(id, chain.from_iterable(map(dict.values, states)))]

    def _renew(self, state: States, before: list[int]) -> None:
        """After planning changed the state map from version ``before``: the plans that were
        valid then (their states changed only by this planning) are valid at the new one."""
        self._refs = [*state.values(), *chain.from_iterable(map(dict.values, state.values()))]
        after = self._version(state)
        for plan in self.plans.values():
            if plan.version == before or plan.version is _NEW:
                plan.version = after

    def warm_up(self, groups: list[dict[str, Any]], state: States) -> None:
        """Build, and wait for, the fused kernels the groups' parameters will step with
        (gradients taken to be of the parameters' dtypes where there are none yet)."""
        for group in groups:
            self._route(group, state, [(p, p if p.grad is None else p.grad,
                                        storage_format(p, group["state_dtype"]))
                                       for p in group["params"]], wait=True)

    def _route(self, group: dict[str, Any], state: States,
               checked: list[tuple[Tensor, Tensor, StateFormat]], wait: bool = False
               ) -> list[tuple[Kernel, StateFormat, list[int]]]:
        """The kernel calls of checked parameters, one per storage format, device and kernel,
        with their positions (a fused kernel that cannot be built raises or falls back here,
        before anything is written; one still being built is stepped around)."""
        parts: dict[tuple[StateFormat, torch.device], list[int]] = {}
        for i, (param, _, fmt) in enumerate(checked):
            device = local(param).device
            parts.setdefault((fmt, device), []).append(i)
        calls = []
        for (fmt, _), members in parts.items():
            views = [local_views(checked[i][0], checked[i][1], state.get(checked[i][0]) or {})
                     for i in members]
            for kernel, positions in route(group, fmt, [v[0] for v in views],
                                           [v[1] for v in views], [v[2] or None for v in views],
                                           wait):
                calls.append((kernel, fmt, [members[k] for k in positions]))
        return calls

    def _plan(self, groups: list[dict[str, Any]], index: int, state: States,
              checked: list[tuple[Tensor, Tensor, StateFormat]],
              routes: list[tuple[Kernel, StateFormat, list[int]]], key: list[Any] | None) -> Plan:
        """Prepare the state of checked parameters and keep their kernel calls as a plan."""
        local = [local_views(p, g, self._prepare(groups, index, state, p, fmt))[::2]
                 for p, g, fmt in checked]
        everything = list(range(len(checked)))
        calls = [_Call(kernel, fmt, members, [local[m][0] for m in members],
                       [local[m][1] for m in members], members == everything,
                       {CAPTURED: self.captured})
                 for kernel, fmt, members in routes]
        sharded = any(is_dtensor(p) for p, _, _ in checked)
        return Plan(None if sharded else key, _NEW, [p for p, _, _ in checked], calls, sharded)

    def _prepare(self, groups: list[dict[str, Any]], index: int, state: States, param: Tensor,
                 fmt: StateFormat) -> dict[str, Any]:
        """``param``'s state in format ``fmt``: created on first use, converted if the format
        changed, and given its seed once it rounds stochastically."""
        entry = state[param]
        if "step" not in entry:
            entry.update(init_sharded_state(param, fmt) if is_dtensor(param)
                         else init_state(param, fmt))
        elif not fmt.matches(entry, param):
            if fmt.quantized:
                localize(entry, param)
            convert_state(entry, param, fmt)
        if "seed" not in entry and rounds_stochastically(
                param, fmt, groups[index]["stochastic_param_rounding"]):
            if self._rounding_base is None:  # one draw from torch's generator per optimizer
                self._rounding_base = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
            if self._indices is None:
                self._indices = {id(p): i for i, p in enumerate(chain.from_iterable(
                    g["params"] for g in groups))}
            entry["seed"] = rounding_seed(self._rounding_base, self._indices[id(param)],
                                          entry["step"].device)
        return entry

    @staticmethod
    def _run(group: dict[str, Any], plan: Plan, grads: list[Tensor],
             grad_factor: Tensor | None) -> None:
        """Launch a plan's calls with the group's current settings; ``grads`` are those of the
        plan's parameters, in its order. A call keeps its :class:`StepArgs` while the
        settings are the very objects it was made from."""
        settings = (group["lr"], group["betas"], group["eps"], group["weight_decay"],
                    group["no_prox"], group["maximize"], group["capturable"],
                    group["stochastic_param_rounding"], grad_factor)
        for call in plan.calls:
            if plan.sharded:
                mine = [local_views(plan.params[m], grads[m], {})[1] for m in call.members]
            else:
                mine = grads if call.whole else [grads[m] for m in call.members]
            if call.args is None or not all(map(is_, settings, call.settings)):
                call.settings = settings
                call.args = StepArgs.of_group(group, call.fmt, grad_factor)
            call.kernel(call.params, mine, call.states, call.args, call.cache)


_NEW: list[int] = []
"""The version of a plan made during the current planning (set by ``Stepper._renew``)."""
