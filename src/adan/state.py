"""Adan's per-parameter state: its storage formats, creation, conversion and checking.

A parameter's state is ``step`` (a 0-d float tensor on the parameter's device) and four
buffers, ``exp_avg`` (m), ``exp_avg_diff`` (v), ``exp_avg_sq`` (n) and ``prev_grad``, stored in
one of these formats (:func:`storage_format` picks it from the group's ``state_dtype``):

* ``"plain"``: the parameter's own dtype and layout (complex parameters keep complex buffers).
* ``"fp32"``: float32, shaped like the parameter's real view (for bf16, fp16 or fp64 params).
* ``"bf16"``: bfloat16, re-encoded with stochastic rounding after every step.
* ``"int8"``: blockwise 8-bit codes (:mod:`adan.quant`) shaped like the parameter's real
  view, with a flat ``<buffer>_meta`` float32 tensor of 3 numbers per block (blocks run
  over the flattened codes).

State that rounds stochastically (``"bf16"``, ``"int8"``, or a bfloat16 parameter written
with stochastic rounding) also keeps ``seed``, a 0-d int64 tensor made when that state is
created (:func:`rounding_seed`) and saved with it: the rounding noise of a step is a function
of (seed, step count, element) alone, so every path draws the same noise, a resumed run
rounds as the uninterrupted one, and a step draws nothing from torch's generator.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import BUFFER_KEYS, BUFFERS, real_view
from adan.quant import (
    GOLDEN,
    M32,
    META,
    dequantize_blockwise,
    legacy_meta,
    mix32,
    num_blocks,
    quantize_blockwise_flat,
)

__all__ = [
    "check_saved_state",
    "convert_state",
    "decode",
    "init_state",
    "normalize_state_dtype",
    "state_bytes",
    "storage_format",
]

_ALIASES: dict[Any, str | None] = {
    None: None,
    "fp32": "fp32", "float32": "fp32", torch.float32: "fp32",
    "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
    "int8": "int8", torch.int8: "int8",
}
_STATE_DTYPE_HELP = (
    "allowed: None (as the parameter; float32 for float16 parameters), 'fp32', 'bf16', 'int8' "
    "(or torch.float32, torch.bfloat16, torch.int8)"
)


def normalize_state_dtype(value: Any, where: str = "") -> str | None:
    """Map a user's ``state_dtype`` to None, ``"fp32"``, ``"bf16"`` or ``"int8"``, or raise
    (``where``, e.g. " in param group 1", is added to the message)."""
    try:
        return _ALIASES[value]
    except (KeyError, TypeError):
        hint = ""
        if value in ("fp16", "float16", torch.float16):
            hint = ("; float16 cannot hold Adan's second moment (it underflows for gradients "
                    "near 1e-3), so it is not offered")
        raise ValueError(f"Invalid state_dtype{where}: {value!r} ({_STATE_DTYPE_HELP}){hint}"
                         ) from None


def storage_format(param: Tensor, state_dtype: str | None) -> str:
    """The storage format of ``param``'s state for a group's ``state_dtype``.

    None keeps the parameter's dtype, except float16, whose state is float32: float16 cannot
    hold ``n`` (squares of small gradients underflow, and so does ``eps``).
    """
    dtype = real_view(param).dtype
    if state_dtype is None:
        return "fp32" if dtype == torch.float16 else "plain"
    if state_dtype == "fp32":
        return "plain" if dtype == torch.float32 else "fp32"
    return state_dtype


def work_dtype(param: Tensor) -> torch.dtype:
    """The dtype updates are computed in: float32, or float64 for float64 parameters."""
    return torch.promote_types(real_view(param).dtype, torch.float32)


def _buffer_dtype(param: Tensor, fmt: str, signed: bool) -> torch.dtype:
    if fmt == "int8":
        return torch.int8 if signed else torch.uint8
    return {"plain": param.dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[fmt]


def _new_buffer(param: Tensor, fmt: str, signed: bool) -> Tensor:
    if fmt == "plain":
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return torch.zeros(real_view(param).shape, dtype=_buffer_dtype(param, fmt, signed),
                       device=param.device)


def step_dtype() -> torch.dtype:
    """The dtype of step counts: float64 when that is torch's default dtype, as torch's own
    optimizers do, else float32 (exact up to 2**24 steps)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_state(param: Tensor, fmt: str) -> dict[str, Tensor]:
    """Zeroed state for ``param`` in format ``fmt``, the step count on the parameter's device."""
    state = {"step": torch.zeros((), dtype=step_dtype(), device=param.device)}
    for key, signed in BUFFERS:
        state[key] = _new_buffer(param, fmt, signed)
        if fmt == "int8":
            state[key + "_meta"] = torch.zeros(num_blocks(real_view(param).numel()) * META,
                                               device=param.device)
    return state


def rounds_stochastically(param: Tensor, fmt: str, stochastic_param: bool) -> bool:
    """Whether a step of ``param`` with state in ``fmt`` rounds anything stochastically
    (compact state, or a bfloat16 parameter written with stochastic rounding): such a
    state keeps a seed."""
    return fmt in ("bf16", "int8") or (stochastic_param and real_view(param).dtype
                                       == torch.bfloat16)


def rounding_seed(base: int, index: int, device: torch.device) -> Tensor:
    """The stochastic-rounding seed of the optimizer's ``index``-th parameter, as a 0-d int64
    tensor on ``device``: a hash of the optimizer's base seed (drawn once from torch's
    generator) and the index, so that it does not depend on the order in which states are
    created (gradient release creates them in backward's order)."""
    value = int(mix32((base + index * GOLDEN) & M32)) & 0x7FFFFFFF
    return torch.full((), value, dtype=torch.int64, device=device)


def _buffer_shape(param: Tensor, fmt: str) -> tuple[int, ...]:
    return tuple(param.shape if fmt == "plain" else real_view(param).shape)


def format_matches(state: dict[str, Any], param: Tensor, fmt: str) -> bool:
    """Whether ``state``'s buffers are all stored as format ``fmt`` stores them for ``param``
    (8-bit codes are checked on the local shard of a DTensor parameter)."""
    if fmt == "int8" and hasattr(param, "to_local"):
        param = param.to_local()
    for key, signed in BUFFERS:
        buffer = state.get(key)
        if (not isinstance(buffer, Tensor) or (fmt == "int8") != (key + "_meta" in state)
                or buffer.dtype != _buffer_dtype(param, fmt, signed)
                or tuple(buffer.shape) != _buffer_shape(param, fmt)):
            return False
    return True


def shape_mismatch(state: dict[str, Any], param: Tensor) -> str | None:
    """Why ``state`` cannot belong to ``param`` (it was made for another shape), or None."""
    buffer = state.get("exp_avg")
    if not isinstance(buffer, Tensor):
        return None
    if "exp_avg_meta" in state and hasattr(param, "to_local"):
        param = param.to_local()  # 8-bit codes belong to the local shard
    if tuple(real_view(buffer).shape) == tuple(real_view(param).shape):
        return None
    return (f"its state was made for shape {tuple(buffer.shape)} but the parameter now has "
            f"shape {tuple(param.shape)}; a reshaped or resized parameter needs fresh state "
            "(del optimizer.state[param])")


def decode(state: dict[str, Any], key: str, signed: bool, param: Tensor,
           dtype: torch.dtype) -> Tensor:
    """Buffer ``key`` as a ``dtype`` tensor shaped like ``param``'s real view."""
    shape = real_view(param).shape
    value = state[key]
    if key + "_meta" in state:
        return dequantize_blockwise(value, state[key + "_meta"], shape, signed=signed,
                                    dtype=dtype)
    if key + "_scale" in state:  # an 8-bit checkpoint saved before blocks kept their top
        return dequantize_blockwise(value, legacy_meta(state[key + "_scale"]), shape,
                                    signed=signed, dtype=dtype)
    return real_view(value).to(dtype).reshape(shape)


def _local(t: Any) -> Any:
    """A DTensor's local shard; anything else unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def convert_state(state: dict[str, Any], param: Tensor, fmt: str) -> None:
    """Re-encode ``state``'s buffers in place into format ``fmt``, rounding to nearest.

    Conversions are deterministic; a state already in ``fmt`` is left untouched. For a DTensor
    parameter each rank converts its shard: 8-bit codes belong to the shard, other buffers are
    DTensors laid out like the parameter.
    """
    if "exp_avg" not in state or format_matches(state, param, fmt):
        return
    local = _local(param)
    for key, signed in BUFFERS:
        view = {k: _local(v) for k, v in state.items() if k.startswith(key)}
        value = decode(view, key, signed, local, torch.float64)
        state.pop(key + "_meta", None)
        state.pop(key + "_scale", None)
        if fmt == "int8":
            codes, state[key + "_meta"] = quantize_blockwise_flat(value.float(), signed=signed)
            state[key] = codes.view(value.shape)
            continue
        if fmt == "plain" and torch.is_complex(param):
            new = torch.view_as_complex(value.to(real_view(local).dtype).contiguous())
        else:
            new = value.to(_buffer_dtype(param, fmt, signed)).reshape(_buffer_shape(local, fmt))
        if local is not param:
            new = type(param).from_local(new, param.device_mesh, param.placements,  # type: ignore[attr-defined]
                                         shape=param.shape, stride=param.stride())
        state[key] = new


def state_bytes(states: list[dict[str, Any]]) -> int:
    """Bytes held by the buffers of the given per-parameter states (the step count excluded)."""
    return sum(v.numel() * v.element_size() for s in states for k, v in s.items()
               if k not in ("step", "seed") and isinstance(v, Tensor))


def _as_step(value: Any) -> float | None:
    """A saved step count as a float, or None if it is not a finite count >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def check_saved_state(saved: Any, param: Tensor) -> str | None:
    """What is wrong with a saved per-parameter state for ``param``, or None if it can load.

    Accepted: any storage format (it is converted on load), a number or tensor ``step``, and
    8-bit checkpoints from before block tops existed (``<buffer>_scale``).
    """
    if not isinstance(saved, dict):
        return f"its state is a {type(saved).__name__}, not a dict"
    if not saved:
        return None
    if "exp_avg" in saved and "exp_avg_diff" not in saved:
        return ("it has exp_avg but no exp_avg_diff: this is not Adan's state (an AdamW or "
                "Adam checkpoint?); Adan keeps exp_avg, exp_avg_diff, exp_avg_sq and prev_grad")
    if "step" not in saved:
        return "it has no 'step' (the step count its bias corrections need)"
    step = _as_step(saved["step"])
    if step is None:
        return f"its 'step' is {saved['step']!r}, not a finite count >= 0"
    seed = saved.get("seed")
    if seed is not None and not (
            isinstance(seed, Tensor) and seed.numel() == 1 and seed.dtype == torch.int64):
        return (f"its 'seed' is {seed!r}; the stochastic-rounding seed is a 1-element int64 "
                "tensor")
    wanted = list(BUFFER_KEYS if step > 0 else BUFFER_KEYS[:3])
    missing = [k for k in wanted if k not in saved]
    if missing:
        return f"it lacks {', '.join(missing)}"
    numel = real_view(param).numel()
    for key, signed in BUFFERS:
        if key not in saved:
            continue
        value = saved[key]
        if not isinstance(value, Tensor):
            return f"its {key} is {type(value).__name__}, not a tensor"
        meta = saved.get(key + "_meta", saved.get(key + "_scale"))
        if meta is not None:
            # Codes are shaped like the parameter's real view (flat before block tops existed).
            shape = real_view(param).shape if key + "_meta" in saved else (numel,)
            code = torch.int8 if signed else torch.uint8
            if value.dtype != code or value.shape != shape:
                return (f"its 8-bit {key} has {value.dtype} codes of shape {tuple(value.shape)};"
                        f" the parameter needs {code} codes of shape {tuple(shape)}")
            rows = num_blocks(numel)
            want = (rows * META,) if key + "_meta" in saved else (rows,)
            if not isinstance(meta, Tensor) or tuple(meta.shape) != want:
                got = tuple(meta.shape) if isinstance(meta, Tensor) else type(meta).__name__
                return f"its {key} block data has shape {got}, expected {want}"
            continue
        if not (value.is_floating_point() or value.is_complex()):
            return f"its {key} has dtype {value.dtype}, not a floating dtype"
        if tuple(real_view(value).shape) != tuple(real_view(param).shape):
            return (f"its {key} has shape {tuple(value.shape)} but the parameter has shape "
                    f"{tuple(param.shape)}")
    return None


_MISSING = object()


class _CountsRemovals:
    """Removals that count in ``self.changes`` (mixed into the two dicts below)."""

    __slots__ = ()
    changes: list[int]

    def __delitem__(self, key: Any) -> None:
        self.changes[0] += 1
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        self.changes[0] += 1
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self.changes[0] += 1
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self.changes[0] += 1
        super().clear()  # type: ignore[misc]


class TrackedState(_CountsRemovals, dict):
    """One parameter's state dict that counts, in its map's ``changes``, every change of the
    objects it holds (not in-place writes into them), so that the optimizer can tell at no
    cost per tensor whether a cached step plan (which holds addresses) is still valid.
    Pickled, saved and deep-copied as a plain dict."""

    __slots__ = ("changes",)

    def __init__(self, changes: list[int], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changes = changes

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.get(key, _MISSING) is not value:  # ``state["step"] += 1`` changes nothing
            self.changes[0] += 1
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.changes[0] += 1
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.changes[0] += 1
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> TrackedState:  # type: ignore[misc]
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        return dict, (dict(self),)


class StateMap(_CountsRemovals, defaultdict):
    """The optimizer's ``state`` (a ``defaultdict(dict)``, as torch's): parameters' states are
    :class:`TrackedState` dicts sharing one change count. A plain dict stored into it keeps
    working (it is not copied) but marks the map ``untracked``: the optimizer then checks
    every state's contents at each step instead of the count."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__(None)
        self.changes = [0]
        self.untracked = False
        self.default_factory = self._new
        for key, value in dict(items).items():
            self[key] = TrackedState(self.changes, value) if type(value) is dict else value

    def _new(self) -> TrackedState:
        return TrackedState(self.changes)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.changes[0] += 1
        if not (isinstance(value, TrackedState) and value.changes is self.changes):
            self.untracked = True
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self) -> Any:
        return defaultdict, (dict,), None, None, iter(self.items())
