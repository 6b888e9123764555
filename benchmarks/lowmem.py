"""Benchmarks of Adan's low-memory state: bytes per parameter, step time, convergence.

``python -m benchmarks lowmem memory|speed [--device cuda]`` prints a table (on CUDA with each
step's transient peak per parameter, and CUDA-event timing); ``training`` trains a GPT-2-shaped
model a few steps with AdamW, Adan, 8-bit Adan and 8-bit Adan with gradient release and
reports each training step's peak memory (params, gradients, state and activations) per
parameter, and the median time per iteration; ``convergence`` trains the
character-level GPT of :mod:`adan.demo.charlm` for each state setting and seed, writes the
curves to JSON and, with ``--plot``, draws the mean validation curves (needs matplotlib);
``report`` summarises and plots a saved JSON without training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from adan import Adan
from adan.progress import Progress
from adan.state import state_bytes
from benchmarks.speed import step_peak

# The settings compared: float32 moments (as the parameter, here), bfloat16 and 8-bit.
STATE_FORMATS = ("fp32", "bf16", "int8")

__all__ = ["main"]


def _make(params: list[torch.Tensor], fmt: str, **kwargs: Any) -> Adan:
    """An Adan whose fused kernels are built before it is timed."""
    opt = Adan(params, lr=1e-3, weight_decay=0.02, state_dtype=fmt, **kwargs)
    opt.warm_up()
    return opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(numel: int, device: torch.device | str = "cpu"
           ) -> list[tuple[str, float, float | None]]:
    """Per setting, on one ``numel``-element fp32 tensor: measured state bytes per parameter
    after one step, and on CUDA the transient peak of a later step per parameter
    (``max_memory_allocated`` during the step minus what was allocated before it)."""
    device = torch.device(device)
    rows: list[tuple[str, float, float | None]] = []
    for fmt in STATE_FORMATS:
        p = torch.zeros(numel, device=device, requires_grad=True)
        p.grad = torch.randn(numel, device=device)
        opt = _make([p], fmt, foreach=False)
        opt.step()
        peak = step_peak(opt, device, numel)
        rows.append((fmt, state_bytes([opt.state[p]]) / numel, peak))
        del opt, p
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# What ``speed`` times beside the three formats: fp32 state stepped by the C++ kernel of
# compact state (stochastic_param_rounding=True makes fp32 parameters' state "compact", and
# rounds nothing for them; CPU only), and torch's fused AdamW, the bandwidth reference.
SPEED_EXTRA: dict[str, Any] = {
    "fp32*": lambda ps: _make(ps, "fp32", stochastic_param_rounding=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.02, fused=True),
}


def speed(numel: int, tensors: int, repeats: int, steps: int,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
          ) -> dict[str, float]:
    """Median seconds per step of each setting, for parameters of ``dtype``, timed in
    interleaved rounds (CUDA: with CUDA events around each round of ``steps`` steps)."""
    device = torch.device(device)
    torch.manual_seed(0)
    makers: dict[str, Any] = {fmt: (lambda ps, fmt=fmt: _make(ps, fmt)) for fmt in STATE_FORMATS}
    # fp32*: only fp32 parameters have a plain fp32 state to route elsewhere
    makers.update((k, v) for k, v in SPEED_EXTRA.items()
                  if k != "fp32*" or (device.type == "cpu" and dtype == torch.float32))
    runs: dict[str, Any] = {}
    for name, make in makers.items():
        params = [torch.zeros(numel, device=device, dtype=dtype, requires_grad=True)
                  for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn(numel, device=device).to(dtype)
        opt = make(params)
        for _ in range(3):  # warm-up, compilation included
            opt.step()
        runs[name] = opt
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, opt in runs.items():
            _sync(device)
            if device.type == "cuda":
                begin = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(steps):
                    opt.step()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / steps)
                continue
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# The optimizers ``training`` compares: name and a constructor taking the parameters.
TRAINING_SETTINGS: dict[str, Any] = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.02),
    "Adan": lambda ps: Adan(ps, lr=1e-3, weight_decay=0.02),
    "Adan + release": lambda ps: Adan(ps, lr=1e-3, weight_decay=0.02, gradient_release=True),
    "Adan int8": lambda ps: Adan(ps, lr=1e-3, weight_decay=0.02, state_dtype="int8"),
    "Adan int8 + release": lambda ps: Adan(ps, lr=1e-3, weight_decay=0.02, state_dtype="int8",
                                           gradient_release=True),
}


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _iteration(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One training iteration: clear gradients, forward, backward, step."""
    opt.zero_grad(set_to_none=True)
    logits = model(x[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()


def _cpu_peak(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    """Bytes allocated at the peak of one iteration, from the profiler's allocation events,
    above what was live when it began."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _iteration(model, opt, x)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
              if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


class _GradCounter:
    """The most bytes of ``.grad`` tensors held at once: a post-accumulate-grad hook registered
    before the optimizer's counts each gradient in, one registered after it counts those that
    gradient release freed out; the rest leave at ``zero_grad``."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.live = self.most = 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._arrived)

    def _arrived(self, p: torch.Tensor) -> None:
        self.live += _tensor_bytes([p.grad])
        self.most = max(self.most, self.live)

    def after_optimizer(self) -> None:
        """Register the hooks that run after the optimizer's."""
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._released)

    def _released(self, p: torch.Tensor) -> None:
        if p.grad is None:
            self.live -= p.numel() * p.element_size()

    def cleared(self) -> None:
        self.live = _tensor_bytes(p.grad for p in self.params if p.grad is not None)


class _OptClock:
    """Host seconds of an optimizer's work: its ``step()`` and, with gradient release, the
    steps its hooks take inside backward (meaningful on CPU, where kernels run on the host)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.seconds = 0.0
        self.start = 0.0
        opt.register_step_pre_hook(self._begin)
        opt.register_step_post_hook(self._end)
        stepper = getattr(opt, "_stepper", None)  # Adan's seam: release steps through it
        if stepper is not None:
            inner = stepper.step_part

            def timed(*args: Any) -> None:
                start = time.perf_counter()
                inner(*args)
                self.seconds += time.perf_counter() - start

            stepper.step_part = timed

    def _begin(self, *_: Any) -> None:
        self.start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self.start


def training(layers: int, embd: int, vocab: int, block: int, batch: int, steps: int,
             repeats: int, device: torch.device | str = "cpu",
             settings: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per optimizer in :data:`TRAINING_SETTINGS` (or those named in ``settings``, in that
    order), bytes per parameter of the parameters, the state, the most ``.grad`` bytes held at
    once and the peak of a training step (measured after ``steps`` warm-up iterations: CPU from
    the profiler's allocation events plus what was live before, CUDA
    ``max_memory_allocated``), and over ``repeats`` more (unprofiled; the settings take turns,
    one iteration each) the medians of the seconds per iteration, of the optimizer's work in it
    and of the process's page faults in it (memory the allocator had returned to the system)."""
    from adan.demo.charlm import CharGPT

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (batch, block + 1), generator=gen).to(device)
    runs: dict[str, Any] = {}
    out: dict[str, dict[str, float]] = {}
    chosen = {name: TRAINING_SETTINGS[name] for name in settings or TRAINING_SETTINGS}
    count = len(chosen)
    for position, (name, make) in enumerate(chosen.items(), 1):
        bar = Progress(steps + 2, f"memory of {name} ({position}/{count})")
        torch.manual_seed(0)
        model = CharGPT(vocab, block, layers, max(1, embd // 64), embd).to(device)
        params: list[torch.Tensor] = list(model.parameters())
        numel = sum(p.numel() for p in params)
        counter = _GradCounter(params)
        opt = make(params)
        if hasattr(opt, "warm_up"):  # Adan: time its fused kernels, not the eager twin
            opt.warm_up()
        counter.after_optimizer()
        for done in range(1, steps + 1):
            _iteration(model, opt, x)
            bar.update(done)
        opt.zero_grad(set_to_none=True)
        counter.cleared()
        counter.most = 0
        _iteration(model, opt, x)
        grads = counter.most
        bar.update(steps + 1)
        opt.zero_grad(set_to_none=True)
        before = _tensor_bytes(params) + state_bytes(list(opt.state.values()))
        if device.type == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _iteration(model, opt, x)
            _sync(device)
            peak = before + torch.cuda.max_memory_allocated(device) - base
        else:
            peak = before + _cpu_peak(model, opt, x)
        bar.update(steps + 2)
        bar.close()
        out[name] = {"params": _tensor_bytes(params) / numel,
                     "state": state_bytes(list(opt.state.values())) / numel,
                     "grads": grads / numel, "peak": peak / numel, "numel": numel}
        runs[name] = (model, opt, _OptClock(opt))
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runs}
    bar = Progress(repeats, f"timing {count} settings in turn")
    for done in range(1, repeats + 1):
        for name, (model, opt, clock) in runs.items():
            _sync(device)
            clock.seconds = 0.0
            faults = _page_faults()
            start = time.perf_counter()
            _iteration(model, opt, x)
            _sync(device)
            times[name].append((time.perf_counter() - start, clock.seconds,
                                _page_faults() - faults))
        bar.update(done)
    bar.close()
    for name, t in times.items():
        for key, column in (("seconds", 0), ("optimizer", 1), ("faults", 2)):
            out[name][key] = statistics.median(row[column] for row in t)
    return out


def _page_faults() -> int:
    """The process's minor page faults so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


TASK_LR = {"charlm": 3e-3, "digits": 1e-2}
"""Adan's learning rate per convergence task: the char GPT's recipe, the digits CNN's best of
the tuning study (docs/results.md)."""


def convergence(
    iters: int | None, seeds: list[int], out: Path, lr: float | None, data_path: str | None,
    eval_interval: int | None = None, task: str = "charlm",
    settings: tuple[str, ...] = STATE_FORMATS,
) -> dict[str, Any]:
    """Train the char-level GPT or the digits CNN per (setting, seed); save and return the
    curves (runs already in ``out`` are kept, so a run can be resumed)."""
    lr = TASK_LR[task] if lr is None else lr
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if task == "charlm":
        from adan.demo.charlm import CharData, CharLMConfig, find_data, train_charlm

        data: Any = CharData.from_file(find_data(data_path))

        def train(make: Any, seed: int) -> dict[str, Any]:
            cfg = CharLMConfig(max_iters=iters or 2000, seed=seed,
                               eval_interval=eval_interval or 250)
            return train_charlm(make, cfg, data)
    else:
        from benchmarks.digits import Digits, DigitsConfig, train_digits

        data = Digits.load()

        def train(make: Any, seed: int) -> dict[str, Any]:
            cfg = DigitsConfig(seed=seed, **({} if iters is None else {"max_iters": iters}),
                               **({} if eval_interval is None
                                  else {"eval_interval": eval_interval}))
            return train_digits(make, cfg, data)

    runs = [(seed, fmt) for seed in seeds for fmt in settings if f"{fmt}/{seed}" not in results]
    for i, (seed, fmt) in enumerate(runs, 1):
        def make(groups: list[dict[str, Any]], fmt: str = fmt) -> Adan:
            return Adan(groups, lr=lr, weight_decay=0.02, state_dtype=fmt)

        result = train(make, seed)
        results[f"{fmt}/{seed}"] = {**result, "lr": lr, "task": task}
        print(f"[{i}/{len(runs)}] {task} {fmt}/{seed}: final val {result['final_val_loss']:.4f}"
              f" ({result['seconds']:.0f} s)", flush=True)
        out.write_text(json.dumps(results))
    return results


def _complete(results: dict[str, Any]) -> dict[str, Any]:
    """The runs of seeds that every setting has finished, so means compare like with like."""
    seeds = {key.split("/")[1] for key in results}
    settings = {key.split("/")[0] for key in results}
    done = {s for s in seeds if all(f"{fmt}/{s}" in results for fmt in settings)}
    return {k: v for k, v in results.items() if k.split("/")[1] in done}


def summarize(results: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    """``(setting, mean final val loss, difference to fp32, seeds)`` over completed seeds."""
    finals: dict[str, list[float]] = {}
    for key, result in _complete(results).items():
        finals.setdefault(key.split("/")[0], []).append(result["final_val_loss"])
    base = statistics.mean(finals.get("fp32", [float("nan")]))
    return [(fmt, statistics.mean(v), statistics.mean(v) - base, len(v))
            for fmt, v in finals.items()]


def plot(results: dict[str, Any], path: Path, lr: float) -> None:
    """Mean validation loss over completed seeds against iteration, one line per setting, and
    below it each setting's difference from fp32 (the curves themselves nearly coincide).
    ``lr`` titles the figure where the runs do not record theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for key, result in _complete(results).items():
        curves.setdefault(key.split("/")[0], []).append(result["val_curve"])
        lr = result.get("lr", lr)
    means: dict[str, list[float]] = {}
    for fmt, runs in curves.items():
        means[fmt] = [statistics.mean(run[i][1] for run in runs) for i in range(len(runs[0]))]
    its = [it for it, _ in next(iter(curves.values()))[0]]
    fig, (ax, diff) = plt.subplots(2, 1, figsize=(6, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    styles: dict[str, dict[str, Any]] = {
        "fp32": dict(color="C0", linewidth=3.0, alpha=0.5),
        "bf16": dict(color="C1", linestyle="--"),
        "int8": dict(color="C2", linestyle=":", linewidth=2.0),
    }
    for fmt, values in means.items():
        label = f"{fmt} state ({len(curves[fmt])} seeds)"
        ax.plot(its, values, label=label, **styles.get(fmt, {}))
        if fmt != "fp32" and "fp32" in means:
            diff.plot(its, [v - b for v, b in zip(values, means["fp32"], strict=True)],
                      label=f"{fmt} - fp32", **styles.get(fmt, {}))
    diff.axhline(0.0, color="grey", linewidth=0.8)
    diff.set_xlabel("iteration")
    diff.set_ylabel("difference from fp32")
    diff.legend()
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_ylim(top=2.6)
    ax.legend()
    ax.set_title(f"char-level GPT on Tiny Shakespeare\nAdan lr {lr:g}, weight decay 0.02",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks lowmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.add_argument("--device", default=None,
                        help="cpu or cuda for memory and speed (default: cpu)")
    mem = sub.add_parser("memory", help="state bytes per parameter")
    mem.add_argument("--numel", type=int, default=1 << 20)
    spd = sub.add_parser("speed", help="median step time per setting")
    trn = sub.add_parser("training", help="peak memory of a GPT-2-shaped training step")
    trn.add_argument("--layers", type=int, default=4)
    trn.add_argument("--embd", type=int, default=256)
    trn.add_argument("--vocab", type=int, default=1024)
    trn.add_argument("--block", type=int, default=32)
    trn.add_argument("--batch", type=int, default=2)
    trn.add_argument("--steps", type=int, default=3, help="warm-up iterations")
    trn.add_argument("--repeats", type=int, default=11, help="timed iterations")
    trn.add_argument("--settings", nargs="+", choices=list(TRAINING_SETTINGS), default=None,
                     help="the optimizers to compare, in this order (default: all)")
    for sub_parser in (mem, spd, trn):  # accepted before or after the mode
        sub_parser.add_argument("--device", default=argparse.SUPPRESS,
                                help="cpu or cuda (default: cpu)")
    spd.add_argument("--numel", type=int, default=1 << 20)
    spd.add_argument("--tensors", type=int, default=4)
    spd.add_argument("--repeats", type=int, default=7)
    spd.add_argument("--steps", type=int, default=5)
    spd.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="the parameters' dtype (state fp32 is then float32 buffers)")
    conv = sub.add_parser("convergence", help="char-level GPT, each setting and seed")
    conv.add_argument("--task", choices=list(TASK_LR), default="charlm",
                      help="the char-level GPT or the digits CNN (benchmarks/digits.py)")
    conv.add_argument("--settings", nargs="+", choices=STATE_FORMATS, default=STATE_FORMATS)
    conv.add_argument("--iters", type=int, default=None,
                      help="iterations (default: 2000 for charlm, the CNN's schedule: 300)")
    conv.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    conv.add_argument("--lr", type=float, default=None,
                      help="Adan's learning rate (default: 3e-3 charlm, 1e-2 digits)")
    conv.add_argument("--eval-interval", type=int, default=None)
    conv.add_argument("--data", default=None)
    conv.add_argument("--out", type=Path, default=Path("lowmem_convergence.json"))
    conv.add_argument("--plot", type=Path, default=None)
    rep = sub.add_parser("report", help="summarise (and plot) a convergence JSON, no training")
    rep.add_argument("--out", type=Path, default=Path("lowmem_convergence.json"))
    rep.add_argument("--plot", type=Path, default=None)
    rep.add_argument("--lr", type=float, default=3e-3,
                     help="the runs' learning rate, for the plot's title where the JSON does "
                     "not record it (default: %(default)s, convergence's default)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError as exc:
        print(f"{parser.prog}: error: bad --device {args.device!r}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{parser.prog}: error: --device {args.device}, but CUDA is not available here",
              file=sys.stderr)
        return 2

    if args.command == "memory":
        print(f"state bytes per parameter ({args.numel} elements, {device})")
        for fmt, per, peak in memory(args.numel, device):
            extra = "" if peak is None else f"  step peak {peak:7.4f} B/p"
            print(f"  {fmt:5s} {per:7.4f}{extra}")
    elif args.command == "training":
        rows = training(args.layers, args.embd, args.vocab, args.block, args.batch, args.steps,
                        args.repeats, device, args.settings)
        numel = int(next(iter(rows.values()))["numel"])
        print(f"GPT-2-shaped model, {args.layers} layers x {args.embd}, vocab {args.vocab}, "
              f"{args.batch} x {args.block} tokens, {numel} fp32 params, {device} "
              "(bytes per parameter; median time per iteration)")
        print(f"  {'optimizer':20s} params  state  grads*  peak  ms/iter  ms/iter in the "
              "optimizer  page faults/iter  (* the most .grad bytes held at once)")
        for name, row in rows.items():
            print(f"  {name:20s} {row['params']:6.2f} {row['state']:6.2f} {row['grads']:6.2f} "
                  f"{row['peak']:6.2f} {row['seconds'] * 1e3:8.1f} {row['optimizer'] * 1e3:8.1f}"
                  f" {row['faults']:8.0f}")
        for base in [b for b in ("Adan", "Adan int8") if {b, f"{b} + release"} <= rows.keys()]:
            saved = rows[base]["peak"] - rows[f"{base} + release"]["peak"]
            with_release = rows[f"{base} + release"]
            print(f"  {base}: release saves {saved:.2f} B/param of peak, "
                  f"{saved / rows[base]['grads']:.0%} of the gradients' bytes; time per "
                  f"iteration x{with_release['seconds'] / rows[base]['seconds']:.2f}, in the "
                  f"optimizer x{with_release['optimizer'] / rows[base]['optimizer']:.2f}")
    elif args.command == "speed":
        medians = speed(args.numel, args.tensors, args.repeats, args.steps, device,
                        getattr(torch, args.dtype))
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{torch.get_num_threads()} threads")
        print(f"median step time, {args.tensors} x {args.numel} {args.dtype} params, {where}")
        for name, sec in medians.items():
            print(f"  {name:5s} {sec * 1e3:9.2f} ms  x{sec / medians['fp32']:.2f} of fp32  "
                  f"x{sec / medians['AdamW']:.2f} of AdamW")
        if "fp32*" in medians:
            print("  fp32*: fp32 state stepped by the C++ kernel of compact state "
                  "(stochastic_param_rounding=True); AdamW: torch's, fused")
    else:
        if args.command == "report":
            results = json.loads(args.out.read_text())
        else:
            results = convergence(args.iters, args.seeds, args.out, args.lr, args.data,
                                  args.eval_interval, args.task, tuple(args.settings))
        for fmt, mean, diff, n in summarize(results):
            print(f"  {fmt:5s} mean final val loss {mean:.4f} ({diff:+.4f} vs fp32, {n} seeds)")
        if args.plot is not None:
            plot(results, args.plot, TASK_LR[getattr(args, "task", "charlm")]
                 if args.lr is None else args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
