"""Optimizer-step speed against the memory floor and the peers: ``python -m benchmarks speed``.

A step is memory-bound, so each row is compared with its floor: the bytes the step must move
(twice the parameters, the gradients once, twice the persistent state: 44 per element for fp32
Adan, 28 for AdamW, 22 for Adan on bf16 parameters) over the bandwidth measured at the start
of the run (CPU: in-place ``mul_`` on a buffer past the last-level cache; CUDA: a device-to-device
copy). A row whose working set (parameters, gradients, state) fits in the last-level cache is
not bound by that bandwidth: its floor uses the bandwidth measured on a buffer of the working
set's size, and the table marks it. Every row runs side by side in one process, on fresh random
parameters and gradients.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adan import Adan
from benchmarks.peers import PEERS, find_peers_dir, load_peer, load_sail_sg_adan

__all__ = ["ADAMW_BYTES", "ADAN_BYTES", "Row", "Workload", "bandwidth", "cache_bytes",
           "gpt2_shapes",
           "llama_shapes", "main", "moved_bytes", "rows", "select_workloads", "time_row",
           "workloads"]

# Bytes an fp32 step must read and write per element: Adan reads p, g, m, v, n, prev and
# writes p, m, v, n, prev; AdamW reads p, g, m, v and writes p, m, v. The benchmark computes
# each row's bytes from its tensors (``moved_bytes``); these are the fp32 values it must match.
ADAN_BYTES, ADAMW_BYTES = 44, 28

# The hyperparameters every row shares (Adan's defaults; AdamW keeps its own betas).
LR, WEIGHT_DECAY, EPS = 1e-3, 0.02, 1e-8
ADAN_BETAS = (0.98, 0.92, 0.99)

Shapes = list[tuple[int, ...]]
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def gpt2_shapes(d: int = 384, layers: int = 12, vocab: int = 8192, ctx: int = 1024) -> Shapes:
    """GPT-2-shaped parameter list with tied embeddings: 148 tensors incl. biases and norms
    (the defaults give the small CPU variant, ~24.8M; ``gpt2_shapes(768, 12, 50257)`` is GPT-2
    small, ~124.4M)."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d), *block * layers, (d,), (d,)]


def llama_shapes(d: int = 2048, layers: int = 16, ffn: int = 5632, kv: int = 512,
                 vocab: int = 32000) -> Shapes:
    """Llama-shaped parameter list: per layer an RMSNorm weight, q and o (d, d), grouped-query
    k and v (kv, d), another RMSNorm weight and the gated MLP (ffn, d), (ffn, d), (d, ffn); an
    untied embedding and lm head, a final norm; no biases. 147 tensors, ~852.6M by default."""
    block = [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return [(vocab, d), *block * layers, (d,), (vocab, d)]


@dataclass(frozen=True)
class Workload:
    """A named list of parameter shapes, all of one dtype."""

    name: str
    shapes: Shapes
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)


def workloads(numel: int) -> dict[str, Workload]:
    """Every workload, by name. CPU: ~75M in 10 tensors, the small GPT-2-shaped list, ``numel``
    in one tensor. CUDA: 8 tensors of 32M, GPT-2 small, Llama-shaped in fp32 and in bf16."""
    llama = llama_shapes()
    return {w.name: w for w in (
        Workload("large-75M", [(7_550_000,)] * 10),
        Workload("gpt2-148", gpt2_shapes()),
        Workload(f"custom-{numel}", [(numel,)]),
        Workload("8x32M", [(32 << 20,)] * 8),
        Workload("gpt2", gpt2_shapes(768, 12, 50257, 1024)),
        Workload("llama", llama),
        Workload("llama-bf16", llama, torch.bfloat16),
    )}


def default_workloads(device: torch.device, numel: int) -> list[str]:
    """The workloads run when ``--workload`` is not given, which depend on the device."""
    if device.type == "cuda":
        return ["8x32M", "gpt2", "llama", "llama-bf16"]
    return ["large-75M", "gpt2-148", f"custom-{numel}"]


def select_workloads(tokens: list[str] | None, device: torch.device, numel: int
                     ) -> list[Workload]:
    """The workloads ``--workload`` names. A token is looked up first among the device's default
    workloads, then among all; within those, an exact name wins over prefix matches (so on CUDA
    ``llama`` is the fp32 workload alone and ``gpt2`` is GPT-2 small, while on CPU ``gpt2`` is
    ``gpt2-148``). Raises ValueError for a token that names nothing."""
    every = workloads(numel)
    defaults = default_workloads(device, numel)
    if not tokens:
        return [every[name] for name in defaults]
    chosen: list[str] = []
    for token in tokens:
        for pool in (defaults, list(every)):
            exact = [name for name in pool if name == token]
            found = exact or [name for name in pool if name.startswith(token)]
            if found:
                break
        if not found:
            raise ValueError(f"no workload named {token!r}; choose from {', '.join(every)}")
        chosen += [name for name in found if name not in chosen]
    return [every[name] for name in chosen]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_peak(opt: torch.optim.Optimizer, device: torch.device, numel: int) -> float | None:
    """One more step's transient memory per parameter on CUDA (peak allocated during it minus
    what was allocated before it); None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    opt.step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / numel


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bandwidth(device: torch.device, numel: int = 1 << 28, repeats: int = 7) -> float:
    """Memory bandwidth in GB/s (bytes read + written), median over ``repeats``.

    CPU: in-place ``buf.mul_(1.0)`` on a buffer past the last-level cache, wall time.
    CUDA: ``dst.copy_(src)`` between two buffers of ``numel`` fp32 elements, CUDA events.
    """
    if device.type != "cuda":
        buf = torch.ones(numel, device=device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            buf.mul_(1.0)
            times.append(time.perf_counter() - start)
        return 2 * buf.numel() * buf.element_size() / statistics.median(times) / 1e9
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(repeats)]
    for begin, end in pairs:
        begin.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize(device)
    seconds = statistics.median(b.elapsed_time(e) for b, e in pairs) / 1e3
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    _free(device)
    return nbytes / seconds / 1e9


def cache_bytes(device: torch.device) -> int | None:
    """Size of the last-level cache in bytes (CPU: from Linux's sysfs, CUDA: the L2), or None
    where it cannot be read."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    sizes: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes[level] = int(text[:-1]) * units[text[-1]]
    return sizes[max(sizes)] if sizes else None


@functools.cache
def cache_bandwidth(device: torch.device, nbytes: int) -> float:
    """:func:`bandwidth` on buffers of ``nbytes`` in all (in-place on CPU, a copy on CUDA), the
    best of 15 (a floor is the fastest the host manages; other work only slows single
    passes), measured once per size in a process: the floor of a working set in cache."""
    per_element = 4 if device.type != "cuda" else 8
    return max(bandwidth(device, max(1, nbytes // per_element), repeats=1) for _ in range(15))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's persistent per-parameter state (0-d step counts excluded)."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def moved_bytes(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """Bytes one step must move at least: read and write every parameter, read every gradient,
    read and write every persistent state tensor (measured on the tensors, after a step)."""
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params
                     if p.grad is not None)
    return 2 * param_bytes + grad_bytes + 2 * state_bytes(opt)


def working_set_bytes(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """Bytes a step touches: every parameter, gradient and persistent state tensor once."""
    return (sum(p.numel() * p.element_size() for p in params)
            + sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            + state_bytes(opt))


@dataclass
class Row:
    """One optimizer setting: how to build it, or why it cannot run here."""

    name: str
    make: Factory | None = None
    skip: str = ""
    peer: bool = False
    cuda_only: bool = False
    no_bf16: str = ""  # why the row cannot take bf16 parameters, if it cannot

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str:
        """Why this row is skipped on ``device`` with parameters of ``dtype`` ("" if it runs)."""
        if self.cuda_only and device.type != "cuda":
            return "needs CUDA"
        if self.skip:
            return self.skip
        if self.no_bf16 and dtype == torch.bfloat16:
            return self.no_bf16
        return ""


def _factory(cls: type, kwargs: dict[str, Any]) -> Factory:
    return lambda ps: cls(ps, **kwargs)  # type: ignore[no-any-return]


def _load(load: Callable[[], type | None]) -> tuple[type | None, str]:
    """A peer's class, or None and why it is missing."""
    try:
        cls = load()
    except Exception as exc:  # noqa: BLE001 - a broken peer is a skipped row, not a crash
        return None, f"cannot load: {type(exc).__name__}: {exc}"
    return cls, "" if cls is not None else "not installed"


def rows(peers_dir: Path | None = None, single: bool = True) -> list[Row]:
    """Every row, in table order; peers that cannot be loaded carry the reason."""
    hp: dict[str, Any] = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    adan_hp: dict[str, Any] = dict(hp, betas=ADAN_BETAS, eps=EPS)
    out = [
        Row("adan default", lambda ps: Adan(ps, **adan_hp)),
        Row("adan fused", lambda ps: Adan(ps, fused=True, **adan_hp)),
        Row("adan foreach", lambda ps: Adan(ps, foreach=True, fused=False, **adan_hp)),
        Row("adan single", lambda ps: Adan(ps, foreach=False, fused=False, **adan_hp),
            skip="" if single else "per-tensor loop, slow on CUDA: add --single to time it"),
        Row("adan state bf16", lambda ps: Adan(ps, state_dtype="bf16", **adan_hp)),
        Row("adan state int8", lambda ps: Adan(ps, state_dtype="int8", **adan_hp)),
        Row("torch AdamW fused",
            lambda ps: torch.optim.AdamW(ps, fused=True, eps=EPS, **hp)),
        Row("torch AdamW foreach",
            lambda ps: torch.optim.AdamW(ps, foreach=True, eps=EPS, **hp)),
    ]

    # sail-sg's reference implementation, from the peers directory (its fused kernels are a
    # CUDA extension built in place there; the per-tensor one dispatches float and half only).
    try:
        sail, missing = load_sail_sg_adan(peers_dir)
        sail_skip = ""
    except Exception as exc:  # noqa: BLE001 - a missing or broken copy is a skipped row
        sail, missing, sail_skip = None, None, f"cannot load: {exc}"
    for name, flags in (("sail-sg fused multi-tensor", dict(foreach=True, fused=True)),
                        ("sail-sg fused single-tensor", dict(foreach=False, fused=True)),
                        ("sail-sg foreach", dict(foreach=True, fused=False))):
        fused = flags["fused"]
        row = Row(name, peer=True, cuda_only=fused, skip=sail_skip,
                  no_bf16="sail-sg's single-tensor kernel has no bf16"
                  if name.endswith("single-tensor") else "")
        if sail is not None:
            row.make = _factory(sail, {**adan_hp, **flags})
            if fused and missing:
                row.skip = missing
        out.append(row)

    # Installed peers: timm and pytorch-optimizer as in the convergence study, optimi twice.
    for name, load, extra in PEERS:
        if name.startswith("torch-optimi"):
            continue
        cls, why = _load(load)
        out.append(Row(name, None if cls is None else _factory(cls, {**adan_hp, **extra}),
                       skip=why, peer=True))
    optimi, why = _load(lambda: load_peer("optimi", "Adan"))
    triton_why = why
    if optimi is not None and not getattr(sys.modules.get("optimi.utils"), "HAS_TRITON", True):
        triton_why = "optimi found no usable Triton (optimi.utils.HAS_TRITON is False)"
    for name, flags, skip in (
            ("torch-optimi Adan (triton)", dict(triton=True, foreach=False), triton_why),
            ("torch-optimi Adan (foreach)", dict(triton=False, foreach=True), why)):
        out.append(Row(name, None if optimi is None else
                       _factory(optimi, {**adan_hp, "kahan_sum": False, **flags}),
                       skip=skip, peer=True, cuda_only=flags["triton"]))
    return out


def _random_tensors(work: Workload, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, dtype=work.dtype, generator=gen)
              for s in work.shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=work.dtype, generator=gen)
    return params


def _timed_steps(opt: torch.optim.Optimizer, device: torch.device, n: int, first: int = 0
                 ) -> tuple[list[float], list[float]]:
    """Device and host milliseconds of ``n`` steps, lr changing every step (steps ``first`` to
    ``first + n - 1`` of the schedule).

    CUDA: synchronise, then CUDA events around ``opt.step()`` for the device time and the wall
    time until ``step`` returns (no synchronisation inside) for the host time. CPU: wall time,
    the same for both.
    """
    cuda = device.type == "cuda"
    host: list[float] = []
    events = []
    for i in range(first, first + n):
        for group in opt.param_groups:
            group["lr"] = LR * (1 + 0.01 * i)
        _sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.step()
        host.append(1e3 * (time.perf_counter() - t0))
        if cuda:
            end.record()
            events.append((start, end))
    if not cuda:
        return host, host
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events], host


def time_row(make: Factory, work: Workload, device: torch.device, steps: int, warmup: int
             ) -> dict[str, Any]:
    """Measure one row: first-step seconds, device and host ms per later step (medians and all
    samples), bytes moved and state bytes per parameter, the transient peak of a step per
    parameter (CUDA), and graphs ``torch.compile`` built after the first step."""
    from torch._dynamo.utils import counters

    params = _random_tensors(work, device)
    opt = make(params)
    _sync(device)
    start = time.perf_counter()
    opt.step()
    _sync(device)
    first = time.perf_counter() - start
    if hasattr(opt, "warm_up"):  # Adan: time its fused kernels, not the eager twin
        opt.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    _timed_steps(opt, device, warmup)
    device_ms, host_ms = _timed_steps(opt, device, steps, warmup)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    numel = work.numel
    peak = step_peak(opt, device, numel)
    return dict(first_s=first, device_ms=statistics.median(device_ms),
                host_ms=statistics.median(host_ms), device_ms_steps=device_ms,
                host_ms_steps=host_ms, bytes_per_param=moved_bytes(params, opt) / numel,
                working_set_bytes=working_set_bytes(params, opt),
                state_bytes_per_param=state_bytes(opt) / numel, peak_bytes_per_param=peak,
                graphs_after_first=recompiles)


def run_row(row: Row, work: Workload, device: torch.device, steps: int, warmup: int,
            bw: float, cache: int | None = None) -> dict[str, Any]:
    """One row's result dict: measured, or skipped/failed with the reason; the row's tensors
    are freed (and on CUDA the cache emptied) before it returns. ``bw`` gives the floor unless
    the row's working set fits in ``cache`` bytes: then the bandwidth measured on a buffer of
    that size does (``in_cache``), since the step need not reach memory at all."""
    why = row.why_not(device, work.dtype)
    if why or row.make is None:
        return dict(row=row.name, status="skipped", reason=why or "not available")
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        result: dict[str, Any] = dict(row=row.name, status="ok",
                                      **time_row(row.make, work, device, steps, warmup))
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = dict(row=row.name, status="failed",
                      reason=f"{type(exc).__name__}: {message[:300]}")
    try:
        _free(device)
        if device.type == "cuda" and torch.cuda.memory_allocated(device) > base:
            result["leaked_bytes"] = torch.cuda.memory_allocated(device) - base
    except Exception as exc:  # noqa: BLE001 - e.g. a sticky CUDA error left by the row
        result["cleanup_error"] = f"{type(exc).__name__}: {exc}"
    if result["status"] == "ok":
        result["in_cache"] = cache is not None and result["working_set_bytes"] <= cache
        if result["in_cache"]:
            bw = cache_bandwidth(device, result["working_set_bytes"])
        result["floor_gbs"] = bw
        moved = result["bytes_per_param"] * work.numel
        result["gbs"] = moved / result["device_ms"] / 1e6
        result["floor_ms"] = 1e3 * moved / (bw * 1e9)
        result["x_floor"] = result["device_ms"] / result["floor_ms"]
        result["pct_copy_bw"] = 100 * result["gbs"] / bw
    return result


def _versions() -> tuple[str, str]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return torch.__version__, triton


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# The columns that decide come first: the step's time, its distance from the floor, the peers.
COLUMNS = ("row", "device ms", "x floor", "vs best peer", "host ms", "GB/s", "% of floor bw",
           "B/p moved", "state B/p", "peak B/p", "first s", "graphs+")


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: a table of the measured rows, then one bullet per row that did not run.
    ``vs best peer`` is the fastest peer's device ms over the row's (above 1: faster); an
    ``x floor`` marked ``(cache)`` is against the bandwidth of a buffer the size of the row's
    working set, which fits in the last-level cache."""
    done = [r for r in results if r["status"] == "ok"]
    peers = [r["device_ms"] for r in done if r.get("peer")]
    best = min(peers) if peers else None
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    for r in done:
        ratio = "-" if best is None else f"{best / r['device_ms']:.2f}x"
        x_floor = _fmt(r["x_floor"], 2) + (" (cache)" if r.get("in_cache") else "")
        cells = [r["row"], _fmt(r["device_ms"], 2), x_floor, ratio, _fmt(r["host_ms"], 2),
                 _fmt(r["gbs"]), _fmt(r["pct_copy_bw"]), _fmt(r["bytes_per_param"]),
                 _fmt(r["state_bytes_per_param"]), _fmt(r["peak_bytes_per_param"]),
                 _fmt(r["first_s"], 2), str(r["graphs_after_first"])]
        lines.append("| " + " | ".join(cells) + " |")
    cached = [r for r in done if r.get("in_cache")]
    if cached:
        sizes = [r["working_set_bytes"] / 2**20 for r in cached]
        speeds = [r["floor_gbs"] for r in cached]
        lines.append(
            f"- (cache): {len(cached)} rows' working sets ({min(sizes):.1f}-{max(sizes):.1f} "
            "MiB of parameters, gradients and state) fit in the last-level cache, so the "
            "memory bandwidth does not bound them; their floor is the bandwidth measured on "
            f"a buffer of the working set's size ({min(speeds):.1f}-{max(speeds):.1f} GB/s)")
    lines += [f"- {r['row']}: {r['status']}: {r['reason']}" for r in results
              if r["status"] != "ok"]
    lines += [f"- {r['row']}: {r['leaked_bytes'] / 2**20:.1f} MiB still allocated after "
              "the row was freed" for r in results if r.get("leaked_bytes")]
    lines += [f"- {r['row']}: freeing its tensors failed: {r['cleanup_error']}"
              for r in results if r.get("cleanup_error")]
    return lines


def _error(message: str) -> int:
    print(f"python -m benchmarks speed: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one markdown table per workload."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workload", action="append",
                        help="workload name or prefix, repeatable (CPU default: large-75M, "
                        "gpt2-148, custom-N; CUDA default: 8x32M, gpt2, llama, llama-bf16)")
    parser.add_argument("--numel", type=int, default=10_000_000,
                        help="elements of the custom workload (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per row (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps after the first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: torch's); 1 avoids OpenMP stalls when busy")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="buffer size for the bandwidth measurement, past the last-level "
                        "cache (default: %(default)s)")
    parser.add_argument("--rows", default="",
                        help="comma-separated substrings of row names (default: every row)")
    parser.add_argument("--peers", default=None, metavar="DIR",
                        help="directory with sail-sg-adan/ (default: .peers, else "
                        "../shared/peers)")
    parser.add_argument("--single", action="store_true",
                        help="also time `adan single` on CUDA (always timed on CPU)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every result to PATH (rewritten after each row)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        return _error("--steps must be at least 1 and --warmup at least 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        return _error(f"bad --device {args.device!r}: {exc}")
    if device.type not in ("cpu", "cuda"):
        return _error(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device {args.device}, but CUDA is not available here (torch "
                      f"{torch.__version__}, built with CUDA {torch.version.cuda})")
    try:
        chosen = select_workloads(args.workload, device, args.numel)
    except ValueError as exc:
        return _error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)

    torch_version, triton_version = _versions()
    peers_dir = find_peers_dir(args.peers)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw = bandwidth(device, args.bandwidth_mib << 18, repeats=10)
        method = "copy"
        print(f"device {device} ({name}), torch {torch_version}, triton {triton_version}")
        print(f"copy bandwidth {bw:.1f} GB/s (dst.copy_(src), {args.bandwidth_mib} MiB, bytes "
              "read + written, median of 10, CUDA events)")
        timing = ("device ms: CUDA events around opt.step(); host ms: wall time until step() "
                  "returns, synchronised before the clock starts, not before it stops")
    else:
        name = "cpu"
        bw = bandwidth(device, args.bandwidth_mib << 18)
        method = "in-place"
        print(f"device {device}, torch {torch_version}, triton {triton_version}, "
              f"threads {torch.get_num_threads()}")
        print(f"in-place bandwidth {bw:.1f} GB/s (buf.mul_(1.0), {args.bandwidth_mib} MiB, "
              "bytes read + written, median of 7)")
        timing = "device ms = host ms: wall time of opt.step() (CPU steps are synchronous)"
    cache = cache_bytes(device)
    print("last-level cache " + (f"{cache / 2**20:.0f} MiB" if cache else "size unknown (no "
          "row is treated as in cache)"))
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps; {timing}; "
          f"peers from {peers_dir if peers_dir is not None else '(none found)'}")
    report: dict[str, Any] = dict(
        device=str(device), device_name=name, torch=torch_version, triton=triton_version,
        bandwidth_gbs=bw, bandwidth_method=method, bandwidth_mib=args.bandwidth_mib,
        last_level_cache_bytes=cache,
        steps=args.steps, warmup=args.warmup, threads=torch.get_num_threads(),
        peers_dir=None if peers_dir is None else str(peers_dir), workloads=[])

    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    all_rows = [r for r in rows(peers_dir, single=args.single or device.type != "cuda")
                if not wanted or any(w in r.name for w in wanted)]
    try:
        for work in chosen:
            _run_workload(work, all_rows, device, args, bw, cache, report)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured
        report["interrupted"] = True
        if report["workloads"]:
            print("\n".join(table(report["workloads"][-1]["rows"])))
        print("\ninterrupted: the rows above are all that were measured", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 130 if report.get("interrupted") else 0


def _run_workload(work: Workload, all_rows: list[Row], device: torch.device,
                  args: argparse.Namespace, bw: float, cache: int | None,
                  report: dict[str, Any]) -> None:
    """Run every row on ``work``, print its table, keep the results in ``report`` (and the
    JSON file, rewritten after each row), with one progress line per row on stderr."""
    # Adan moves 11 parameter-sized tensors a step when its state has the params' dtype, and
    # touches 6 (parameters, gradients, four state buffers).
    floor = 1e3 * work.numel * 11 * work.dtype.itemsize / (bw * 1e9)
    touched = work.numel * 6 * work.dtype.itemsize
    where = (f"; its {touched / 2**20:.1f} MiB working set fits in the last-level cache"
             if cache is not None and touched <= cache else "")
    dtype = str(work.dtype).removeprefix("torch.")
    print(f"\n## {work.name}: {work.numel / 1e6:.1f}M {dtype} params in {len(work.shapes)} "
          f"tensors (Adan floor {floor:.2f} ms at the memory bandwidth{where})\n", flush=True)
    entry: dict[str, Any] = dict(name=work.name, params=work.numel, tensors=len(work.shapes),
                                 dtype=dtype, rows=[])
    report["workloads"].append(entry)
    for row in all_rows:
        result = run_row(row, work, device, args.steps, args.warmup, bw, cache)
        result["peer"] = row.peer
        entry["rows"].append(result)
        done = (f"{result['device_ms']:.2f} ms, {result['x_floor']:.2f}x floor"
                if result["status"] == "ok" else f"{result['status']}: {result['reason']}")
        print(f"  [{work.name}] {row.name}: {done}", file=sys.stderr, flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1))
    print("\n".join(table(entry["rows"])), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
