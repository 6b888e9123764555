"""Shared fixtures: a two-group problem run through the package and through the reference."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter; the variable
# must be set before the kernel module is imported (Triton reads it when decorating).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from reference import ReferenceAdan, RefGroup  # noqa: E402

import adan  # noqa: E402

SHAPES = [[(4, 3), (5,)], [(2, 2, 3), (7,)]]
GROUP_HPARAMS = [
    dict(lr=0.02, weight_decay=0.05),
    dict(lr=0.005, weight_decay=0.0, eps=1e-6, betas=(0.9, 0.95, 0.999)),
]


def has_grad(group: int, index: int, step: int) -> bool:
    """Which parameters get a gradient on a step: one starts late, one skips steps."""
    if (group, index) == (0, 1):
        return step >= 5
    if (group, index) == (1, 0):
        return step % 4 != 2
    return True


def gradients(steps: int, seed: int = 0, shapes: list[list[tuple[int, ...]]] = SHAPES):
    """A deterministic gradient sequence (float64), None where a parameter has no gradient."""
    rng = np.random.default_rng(seed)
    seq = []
    for k in range(1, steps + 1):
        seq.append(
            [
                [rng.normal(size=s) * (1 + 0.1 * k) if has_grad(gi, i, k) else None
                 for i, s in enumerate(group)]
                for gi, group in enumerate(shapes)
            ]
        )
    return seq


def initial_params(seed: int = 1, shapes: list[list[tuple[int, ...]]] = SHAPES):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s) for s in group] for group in shapes]


def run_pair(
    steps: int,
    dtype: torch.dtype,
    opt_kwargs: dict[str, Any],
    group_hparams: list[dict[str, Any]] = GROUP_HPARAMS,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[list[list[torch.Tensor]], ReferenceAdan, adan.Adan]:
    """Run the package and the reference on the same gradients; return both end states."""
    init = initial_params()
    tparams = [[torch.tensor(p, dtype=dtype, device=device) for p in g] for g in init]
    common = {k: v for k, v in opt_kwargs.items() if k in ("no_prox", "maximize")}
    groups = [
        {"params": ps, **hp} for ps, hp in zip(tparams, group_hparams, strict=True)
    ]
    opt = adan.Adan(groups, **opt_kwargs)
    ref_groups = []
    for ps, hp, g in zip(tparams, group_hparams, opt.param_groups, strict=True):
        ref_groups.append(
            RefGroup(
                [p.detach().double().cpu().numpy() for p in ps],
                lr=hp.get("lr", 1e-3),
                betas=tuple(g["betas"]),
                eps=g["eps"],
                weight_decay=g["weight_decay"],
                **common,
            )
        )
    ref = ReferenceAdan(ref_groups, max_grad_norm=opt_kwargs.get("max_grad_norm", 0.0))
    for grads in gradients(steps, seed):
        cast = [[None if g is None else torch.tensor(g, dtype=dtype, device=device) for g in gs]
                for gs in grads]
        for ps, gs in zip(tparams, cast, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
        opt.step()
        ref.step([[None if g is None else g.double().cpu().numpy() for g in gs] for gs in cast])
    return tparams, ref, opt


def step_beside_reference(p: torch.Tensor, opt: torch.optim.Optimizer, ref: ReferenceAdan,
                          rng: np.random.Generator, steps: int, offset: float = 0.0) -> None:
    """Step the optimizer of the single parameter ``p`` and the reference on the same
    gradients: normal draws from ``rng`` shaped like ``p``, plus ``offset``."""
    for _ in range(steps):
        g = rng.normal(size=tuple(p.shape)) + offset
        p.grad = torch.tensor(g, dtype=p.dtype, device=p.device)
        opt.step()
        ref.step([[g]])


def assert_matches_reference(
    tparams: list[list[torch.Tensor]], ref: ReferenceAdan, opt: adan.Adan, rtol: float,
    atol: float,
) -> None:
    """Parameters and every state buffer agree with the reference."""
    for ps, rg in zip(tparams, ref.groups, strict=True):
        for p, rp, rs in zip(ps, rg.params, rg.states, strict=True):
            np.testing.assert_allclose(p.detach().double().cpu().numpy(), rp, rtol=rtol,
                                       atol=atol)
            if rs.k == 0:
                assert p not in opt.state or "step" not in opt.state[p]
                continue
            st = opt.state[p]
            assert st["step"].item() == rs.k
            for key, arr in (("exp_avg", rs.m), ("exp_avg_diff", rs.v), ("exp_avg_sq", rs.n),
                             ("prev_grad", rs.prev)):
                np.testing.assert_allclose(st[key].double().cpu().numpy(), arr, rtol=rtol,
                                           atol=atol, err_msg=key)


def assert_same_runs(params_a, opt_a, params_b, opt_b) -> None:
    """Two runs ended with the same bits: parameters and every entry of their states."""
    for p, q in zip(params_a, params_b, strict=True):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b.state[q][key]), key
            else:  # the 8-bit codes' version
                assert value == opt_b.state[q][key], key


def allow_grad_dtype(p: torch.Tensor) -> None:
    """Let ``p`` take a gradient of another dtype (newer torch checks ``grad_dtype``)."""
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded, and fused kernels built when first routed to (tests of the background build
    turn it on), so that a test knows which kernel steps."""
    from adan.kernels import routing

    torch.manual_seed(0)
    monkeypatch.setattr(routing, "BACKGROUND", False)


def tiny_text(length: int = 4000) -> str:
    """A pseudo-random 53-character phrase repeated, so a tiny model can learn it quickly."""
    rng = random.Random(0)
    phrase = "".join(rng.choice("abcdefg hij\n") for _ in range(53))
    return (phrase * (length // len(phrase) + 1))[:length]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A tiny training text on disk, for the char-level GPT and the demo."""
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine they stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def route_cpu_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every CPU group to the Triton kernel, as ``fused=True`` on CUDA (its tensors run
    through Triton's interpreter; tensors it does not take go to the eager fallback)."""
    from adan.kernels import routing

    table = dict(routing.TABLE)
    for compact in (False, True):
        table[("cpu", compact, "fused")] = "triton"
    monkeypatch.setattr(routing, "TABLE", table)
    monkeypatch.setattr(routing, "choice", lambda group: "fused")
