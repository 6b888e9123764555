"""The :class:`Adan` optimizer: validates settings, owns the state, dispatches each step."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_, is_not
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from adan.checks import check_group, check_params
from adan.compat import convert_foreign_state_dict
from adan.distributed import (
    check_grad_norm_group,
    check_loaded_sharding,
    dequantize_for_saving,
    global_grad_norm,
    init_sharded_state,
    is_dtensor,
    local_views,
    localize,
    scrub_grad_norm_group,
)
from adan.kernels.common import StepArgs, real_view
from adan.kernels.select import Kernel, route
from adan.release import GradientRelease, check_release
from adan.state import (
    StateMap,
    check_saved_state,
    convert_state,
    format_matches,
    init_state,
    rounding_seed,
    rounds_stochastically,
    shape_mismatch,
    step_dtype,
    storage_format,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Adan"]

_grad, _dtype, _shape = (attrgetter(a) for a in ("grad", "dtype", "shape"))


class Adan(Optimizer):
    r"""Adan: Adaptive Nesterov Momentum (Xie et al., 2022), a drop-in for ``torch.optim.AdamW``.

    For each step :math:`k` with gradient :math:`g_k` (and :math:`g_0 = g_1`)::

        d = g_k - g_{k-1}
        m = b1*m + (1-b1)*g_k
        v = b2*v + (1-b2)*d
        n = b3*n + (1-b3)*(g_k + b2*d)**2
        u = (m/(1-b1**k) + b2*v/(1-b2**k)) / (sqrt(n)/sqrt(1-b3**k) + eps)
        p = (p - lr*u) / (1 + lr*wd)          # no_prox=False (default)
        p = p*(1 - lr*wd) - lr*u              # no_prox=True

    The betas are decay rates (code convention); the paper writes them as ``1 - beta``.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or dicts defining parameter groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor. Adan usually takes a
            peak lr several times AdamW's.
        betas: decay rates ``(b1, b2, b3)`` of the gradient, gradient-difference and
            second-moment averages, each in ``[0, 1)``.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (about 0.02 is a good start).
        no_prox: apply weight decay as AdamW does (``p*(1-lr*wd)``) instead of the proximal
            form ``p/(1+lr*wd)``.
        max_grad_norm: if positive, gradients of all parameters are scaled together by
            ``min(1, max_grad_norm / (global_norm + eps))`` before the update, with ``eps``
            the first group's. The factor stays on the device (no host synchronisation) and
            the ``.grad`` tensors are not modified. A step whose norm is not finite (an inf or
            NaN gradient) is skipped, leaving params and state as they were, and counted in
            :attr:`skipped_steps`. It is one value for the whole optimizer: every param group
            must have the same.
        grad_norm_group: the process group over which the parameters are partitioned
            disjointly, as ``ZeroRedundancyOptimizer`` does (pass it through ZeRO's keywords):
            the clipping norm then sums the local squared norm over this group (one all-reduce
            per step, on the device; every rank must step). DTensor gradients (FSDP2) are
            already reduced over their mesh and are not summed again. Requires an initialised
            torch.distributed; kept on the optimizer, not in ``param_groups`` or state dicts.
        maximize: ascend the objective instead of descending.
        foreach: ``True`` for the multi-tensor eager implementation, ``False`` for the
            single-tensor one.
        fused: ``True`` demands the device's fused kernel (Triton on CUDA, compiled C++ on
            CPU) and raises if it cannot run; it also tells ``GradScaler`` that the step
            unscales gradients and skips overflow steps itself, as torch's fused optimizers
            do. With both ``None`` the default is the fused kernel on CUDA, and on CPU for
            large groups and compact state; see ``adan.kernels.select``.
        differentiable: let autograd flow through the step (single-tensor path only).
        capturable: keep every step-dependent scalar on the device, for CUDA graphs (the
            CUDA fused kernel always does).
        state_dtype: storage of the four state buffers: ``None`` (default) keeps the
            parameter's dtype, except float32 for float16 parameters; ``"fp32"`` float32
            (e.g. for bf16 parameters), ``"bf16"`` bfloat16 (8 B per parameter) or ``"int8"``
            (blockwise 8-bit codes, 4.19 B). Compact state is re-encoded with stochastic
            rounding after each step; state in another format is converted on
            ``load_state_dict`` and when a group's setting changes. See docs/lowmem.md.
        stochastic_param_rounding: write bfloat16 parameters with stochastic rounding so that
            updates smaller than their precision are not lost (no extra memory).
        gradient_release: step each parameter inside backward as soon as its gradient is
            complete and free that gradient, so the model's gradients never coexist (a group
            setting; see :mod:`adan.release` for what it cannot be combined with, and
            :meth:`pause_gradient_release` for gradient accumulation).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        no_prox: bool = False,
        max_grad_norm: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        capturable: bool = False,
        grad_norm_group: ProcessGroup | None = None,
        state_dtype: str | torch.dtype | None = None,
        stochastic_param_rounding: bool = False,
        gradient_release: bool = False,
    ) -> None:
        check_grad_norm_group(grad_norm_group)
        self._grad_norm_group = grad_norm_group
        self._plans: dict[int, _Plan] = {}
        # Each group's keys and values as its last check at a step left them.
        self._checked_groups: list[tuple[list[str], list[Any]]] = []
        # What the plans' keys name by identity, kept alive so that no new object takes over
        # one of their ids.
        self._state_refs: list[Any] = []
        # Stochastic rounding: the optimizer's base seed and its parameters' positions.
        self._rounding_base: int | None = None
        self._indices: dict[int, int] | None = None
        self._skips: Tensor | None = None
        self._release = GradientRelease(self)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
            max_grad_norm=max_grad_norm, maximize=maximize, foreach=foreach, fused=fused,
            differentiable=differentiable, capturable=capturable, state_dtype=state_dtype,
            stochastic_param_rounding=stochastic_param_rounding, gradient_release=gradient_release,
        )
        check_group(defaults)
        check_release(defaults, [])
        super().__init__(params, defaults)
        self.state = StateMap(self.state)
        # As torch's optimizers: only fused=True claims to unscale inside the step. GradScaler
        # then hands over grad_scale/found_inf; otherwise it unscales .grad itself, which keeps
        # clipping after ``scaler.unscale_`` (e.g. Lightning's gradient_clip_val) available.
        self._step_supports_amp_scaling = bool(fused)
        self._release.sync()  # releasing optimizers claim it too, to refuse a GradScaler

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["state"] = StateMap(self.state)
        self.__dict__.setdefault("_grad_norm_group", None)
        self.__dict__["_plans"] = {}
        self.__dict__["_checked_groups"] = []
        self.__dict__["_state_refs"] = []
        self.__dict__.setdefault("_rounding_base", None)
        self.__dict__["_indices"] = None
        self.__dict__.setdefault("_skips", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_release", GradientRelease(self))  # a copy registers anew
        self._release.sync()

    def pause_gradient_release(self) -> contextlib.AbstractContextManager[None]:
        """A context in which backward passes leave released parameters' gradients to
        accumulate in ``.grad``, for gradient accumulation: run every backward but the last
        of a step inside it; the last one then steps with the accumulated gradients."""
        return self._release.pause()

    def remove_gradient_release(self) -> None:
        """Remove the gradient-release hooks and turn the setting off in every group: from now
        on gradients stay in ``.grad`` until ``step()``."""
        self._release.remove_all()

    def register_ddp(self, model: torch.nn.Module) -> None:
        """With gradient release under ``DistributedDataParallel``: step the released
        parameters of ``model`` (the DDP module) in its communication hook, once each bucket
        is all-reduced, instead of on the local gradient (see :mod:`adan.release`)."""
        self._release.register_ddp(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with gradient release it also ends the iteration, so that
        the next backward may release again (released parameters hold no gradient)."""
        self._release.new_iteration()
        super().zero_grad(set_to_none)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the clipping norm was not finite (reading it synchronises
        with the device once)."""
        return 0 if self._skips is None else int(self._skips.item())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated as the constructor validates its arguments."""
        scrub_grad_norm_group(param_group, self._grad_norm_group)
        merged = {**self.defaults, **param_group}
        index = len(getattr(self, "param_groups", []))
        check_group(merged, index)
        params = param_group["params"]
        if not isinstance(params, set):  # torch rejects sets (their order is not stable)
            params = param_group["params"] = [params] if isinstance(params, Tensor) else list(
                params)
            check_params([p[1] if isinstance(p, tuple) else p for p in params], index)
            check_release(merged, [p[1] if isinstance(p, tuple) else p for p in params], index)
        if self.__dict__.get("param_groups"):
            first = self.param_groups[0]["max_grad_norm"]
            if merged["max_grad_norm"] != first:
                raise ValueError(
                    f"Invalid max_grad_norm in param group {index}: {merged['max_grad_norm']!r}"
                    f" (allowed: {first!r}, as in every other group: clipping scales all "
                    "gradients by one global norm)")
        param_group.update({k: merged[k] for k in ("lr", "betas", "eps", "weight_decay",
                                                  "max_grad_norm", "state_dtype")})
        super().add_param_group(param_group)
        self._plans.clear()
        self._indices = None
        self._release.sync()

    # --- state dicts -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; 8-bit state of DTensor (FSDP2) parameters is saved dequantised
        as float32 DTensors, so that ``torch.distributed.checkpoint`` can reshard it."""
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, param in enumerate(params):
            if index in state_dict["state"]:
                state_dict["state"][index] = dict(dequantize_for_saving(
                    state_dict["state"][index], param))
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class, by sail-sg/Adan or by timm's Adan.

        The whole dict is checked first; anything wrong raises one ``ValueError`` naming the
        parameter and the problem, leaving the optimizer unchanged. Each group keeps its
        current ``state_dtype``; saved state in another format is converted. Pre-hooks see
        the full dict (and may replace it); post-hooks run once everything is loaded.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = self._prepare_load(convert_foreign_state_dict(state_dict))
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _prepare_load(self, state_dict: dict[str, Any]
                      ) -> tuple[list[dict[str, Any]], defaultdict[Tensor, Any]]:
        """The param groups and state that ``state_dict`` loads into, built without touching
        the optimizer."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("Cannot load the optimizer state: expected a dict with 'state' and "
                             "'param_groups' (from Optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"Cannot load the optimizer state: it has {len(saved_groups)} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        groups = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups,
                                                   strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"Cannot load the optimizer state: its param group {index} has "
                                 f"{len(saved['params'])} parameters, this optimizer's "
                                 f"{len(group['params'])}")
            new = {**self.defaults, **deepcopy({k: v for k, v in saved.items() if k != "params"})}
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new["param_names"] = group["param_names"]
            new["state_dtype"] = group["state_dtype"]
            new["gradient_release"] = group.get("gradient_release", False)
            check_group(new, index)
            groups.append(new)
        state: defaultdict[Tensor, Any] = defaultdict(dict)
        saved_ids = [(pid, gi) for gi, g in enumerate(saved_groups) for pid in g["params"]]
        params = [p for g in groups for p in g["params"]]
        for index, ((pid, gi), param) in enumerate(zip(saved_ids, params, strict=True)):
            if pid not in state_dict["state"]:
                continue
            saved = state_dict["state"][pid]
            problem = check_saved_state(saved, param) or (
                check_loaded_sharding(saved, param) if saved else None)
            if problem:
                raise ValueError(f"Cannot load the optimizer state: parameter {index} (param "
                                 f"group {gi}, saved id {pid!r}): {problem}. The optimizer was "
                                 "left unchanged.")
            state[param] = self._loaded_entry(saved, param, groups[gi])
        return groups, state

    @staticmethod
    def _loaded_entry(saved: dict[str, Any], param: Tensor, group: dict[str, Any]
                      ) -> dict[str, Any]:
        """One parameter's loaded state on its device, converted to the group's format."""
        if not saved:
            return {}
        device = param.to_local().device if is_dtensor(param) else param.device
        step = saved["step"]
        entry = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in saved.items()}
        entry["step"] = torch.as_tensor(step.item() if isinstance(step, Tensor) else step,
                                        dtype=step_dtype()).to(device).reshape(())
        if "seed" in entry:
            entry["seed"] = entry["seed"].reshape(())
        fmt = storage_format(param, group["state_dtype"])
        if "prev_grad" not in entry:  # a state saved at step 0 (e.g. after restart())
            entry["prev_grad"] = torch.zeros_like(real_view(param), dtype=torch.float32)
        if fmt == "int8":
            localize(entry, param)
        convert_state(entry, param, fmt)
        return entry

    # --- stepping ------------------------------------------------------------------------------

    @torch.no_grad()
    def restart(self) -> None:
        """Reset every moment and step count, as Algorithm 1 of the paper does on restart.

        The next step starts afresh (bias correction from step 1, a zero first difference),
        keeping the parameters. Useful after a sudden change of the loss landscape, e.g. a new
        training phase or data distribution, where stale moments would mislead the update.
        Buffers are zeroed in place, so their memory (and any CUDA graph capturing them) stays.
        """
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "seed":
                    value.zero_()

    def _grad_factor(self, grad_scale: Tensor | None, found_inf: Tensor | None
                     ) -> Tensor | None:
        """The factor every gradient is multiplied by, as a device tensor, or None for 1.

        It is ``1 / grad_scale`` (AMP) times the clipping factor ``min(1, max_norm / (norm +
        eps))``, the norm being that of the unscaled gradients. It is NaN, meaning "skip this
        step", when GradScaler found an overflow or the norm is not finite.
        """
        factor = None if grad_scale is None else grad_scale.double().reciprocal().float()
        max_norm = self.param_groups[0]["max_grad_norm"]
        grads = [real_view(p.grad) for g in self.param_groups for p in g["params"]
                 if p.grad is not None] if max_norm > 0 else []
        if grads or (max_norm > 0 and self._grad_norm_group is not None):
            acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
            params = (p for group in self.param_groups for p in group["params"])
            device = grads[0].device if grads else next(params, torch.empty(0)).device
            norm = global_grad_norm(grads, acc, device, self._grad_norm_group)
            if factor is not None:
                norm = norm * factor.to(norm.device)
            finite = torch.isfinite(norm)
            self._skips = (~finite).long() + (0 if self._skips is None
                                             else self._skips.to(finite.device))
            eps = self.param_groups[0]["eps"]
            clip = torch.where(finite, torch.clamp(max_norm / (norm + eps), max=1.0), torch.nan)
            factor = clip if factor is None else clip * factor.to(clip.device)
        if found_inf is not None:
            base = torch.ones((), device=found_inf.device) if factor is None else factor
            factor = torch.where(found_inf.to(base.device) > 0, torch.nan, base)
        return factor

    def _check_step_groups(self) -> None:
        """Settings changed since the last step must still be valid (a tensor lr's value is
        not read: that would synchronise with its device). A group still holding, under the
        same keys, the very objects its last check left is not checked again: what the check
        reads of them cannot change in place (floats, tuples, strings, flags), except for a
        tensor lr's shape, so a group with one is always checked."""
        first = self.param_groups[0]["max_grad_norm"]
        previous, self._checked_groups = self._checked_groups, []
        for index, group in enumerate(self.param_groups):
            keys, values = list(group), list(group.values())
            seen = previous[index] if index < len(previous) else ([], [])
            if (isinstance(group["lr"], Tensor) or keys != seen[0]
                    or not all(map(is_, values, seen[1]))):
                check_group(group, index, read_tensors=False)
                keys, values = list(group), list(group.values())
            self._checked_groups.append((keys, values))
            if group["max_grad_norm"] != first:
                raise ValueError(
                    f"Invalid max_grad_norm in param group {index}: {group['max_grad_norm']!r}"
                    f" (allowed: {first!r}, as in every other group: clipping scales all "
                    "gradients by one global norm)")

    def _collect(self, group: dict[str, Any], index: int
                 ) -> list[tuple[Tensor, Tensor, str]]:
        """The parameters of a group that have gradients, with their storage formats, after
        checking everything that could make the step fail (nothing is changed here)."""
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adan does not support sparse gradients")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"a gradient of shape {tuple(p.grad.shape)} for a parameter "
                                   f"of shape {tuple(p.shape)} in param group {index}")
            fmt = storage_format(p, group["state_dtype"])
            if group["differentiable"] and fmt != "plain":
                raise ValueError(f"differentiable=True needs state in the parameter's dtype, "
                                 f"but a {p.dtype} parameter in param group {index} keeps "
                                 f"{fmt} state")
            state = self.state.get(p)
            if state:
                problem = shape_mismatch(state, p)
                if problem:
                    raise RuntimeError(f"Cannot step a parameter of param group {index}: "
                                       f"{problem}")
                if group["differentiable"] and state["step"].requires_grad:
                    raise RuntimeError(
                        "`requires_grad` is not supported for `step` in differentiable mode")
            out.append((p, p.grad, fmt))
        return out

    def _prepare_state(self, param: Tensor, fmt: str, group: dict[str, Any]) -> dict[str, Any]:
        """``param``'s state in format ``fmt``: created on first use, converted if the group's
        ``state_dtype`` (or the parameter's dtype) changed since the last step, and given
        its seed once it rounds stochastically."""
        state = self.state[param]
        if "step" not in state:
            state.update(init_sharded_state(param, fmt) if is_dtensor(param)
                         else init_state(param, fmt))
        elif not format_matches(state, param, fmt):
            if fmt == "int8":
                localize(state, param)
            convert_state(state, param, fmt)
        if "seed" not in state and rounds_stochastically(param, fmt,
                                                          group["stochastic_param_rounding"]):
            if self._rounding_base is None:  # one draw from torch's generator per optimizer
                self._rounding_base = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
            if self._indices is None:
                self._indices = {id(p): i for i, p in enumerate(chain.from_iterable(
                    g["params"] for g in self.param_groups))}
            state["seed"] = rounding_seed(self._rounding_base, self._indices[id(param)],
                                          state["step"].device)
        return state

    def _step_key(self, group: dict[str, Any], states: list[int],
                  params: list[Tensor] | None = None) -> tuple[list[Any] | None, list[Tensor]]:
        """What a group's cached plan depends on, read cheaply at every step (C-level maps,
        no Python code per tensor): the settings that pick kernels and formats; which
        parameters have gradients, and the dtypes, shapes and contiguity of their gradients;
        and ``states`` (:meth:`_states_key`). A parameter's dtype, shape or layout cannot
        change without its gradient's changing too (torch checks what ``.grad`` takes, and
        autograd lays gradients out like their parameters); a sparse gradient is not
        contiguous, so it renews the plan, whose checks refuse it. Addresses are not part of
        it: the kernels follow them at every step. The key is None where no plan is cached
        (a step traced by torch.compile). Returned with the gradients it read, in the order
        of the plan's parameters, which the step then launches with (no second read).
        ``params``: a part of the group's parameters instead of all (gradient release)."""
        params = group["params"] if params is None else params
        if torch.compiler.is_compiling():
            return None, [p.grad for p in params if p.grad is not None]
        grads = list(map(_grad, params))
        if not all(map(is_not, grads, repeat(None))):
            params = [p for p, g in zip(params, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        return [group["state_dtype"], group["foreach"], group["fused"], group["differentiable"],
                group["stochastic_param_rounding"], group["capturable"], *map(id, params),
                *map(_dtype, grads), *map(_shape, grads), *map(Tensor.is_contiguous, grads),
                *states], grads

    def _states_key(self) -> list[int]:
        """What the plans depend on in ``self.state``: a state dict, buffer or step count
        replaced by a new object renews the plans, so that no kernel goes on writing the
        orphaned one. The change count of :class:`adan.state.StateMap`; where someone put
        a plain dict into the map (or replaced it), the identities of every parameter with
        state, of its state dict and of every tensor in it."""
        state = self.state
        if type(state) is StateMap and not state.untracked:
            return [state.changes[0]]
        states = list(state.values())
        return [-1, *map(id, state), *map(id, states),
                *map(id, chain.from_iterable(map(dict.values, states)))]

    def _route(self, group: dict[str, Any], checked: list[tuple[Tensor, Tensor, str]]
               ) -> list[tuple[Kernel, str, list[int]]]:
        """The kernels of a group's checked parameters, one call per storage format, device
        and kernel, with the positions of the parameters each updates (nothing is changed:
        a fused kernel that cannot be built raises or falls back here)."""
        parts: dict[tuple[str, torch.device], list[int]] = {}
        for i, (param, _, fmt) in enumerate(checked):
            device = param.to_local().device if is_dtensor(param) else param.device
            parts.setdefault((fmt, device), []).append(i)
        calls = []
        for (fmt, _), members in parts.items():
            params, grads, states = [], [], []
            for i in members:
                param, grad, _ = checked[i]
                p, g, s = local_views(param, grad, self.state.get(param) or {})
                params.append(p)
                grads.append(g)
                states.append(s or None)
            for kernel, positions in route(group, fmt, params, grads, states):
                calls.append((kernel, fmt, [members[k] for k in positions]))
        return calls

    def _plan(self, group: dict[str, Any], checked: list[tuple[Tensor, Tensor, str]],
              routes: list[tuple[Kernel, str, list[int]]]) -> _Plan:
        """Prepare the state of a group's checked parameters (creating or converting it) and
        keep their kernel calls as a plan."""
        local: list[tuple[Tensor, dict[str, Any]]] = []
        for param, grad, fmt in checked:
            p, _, state = local_views(param, grad, self._prepare_state(param, fmt, group))
            local.append((p, state))
        everything = list(range(len(checked)))
        calls = [_Call(kernel, fmt, members, [local[m][0] for m in members],
                       [local[m][1] for m in members], {}, members == everything)
                 for kernel, fmt, members in routes]
        return _Plan(key=None, params=[p for p, _, _ in checked], calls=calls,
                     sharded=any(is_dtensor(p) for p, _, _ in checked))

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one step; ``closure``, if given, re-evaluates the model and returns the loss.

        Everything that can fail is checked before any parameter or state is written. A
        group's plan (its checked parameters, their formats and kernels) is kept while the
        parameters, gradients and state it was made from stay the same, so that a steady
        training loop pays only for reading addresses and launching kernels.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._release.before_step()
        self._check_step_groups()
        groups = self.param_groups
        states = self._states_key()
        keys, grads = zip(*[self._step_key(group, states) for group in groups], strict=True)
        stale = [i for i, key in enumerate(keys)
                 if key is None or getattr(self._plans.get(i), "key", None) != key]
        checked = {i: self._collect(groups[i], i) for i in stale}
        routes = {i: self._route(groups[i], checked[i]) for i in stale}
        grad_factor = self._grad_factor(getattr(self, "grad_scale", None),
                                        getattr(self, "found_inf", None))
        for i in stale:
            self._plans[i] = self._plan(groups[i], checked[i], routes[i])
        if stale:  # the new plans' keys, and the others' with the states as they now are
            states = self._keep_states()
            for i, plan in self._plans.items():
                if i < len(groups):
                    plan.key = None if plan.sharded else self._step_key(groups[i], states)[0]
        for i, group in enumerate(groups):
            self._run_plan(group, self._plans[i], grads[i], grad_factor)
        return loss

    def _keep_states(self) -> list[int]:
        """The states' key for plans made now (:meth:`_states_key`), keeping alive what it
        names by identity, so that no new object takes over one of those ids."""
        self._state_refs = [*self.state.values(),
                            *chain.from_iterable(map(dict.values, self.state.values()))]
        return self._states_key()

    @staticmethod
    def _run_plan(group: dict[str, Any], plan: _Plan, grads: list[Tensor],
                  grad_factor: Tensor | None) -> None:
        """Launch a plan's kernel calls with the group's current settings (a step of the
        group, or gradient release's step of one parameter); ``grads`` are those of the
        plan's parameters, in its order (DTensor ones then take their local shards). A call
        keeps its :class:`StepArgs` while the settings are the very objects it was made from
        (immutable ones, as :meth:`_check_step_groups` relies on)."""
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
                call.args = StepArgs.of_group(group, call.fmt, grad_factor, call.cache)
            call.kernel(call.params, mine, call.states, call.args)


@dataclass
class _Call:
    """One kernel call of a group's step: its kernel, format, the positions of its parameters
    among the group's checked ones, the (local) tensors and states, and the kernel's cache.
    ``whole``: the positions are all of them, in order (the gradients go as they are).
    ``args``: the last step's arguments, made from the group settings ``settings``."""

    kernel: Kernel
    fmt: str
    members: list[int]
    params: list[Tensor]
    states: list[dict[str, Any]]
    cache: dict[Any, Any]
    whole: bool = False
    settings: tuple[Any, ...] = ()
    args: StepArgs | None = None


@dataclass
class _Plan:
    """A group's checked parameters and kernel calls, valid while ``key`` still holds (see
    ``Adan._step_key``; None: re-planned at every step, as DTensor parameters are)."""

    key: list[Any] | None
    params: list[Tensor]
    calls: list[_Call]
    sharded: bool = False
