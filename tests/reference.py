"""An independent float64 Adan written from the equations in DEVELOPERS.md, in NumPy.

It shares no code with the package: tests compare every implementation against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefState:
    k: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    n: np.ndarray | None = None
    prev: np.ndarray | None = None


@dataclass
class RefGroup:
    params: list[np.ndarray]
    lr: float = 1e-3
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_prox: bool = False
    maximize: bool = False
    states: list[RefState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [np.array(p, dtype=np.float64) for p in self.params]
        self.states = [RefState() for _ in self.params]


class ReferenceAdan:
    """Adan over NumPy float64 arrays; ``step`` takes one gradient (or None) per parameter."""

    def __init__(self, groups: list[RefGroup], max_grad_norm: float = 0.0) -> None:
        self.groups = groups
        self.max_grad_norm = max_grad_norm

    def step(self, grads: list[list[np.ndarray | None]]) -> None:
        flat = [np.asarray(g, dtype=np.float64) for gs in grads for g in gs if g is not None]
        scale = 1.0
        if self.max_grad_norm > 0 and flat:
            norm = np.sqrt(sum(float(np.sum(g * g)) for g in flat))
            scale = min(1.0, self.max_grad_norm / (norm + self.groups[0].eps))
        for group, group_grads in zip(self.groups, grads, strict=True):
            b1, b2, b3 = group.betas
            lr, wd = group.lr, group.weight_decay
            for i, g in enumerate(group_grads):
                if g is None:
                    continue
                g = np.asarray(g, dtype=np.float64) * scale
                if group.maximize:
                    g = -g
                s = group.states[i]
                if s.k == 0:
                    s.m, s.v, s.n, s.prev = (np.zeros_like(g) for _ in range(4))
                    s.prev = g.copy()
                s.k += 1
                d = g - s.prev
                s.m = b1 * s.m + (1 - b1) * g
                s.v = b2 * s.v + (1 - b2) * d
                s.n = b3 * s.n + (1 - b3) * (g + b2 * d) ** 2
                den = np.sqrt(s.n) / np.sqrt(1 - b3**s.k) + group.eps
                u = (s.m / (1 - b1**s.k) + b2 * s.v / (1 - b2**s.k)) / den
                p = group.params[i]
                if group.no_prox:
                    group.params[i] = p * (1 - lr * wd) - lr * u
                else:
                    group.params[i] = (p - lr * u) / (1 + lr * wd)
                s.prev = g
