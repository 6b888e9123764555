"""Conversion of optimizer state dicts saved by other Adan implementations.

sail-sg/Adan and timm keep an integer ``step`` per param group and store the previous
gradient negated (``neg_pre_grad``; older sail-sg versions: ``pre_grad``). We keep a
per-parameter ``step`` tensor and ``prev_grad``, so a run can switch to us mid-training.
"""

from __future__ import annotations

from typing import Any

import torch

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
