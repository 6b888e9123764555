"""Host time of ``Adan.step`` on the CUDA path, measured on CPU with the Triton launch stubbed.

    python -m benchmarks.host_time [--clip 1.0] [--steps 300] [--set-to-none]

What a step costs the host besides launching the kernel: the plan check, the gradient factor
and the address-table check of :mod:`adan.kernels.triton`, over GPT-2's 148 tensors
(shapes scaled down: sizes do not matter to the host). The kernel is routed to for every
tensor and its launches replaced by no-ops, so the figure excludes Triton's own launch cost
(measured on a GPU by ``python -m benchmarks speed --device cuda``, column ``host ms``). On a
CPU the clipping norm also computes, so ``--clip`` overstates its host cost. ``--set-to-none``
gives every parameter a new gradient tensor before each step, as ``zero_grad(set_to_none=True)``
and backward do (only ``opt.step()`` is timed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import adan.stepping
from adan import Adan
from adan.kernels.triton import launch
from benchmarks.speed import gpt2_shapes


class _NoLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=float, default=0.0, help="max_grad_norm (0: none)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set-to-none", action="store_true",
                        help="new gradient tensors before every step")
    opts = parser.parse_args()

    launch._adan_kernel = _NoLaunch()  # type: ignore[assignment]
    launch._scalars_kernel = _NoLaunch()  # type: ignore[assignment]
    def to_triton(group: Any, fmt: Any, params: list[torch.Tensor], *rest: Any) -> Any:
        return [(launch.triton_adan, list(range(len(params))))]

    adan.stepping.route = to_triton  # type: ignore[assignment]
    params = [torch.nn.Parameter(torch.zeros(min(numel, 512))) for numel in
              (torch.Size(shape).numel() for shape in gpt2_shapes())]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = Adan(params, lr=1e-3, max_grad_norm=opts.clip)
    for _ in range(20):
        opt.step()
    times = []
    for _ in range(opts.steps):
        if opts.set_to_none:
            for p in params:
                p.grad = torch.ones_like(p)
        start = time.perf_counter()
        opt.step()
        times.append(1e3 * (time.perf_counter() - start))
    print(f"{len(params)} tensors, max_grad_norm={opts.clip}, set_to_none={opts.set_to_none}: "
          f"host ms per step median "
          f"{statistics.median(times):.3f}, min {min(times):.3f} ({opts.steps} steps)")


if __name__ == "__main__":
    main()
