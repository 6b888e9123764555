"""The optimizers a convergence study compares: Adan, torch's baselines and peers' Adans.

Every contender is built from the task's param groups and a peak learning rate; all other
settings are fixed per model family and printed with the results, so tuning is over the
learning rate alone and equally for everyone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adan.optimizer import Adan
from benchmarks.peers import PEERS

__all__ = ["BASELINES", "CONTROL", "OURS", "PEER_NAMES", "available_peers", "build", "settings"]

OURS = "Adan"
# Our own per-tensor kernel: the same algorithm summed in another order. Its gap to the default
# kernel shows how far rounding alone moves a trajectory, the yardstick for the peers' gaps.
CONTROL = "Adan single-tensor (control)"
BASELINES = ("AdamW", "Adam", "NAdam", "RAdam", "SGD-Nesterov")
PEER_NAMES = tuple(name for name, _, _ in PEERS)

# nanoGPT's betas and decoupled weight decay for the Adam family on the language models;
# torch's defaults on the CNN. Adan: the paper's betas and weight decay 0.02.
_ADAM_BETAS = {"lm": (0.9, 0.99), "cnn": (0.9, 0.999)}
_SGD_DECAY = {"lm": 0.0, "cnn": 5e-4}


def settings(name: str, family: str) -> dict[str, Any]:
    """Constructor arguments other than ``lr`` of contender ``name`` on model ``family``."""
    if family not in _ADAM_BETAS:
        raise ValueError(f"family must be one of {sorted(_ADAM_BETAS)}, got {family!r}")
    betas = _ADAM_BETAS[family]
    table: dict[str, dict[str, Any]] = {
        OURS: dict(weight_decay=0.02),
        "AdamW": dict(betas=betas, weight_decay=0.1),
        "Adam": dict(betas=betas),
        "NAdam": dict(betas=betas, weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam": dict(betas=betas, weight_decay=0.1, decoupled_weight_decay=True),
        "SGD-Nesterov": dict(momentum=0.9, nesterov=True, weight_decay=_SGD_DECAY[family]),
    }
    table.update({peer: dict(table[OURS], **extra) for peer, _, extra in PEERS})
    table[CONTROL] = dict(table[OURS], foreach=False, fused=False)
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(table)}")
    return table[name]


_TORCH: dict[str, Callable[..., torch.optim.Optimizer]] = {
    OURS: Adan,
    CONTROL: Adan,
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "NAdam": torch.optim.NAdam,
    "RAdam": torch.optim.RAdam,
    "SGD-Nesterov": torch.optim.SGD,
}


def available_peers() -> list[str]:
    """Our control kernel, then the peers' Adans that can be loaded here."""
    found = [CONTROL]
    for name, load, _ in PEERS:
        try:
            if load() is not None:
                found.append(name)
        except Exception:  # noqa: BLE001, S112 - a broken install is as good as absent
            continue
    return found


def build(name: str, groups: list[dict[str, Any]], lr: float, family: str
          ) -> torch.optim.Optimizer:
    """Contender ``name`` over ``groups`` at peak learning rate ``lr``."""
    kwargs = dict(settings(name, family), lr=lr)
    if name in _TORCH:
        return _TORCH[name](groups, **kwargs)
    load = next(load for peer, load, _ in PEERS if peer == name)
    cls = load()
    if cls is None:
        raise RuntimeError(f"{name} is not installed")
    optimizer: torch.optim.Optimizer = cls(groups, **kwargs)
    return optimizer
