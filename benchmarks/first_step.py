"""A fresh process's first ``opt.step()`` against its steady step, per state format.

    python -m benchmarks.first_step [--formats fp32,bf16,int8] [--steps 30] [--warm-cache]

Each format runs in a process of its own with an empty compile cache (``--warm-cache`` keeps
one cache for all, run once before), on an 8 x Linear(512, 512) MLP (2.1M parameters), default
settings; it prints the first step, the median steady step, when the fused kernel took over and
the process's wall time (``warm_up()`` waits for a build still running at the end). Run
from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, statistics, sys, time
import torch
from adan import Adan
fmt, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
opt = Adan(model.parameters(), lr=1e-3, state_dtype=None if fmt == "fp32" else fmt)
x = torch.randn(64, 512)

def step():
    model(x).square().mean().backward()
    start = time.perf_counter()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - start

times, switched = [], None
for k in range(steps):
    times.append(step())
    kernels = {c.kernel.__name__ for plan in opt._stepper.plans.values() for c in plan.calls}
    if switched is None and "cpu_compiled_adan" in kernels:
        switched = k + 1
if switched is None:  # still building: wait for it, then time the fused steps
    opt.warm_up()
    times += [step() for _ in range(10)]
print(json.dumps({"first": times[0], "steady": statistics.median(times[-10:]),
                  "switched": switched}))
"""


def run(fmt: str, steps: int, cache: str) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": "src"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, fmt, str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="fp32,bf16,int8")
    parser.add_argument("--steps", type=int, default=30, help="steps per process")
    parser.add_argument("--warm-cache", action="store_true",
                        help="one compile cache, filled by a first run of each format")
    opts = parser.parse_args(argv)
    formats = opts.formats.split(",")
    print(f"{'state':>6} {'first ms':>9} {'steady ms':>10} {'first - steady':>15} "
          f"{'fused from step':>16} {'process s':>10}", flush=True)
    with tempfile.TemporaryDirectory() as shared:
        for i, fmt in enumerate(formats):
            print(f"[{i + 1}/{len(formats)}] {fmt} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as own:
                cache = shared if opts.warm_cache else own
                if opts.warm_cache:
                    run(fmt, opts.steps, cache)
                r = run(fmt, opts.steps, cache)
            switched = "after warm_up()" if r["switched"] is None else str(r["switched"])
            print(f"{fmt:>6} {1e3 * r['first']:>9.1f} {1e3 * r['steady']:>10.2f} "
                  f"{r['first'] - r['steady']:>13.2f} s {switched:>16} {r['wall']:>10.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
