"""Checkpoints: Adan's state dicts saved and loaded atomically, and those of sail-sg/Adan and
timm's Adan converted on load, so that a run can switch to this package mid-training."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from adan.checks import check_group, check_release, check_same_max_grad_norm
from adan.numeric.codes import META, mx_blocks, num_blocks
from adan.numeric.scalars import real_view
from adan.state.dtensor import local
from adan.state.formats import (
    BUFFER_KEYS,
    BUFFERS,
    CODES_KEY,
    MX2_CODES,
    MX_CODES,
    storage_format,
)
from adan.state.lifecycle import convert_state, step_dtype
from adan.state.sharded import check_loaded_sharding, dequantize_for_saving, localize

__all__ = ["convert_foreign_state_dict", "prepare_load", "saved_state"]


def saved_state(state_dict: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """torch's state dict with 8-bit state of DTensor (FSDP2) parameters dequantised as
    float32 DTensors, which ``torch.distributed.checkpoint`` can reshard."""
    for index, param in enumerate(params):
        if index in state_dict["state"]:
            state_dict["state"][index] = dict(dequantize_for_saving(
                state_dict["state"][index], param))
    return state_dict


def prepare_load(state_dict: dict[str, Any], current: list[dict[str, Any]],
                 defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], defaultdict[Tensor, Any]]:
    """The param groups and state that ``state_dict`` (already in this package's format)
    loads into, for an optimizer with param groups ``current``; built and checked without
    changing anything, so that a failure leaves the optimizer as it was."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("Cannot load the optimizer state: expected a dict with 'state' and "
                         "'param_groups' (from Optimizer.state_dict())")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(current):
        raise ValueError(f"Cannot load the optimizer state: it has {len(saved_groups)} "
                         f"param groups, this optimizer {len(current)}")
    groups: list[dict[str, Any]] = []
    for index, (group, saved) in enumerate(zip(current, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"Cannot load the optimizer state: its param group {index} has "
                             f"{len(saved['params'])} parameters, this optimizer's "
                             f"{len(group['params'])}")
        new = {**defaults, **deepcopy({k: v for k, v in saved.items() if k != "params"})}
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new["param_names"] = group["param_names"]
        new["state_dtype"] = group["state_dtype"]
        new["gradient_release"] = group.get("gradient_release", False)
        check_group(new, index)
        check_release(new, new["params"], index)
        if groups:
            check_same_max_grad_norm(new["max_grad_norm"], groups[0]["max_grad_norm"], index)
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
        state[param] = _loaded_entry(saved, param, groups[gi])
    return groups, state


def _loaded_entry(saved: dict[str, Any], param: Tensor, group: dict[str, Any]
                  ) -> dict[str, Any]:
    """One parameter's loaded state on its device, converted to the group's format."""
    if not saved:
        return {}
    device = local(param).device
    step = saved["step"]
    entry = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in saved.items()}
    entry["step"] = torch.as_tensor(step.item() if isinstance(step, Tensor) else step,
                                    dtype=step_dtype()).to(device).reshape(())
    if "seed" in entry:
        entry["seed"] = entry["seed"].reshape(())
    fmt = storage_format(param, group["state_dtype"])
    if "prev_grad" not in entry:  # a state saved at step 0 (e.g. after restart())
        entry["prev_grad"] = torch.zeros_like(real_view(param), dtype=torch.float32)
    if fmt.quantized:
        localize(entry, param)
    convert_state(entry, param, fmt)
    return entry


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

    Accepted: any storage format (it is converted on load), 8-bit codes of this version, of
    version 2 or the power codes of before (``<buffer>_meta``), and a number or tensor
    ``step``.
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
    codes = saved.get(CODES_KEY, MX_CODES)
    if codes not in (MX_CODES, MX2_CODES):
        return (f"its 8-bit codes are {codes!r}, which this version cannot read (it reads "
                f"{MX_CODES!r}, {MX2_CODES!r} and the older power codes)")
    wanted = list(BUFFER_KEYS if step > 0 else BUFFER_KEYS[:3])
    missing = [k for k in wanted if k not in saved]
    if missing:
        return f"it lacks {', '.join(missing)}"
    shape = real_view(param).shape
    for key, signed in BUFFERS:
        if key not in saved:
            continue
        value = saved[key]
        if not isinstance(value, Tensor):
            return f"its {key} is {type(value).__name__}, not a tensor"
        blocks = {"_exp": (mx_blocks(shape.numel()),),
                  "_meta": (num_blocks(shape.numel()) * META,)}
        suffix = next((s for s in blocks if key + s in saved), None)
        if suffix is not None:
            meta = saved[key + suffix]
            code = torch.int8 if signed else torch.uint8
            if value.dtype != code or value.shape != shape:
                return (f"its 8-bit {key} has {value.dtype} codes of shape {tuple(value.shape)};"
                        f" the parameter needs {code} codes of shape {tuple(shape)}")
            if not isinstance(meta, Tensor) or tuple(meta.shape) != blocks[suffix]:
                got = tuple(meta.shape) if isinstance(meta, Tensor) else type(meta).__name__
                return f"its {key} block data has shape {got}, expected {blocks[suffix]}"
            continue
        if not (value.is_floating_point() or value.is_complex()):
            return f"its {key} has dtype {value.dtype}, not a floating dtype"
        if real_view(value).shape != shape:
            return (f"its {key} has shape {tuple(value.shape)} but the parameter has shape "
                    f"{tuple(param.shape)}")
    return None


_GROUP_KEYS_TO_DROP = ("step", "foreach", "fused")


def is_foreign_state_dict(state_dict: dict[str, Any]) -> bool:
    """True if the state dict comes from sail-sg/Adan or timm rather than from this package."""
    if any("step" in group for group in state_dict["param_groups"]):
        return True
    return any(
        "neg_pre_grad" in s or "pre_grad" in s for s in state_dict["state"].values()
    )


def convert_foreign_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Return ``state_dict`` in this package's format (unchanged if it already is)."""
    if not is_foreign_state_dict(state_dict):
        return state_dict
    groups, state = [], {}
    for group in state_dict["param_groups"]:
        if group.get("caution"):
            raise ValueError(
                "cannot load a state dict of timm's 'cautious' Adan (caution=True): "
                "its update is not Adan's"
            )
        step = float(group.get("step", 0))
        for pid in group["params"]:
            old = state_dict["state"].get(pid)
            if not old:
                continue
            new = {key: old[key] for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq")}
            if "neg_pre_grad" in old:
                new["prev_grad"] = -old["neg_pre_grad"]
            elif "pre_grad" in old:
                new["prev_grad"] = old["pre_grad"].clone()
            new["step"] = torch.tensor(float(old.get("step", step)), dtype=torch.float32)
            state[pid] = new
        groups.append(
            {k: v for k, v in group.items() if k not in _GROUP_KEYS_TO_DROP and k != "caution"}
        )
    return {"state": state, "param_groups": groups}
