"""Optimizer-step speed against the memory floor and the peers: ``python -m adan.bench.speed``.

A step is memory-bound, so each row is compared with its floor: the bytes the step must move
(44 per fp32 element for Adan, 28 for AdamW) over the in-place bandwidth measured in the same
run on a buffer larger than the last-level cache.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from adan import Adan
from adan.bench.peers import PEERS

# Bytes an fp32 step must read and write per element: Adan reads p, g, m, v, n, prev and
# writes p, m, v, n, prev; AdamW reads p, g, m, v and writes p, m, v.
ADAN_BYTES, ADAMW_BYTES = 44, 28

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def gpt2_shapes(d: int = 384, layers: int = 12, vocab: int = 8192, ctx: int = 1024
                ) -> list[tuple[int, ...]]:
    """GPT-2-small-shaped parameter list (148 tensors incl. biases and norms; ~24.8M here)."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d), *block * layers, (d,), (d,)]


def workloads(numel: int) -> dict[str, list[tuple[int, ...]]]:
    """(a) ~75M params in 10 large tensors, (b) GPT-2-shaped, (c) ``numel`` in one tensor."""
    return {"large-75M": [(7_550_000,)] * 10, "gpt2-148": gpt2_shapes(),
            f"custom-{numel}": [(numel,)]}


def bandwidth(device: torch.device, numel: int = 1 << 28) -> float:
    """In-place read+write bandwidth in GB/s on a buffer past the last-level cache."""
    buf = torch.ones(numel, device=device)
    times = []
    for _ in range(7):
        _sync(device)
        start = time.perf_counter()
        buf.mul_(1.0)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * buf.numel() * buf.element_size() / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _factory(cls: type, kwargs: dict[str, Any]) -> Factory:
    return lambda ps: cls(ps, **kwargs)  # type: ignore[no-any-return]


def rows() -> list[tuple[str, int, Factory | str]]:
    """(name, bytes per element, optimizer factory or why the row is skipped)."""
    hp: dict[str, Any] = dict(lr=1e-3, weight_decay=0.02)
    out: list[tuple[str, int, Factory | str]] = [
        ("adan default", ADAN_BYTES, lambda ps: Adan(ps, **hp)),
        ("adan fused", ADAN_BYTES, lambda ps: Adan(ps, fused=True, **hp)),
        ("adan foreach", ADAN_BYTES, lambda ps: Adan(ps, foreach=True, fused=False, **hp)),
        ("adan single", ADAN_BYTES, lambda ps: Adan(ps, foreach=False, fused=False, **hp)),
        ("torch AdamW fused", ADAMW_BYTES, lambda ps: torch.optim.AdamW(ps, fused=True, **hp)),
        ("torch AdamW foreach", ADAMW_BYTES,
         lambda ps: torch.optim.AdamW(ps, foreach=True, **hp)),
    ]
    for name, load, extra in PEERS:
        try:
            cls = load()
        except Exception as exc:  # noqa: BLE001 - a broken peer is a skipped row, not a crash
            out.append((name, ADAN_BYTES, f"skipped: {exc}"))
            continue
        if cls is None:
            out.append((name, ADAN_BYTES, "skipped: not installed"))
            continue
        out.append((name, ADAN_BYTES, _factory(cls, {**hp, **extra})))
    return out


def time_row(factory: Factory, shapes: list[tuple[int, ...]], device: torch.device,
             steps: int, warmup: int) -> dict[str, float]:
    """First-step seconds, median ms per later step (lr changing each step), state bytes/param,
    and how many graphs ``torch.compile`` built after the first step."""
    from torch._dynamo.utils import counters

    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    opt = factory(params)
    _sync(device)
    start = time.perf_counter()
    opt.step()
    _sync(device)
    first = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for i in range(warmup + steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 + 0.01 * i)
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    numel = sum(p.numel() for p in params)
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return dict(first_s=first, ms=1e3 * statistics.median(times[warmup:]),
                state_bytes=state_bytes / numel,
                recompiles=counters["stats"]["unique_graphs"] - graphs)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table per workload."""
    parser = argparse.ArgumentParser(prog="python -m adan.bench.speed", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", action="append",
                        help="large-75M, gpt2-148 or custom (default: all)")
    parser.add_argument("--numel", type=int, default=10_000_000,
                        help="elements of the custom workload")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: torch's); 1 avoids OpenMP stalls when busy")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="buffer size for the bandwidth measurement (past the LLC)")
    parser.add_argument("--rows", default="", help="comma-separated substrings of row names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = bandwidth(device, args.bandwidth_mib << 18)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"in-place bandwidth {bw:.1f} GB/s ({args.bandwidth_mib} MiB buffer)")
    wanted = args.rows.split(",") if args.rows else []
    chosen = args.workload or ["large", "gpt2", "custom"]
    for name, shapes in workloads(args.numel).items():
        if not any(name.startswith(w) for w in chosen):
            continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n## {name}: {numel / 1e6:.1f}M params in {len(shapes)} tensors")
        print(f"{'row':26} {'ms/step':>9} {'GB/s':>7} {'x floor':>8} {'first s':>8} "
              f"{'graphs+':>7} {'state B/p':>9} {'vs timm':>8}")
        results: list[tuple[str, int, dict[str, float] | str]] = []
        for row, nbytes, factory in rows():
            if wanted and not any(w in row for w in wanted):
                continue
            results.append((row, nbytes, factory if isinstance(factory, str)
                            else time_row(factory, shapes, device, args.steps, args.warmup)))
        timm_ms = next((r["ms"] for row, _, r in results
                        if row.startswith("timm") and not isinstance(r, str)), None)
        for row, nbytes, r in results:
            if isinstance(r, str):
                print(f"{row:26} {r}")
                continue
            floor_ms = 1e3 * numel * nbytes / (bw * 1e9)
            speedup = f"{timm_ms / r['ms']:.2f}x" if timm_ms else "-"
            print(f"{row:26} {r['ms']:9.1f} {numel * nbytes / r['ms'] / 1e6:7.1f} "
                  f"{r['ms'] / floor_ms:8.2f} {r['first_s']:8.2f} {r['recompiles']:7.0f} "
                  f"{r['state_bytes']:9.1f} {speedup:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
