"""Convergence study: Adan against tuned baselines on small real tasks:
``python -m benchmarks train``.

For every task and optimizer a log-spaced learning-rate grid is run at seed 0; the best
setting by final validation loss is then re-run on more seeds. Peers' Adans run at our best
learning rate as an agreement check. Every finished run is saved as its own JSON file under
``OUT/runs`` (named by a hash of everything that defines it), so an interrupted study resumes
where it stopped and a run shared by two tasks is trained once. At the end the study writes
``OUT/results.json`` (every run, every curve, the summaries), ``OUT/results.md`` (the tables)
and one PNG of validation curves per task.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from adan.demo.charlm import CharData, CharLMConfig, find_data, train_charlm
from adan.demo.loop import available_cores
from benchmarks import contenders
from benchmarks.charlstm import CharLSTMConfig, train_charlstm
from benchmarks.digits import Digits, DigitsConfig, train_digits

__all__ = [
    "TASKS",
    "Run",
    "Task",
    "default_tasks",
    "format_tables",
    "main",
    "plot",
    "run_study",
    "summarize",
]

Config = CharLMConfig | CharLSTMConfig | DigitsConfig
AnyConfig = TypeVar("AnyConfig", bound=Config)

# Model kind -> (config class, model family for the optimizer settings).
KINDS: dict[str, tuple[type, str]] = {
    "charlm": (CharLMConfig, "lm"),
    "lstm": (CharLSTMConfig, "lm"),
    "cnn": (DigitsConfig, "cnn"),
}


def _grid(center: float) -> list[float]:
    """Four learning rates a factor of two apart, two below ``center`` and one above."""
    return [center * 2.0**k for k in (-2, -1, 0, 1)]


# Learning-rate grids: the same shape (4 points, x2 apart) for everyone, placed around each
# family's usual range; a best value on an edge grows the grid (see ``_grid_runs``).
_GRIDS: dict[str, dict[str, list[float]]] = {
    "charlm": {"Adan": _grid(2e-2), "adam": _grid(4e-3), "SGD-Nesterov": _grid(0.5)},
    "lstm": {"Adan": _grid(2e-2), "adam": _grid(8e-3), "SGD-Nesterov": _grid(1.0)},
    "cnn": {"Adan": _grid(1e-2), "adam": _grid(4e-3), "SGD-Nesterov": _grid(0.1)},
}


def grid_for(kind: str, optimizer: str) -> list[float]:
    """The learning-rate grid of ``optimizer`` on model ``kind`` (peers share Adan's)."""
    grids = _GRIDS[kind]
    if optimizer in grids:
        return grids[optimizer]
    if optimizer.startswith("Adam") or optimizer in ("NAdam", "RAdam"):
        return grids["adam"]
    raise ValueError(f"no learning-rate grid for {optimizer!r}")


@dataclass(frozen=True)
class Run:
    """One training run: everything that determines its outcome."""

    kind: str
    config: Config
    optimizer: str
    lr: float
    role: str
    seed_index: int = 0
    batch_size: int = 0

    def spec(self) -> dict[str, Any]:
        """What defines the run's result (the role and labels are not part of it)."""
        return {"kind": self.kind, "config": dataclasses.asdict(self.config),
                "optimizer": self.optimizer, "lr": self.lr,
                "settings": contenders.settings(self.optimizer, KINDS[self.kind][1])}

    def key(self) -> str:
        """A file name unique to the spec."""
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True, default=str)
                                .encode()).hexdigest()[:12]
        label = self.optimizer.split(" ")[0].replace("-", "")
        return f"{self.kind}-{label}-lr{self.lr:.4g}-seed{self.config.seed}-{digest}"


@dataclass
class Task:
    """A named experiment: a base configuration and, for ``largebatch``, the batch sizes."""

    name: str
    kind: str
    config: Config
    description: str
    batch_sizes: tuple[int, ...] = ()
    lr_source: str | None = None
    optimizers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def largebatch(self) -> bool:
        return bool(self.batch_sizes)


def _scale_schedule(cfg: AnyConfig, factor: float, **changes: Any) -> AnyConfig:
    """``cfg`` (with ``changes``) with iterations, warm-up and evaluation spacing multiplied by
    ``factor``, each at least 1."""
    return dataclasses.replace(
        cfg, max_iters=max(1, round(cfg.max_iters * factor)),
        warmup_iters=max(1, round(cfg.warmup_iters * factor)),
        eval_interval=max(1, round(cfg.eval_interval * factor)), **changes,
    )


def scaled_config(base: CharLMConfig, batch_size: int) -> CharLMConfig:
    """``base`` at another batch size with the same number of training tokens: iterations,
    warm-up and evaluation spacing shrink by the batch ratio; evaluation batches stay put."""
    if batch_size == base.batch_size:
        return base
    return _scale_schedule(base, base.batch_size / batch_size, batch_size=batch_size,
                           eval_batch_size=base.eval_batch_size or base.batch_size)


def scaled_lr(optimizer: str, base_lr: float, base_batch: int, batch_size: int) -> float:
    """The stated rule: square-root scaling for adaptive methods, linear for SGD."""
    ratio = batch_size / base_batch
    return base_lr * (ratio if optimizer == "SGD-Nesterov" else math.sqrt(ratio))


def default_tasks() -> dict[str, Task]:
    """The four tasks at their full sizes."""
    charlm = CharLMConfig(eval_interval=100)
    return {
        "charlm": Task("charlm", "charlm", charlm,
                       "char-level GPT on Tiny Shakespeare, nanoGPT's CPU recipe"),
        "cnn": Task("cnn", "cnn", DigitsConfig(),
                    "residual CNN on scikit-learn's digits (300 train images, augmented)"),
        "lstm": Task("lstm", "lstm", CharLSTMConfig(),
                     "2-layer char-level LSTM on Tiny Shakespeare"),
        "largebatch": Task("largebatch", "charlm", charlm,
                           "charlm at batch 12/48/192, same tokens, lr by sqrt rule "
                           "(linear for SGD) from charlm's best",
                           batch_sizes=(12, 48, 192), lr_source="charlm"),
    }


TASKS = tuple(default_tasks())


def _best_lr(records: list[dict[str, Any]]) -> float | None:
    """The grid learning rate with the lowest final validation loss (diverged runs lose)."""
    if not records:
        return None
    return min(records, key=lambda r: _loss_or_inf(r["final_val_loss"]))["lr"]


def _loss_or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def plan(tasks: Sequence[Task], optimizers: Sequence[str], peers: Sequence[str], seeds: int,
         done: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, Run]], int]:
    """The runs that can be defined now given the finished ones in ``done`` (by key), each with
    its task name, and how many runs the whole study will have."""
    runs: list[tuple[str, Run]] = []
    total = 0
    best: dict[tuple[str, str], float | None] = {}
    for task in tasks:
        if task.largebatch:
            continue
        for opt in optimizers:
            grid, lr = _grid_runs(task, opt, done)
            runs += [(task.name, r) for r in grid]
            total += len(grid) + seeds - 1
            best[(task.name, opt)] = lr
            if lr is not None:
                runs += [(task.name, Run(task.kind, _seeded(task.config, i), opt, lr, "seed", i))
                         for i in range(1, seeds)]
        for peer in peers:
            total += 1
            lr = best.get((task.name, contenders.OURS))
            if lr is not None:
                runs.append((task.name, Run(task.kind, task.config, peer, lr, "peer")))
    for task in tasks:
        if not task.largebatch:
            continue
        assert isinstance(task.config, CharLMConfig)
        for opt in task.optimizers or optimizers:
            total += len(task.batch_sizes) * seeds
            base_lr = best.get((task.lr_source or "", opt))
            if base_lr is None:
                if task.lr_source in {t.name for t in tasks}:
                    continue
                base_lr = task.extra.get("base_lr", {}).get(opt) or _center(task.kind, opt)
            for batch in task.batch_sizes:
                lr = scaled_lr(opt, base_lr, task.config.batch_size, batch)
                cfg = scaled_config(task.config, batch)
                runs += [(task.name, Run(task.kind, _seeded(cfg, i), opt, lr, "largebatch", i,
                                         batch)) for i in range(seeds)]
    return runs, total


# A best learning rate on a grid edge extends the grid by one more point past it, this often.
MAX_EXTEND = 3


def _grid_runs(task: Task, optimizer: str, done: dict[str, dict[str, Any]]
               ) -> tuple[list[Run], float | None]:
    """The grid runs of ``optimizer`` so far and the best lr once they are all finished.

    While the best lies on an edge, the grid grows by one point (x2) past that edge, at most
    :data:`MAX_EXTEND` times, so no optimizer is judged at a rate cut off by its grid.
    """
    lrs = grid_for(task.kind, optimizer)
    for extension in range(MAX_EXTEND + 1):
        runs = [Run(task.kind, task.config, optimizer, lr, "grid") for lr in lrs]
        finished = [done[r.key()] for r in runs if r.key() in done]
        if len(finished) < len(runs):
            return runs, None
        best = _best_lr(finished)
        if extension == MAX_EXTEND or best not in (lrs[0], lrs[-1]):
            return runs, best
        lrs = [lrs[0] / 2, *lrs] if best == lrs[0] else [*lrs, lrs[-1] * 2]
    raise AssertionError("unreachable")


def _center(kind: str, optimizer: str) -> float:
    """The grid's third point: the fallback base rate when no sweep chose one."""
    return grid_for(kind, optimizer)[2]


def _seeded(cfg: Config, index: int) -> Config:
    return dataclasses.replace(cfg, seed=cfg.seed + index)


_DATA_CACHE: dict[str, Any] = {}


def _cached(key: str, load: Callable[[], Any]) -> Any:
    """``load()`` once per worker process for each dataset ``key``."""
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load()
    return _DATA_CACHE[key]


def execute(run: Run, data_path: str | None, threads: int) -> dict[str, Any]:
    """Train one run and return its record (the spec, labels and everything measured)."""
    if threads > 0:
        torch.set_num_threads(threads)
    family = KINDS[run.kind][1]

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return contenders.build(run.optimizer, groups, run.lr, family)

    if run.kind == "cnn":
        data = _cached("digits", Digits.load)
        assert isinstance(run.config, DigitsConfig)
        result = train_digits(make, run.config, data)
    else:
        path = str(find_data(data_path))
        text = _cached(path, lambda: CharData.from_file(path))
        if run.kind == "lstm":
            assert isinstance(run.config, CharLSTMConfig)
            result = train_charlstm(make, run.config, text)
        else:
            assert isinstance(run.config, CharLMConfig)
            result = train_charlm(make, run.config, text)
    result["final_val_loss"] = _finite(result["final_val_loss"])
    result["final_train_loss"] = _finite(result["final_train_loss"])
    result["val_curve"] = [[i, _finite(v)] for i, v in result["val_curve"]]
    result["train_curve"] = [[i, _finite(v)] for i, v in result["train_curve"]]
    return {**run.spec(), "key": run.key(), "seed": run.config.seed,
            "max_iters": run.config.max_iters, "threads": torch.get_num_threads(), **result}


def _finite(value: float) -> float | None:
    """JSON has no NaN: a diverged loss is stored as null."""
    return value if math.isfinite(value) else None


def _load_done(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished runs saved by this or an earlier, interrupted invocation."""
    done = {}
    for path in sorted(runs_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        done[path.stem] = record
    return done


def _save(runs_dir: Path, record: dict[str, Any]) -> None:
    """Write atomically, so an interrupt never leaves a half-written run behind."""
    tmp = runs_dir / f".{record['key']}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, runs_dir / f"{record['key']}.json")


def run_study(
    out: str | Path,
    tasks: Sequence[Task],
    optimizers: Sequence[str],
    peers: Sequence[str] = (),
    seeds: int = 3,
    jobs: int = 1,
    data_path: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study into directory ``out``; returns the results JSON object."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if contenders.OURS not in optimizers:
        raise ValueError(f"optimizers must include {contenders.OURS}, got {list(optimizers)}")
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    done = _load_done(runs_dir)
    threads = max(1, (torch.get_num_threads() if jobs == 1 else available_cores() // jobs))
    ready, total = plan(tasks, optimizers, peers, seeds, done)
    resumed = sum(1 for _, run in ready if run.key() in done)
    if resumed:
        say(f"resuming: {resumed} finished runs found in {runs_dir}")
    bar = _progress_bar(total, resumed, progress)
    pool = None
    if jobs > 1:
        pool = cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    pending: dict[str, cf.Future[dict[str, Any]]] = {}
    try:
        while True:
            ready, bar.total = plan(tasks, optimizers, peers, seeds, done)
            todo = [run for _, run in ready if run.key() not in done and run.key() not in pending]
            if pool is None:
                if not todo:
                    break
                record = execute(todo[0], data_path, threads)
                _finish(record, runs_dir, done, bar)
                continue
            for run in todo:
                if len(pending) >= jobs:
                    break
                pending[run.key()] = pool.submit(execute, run, data_path, threads)
            if not pending:
                break
            finished, _ = cf.wait(pending.values(), return_when=cf.FIRST_COMPLETED)
            for key in [k for k, f in pending.items() if f in finished]:
                _finish(pending.pop(key).result(), runs_dir, done, bar)
        # The planned count is an upper bound: runs two tasks share are trained once.
        bar.total = bar.n
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    results = collect(tasks, optimizers, peers, seeds, done)
    results["settings"]["jobs"] = jobs
    results["settings"]["threads_per_job"] = threads
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(format_tables(summarize(results)) + "\n")
    plot(results, out)
    return results


def _finish(record: dict[str, Any], runs_dir: Path, done: dict[str, dict[str, Any]],
            bar: Any) -> None:
    _save(runs_dir, record)
    done[record["key"]] = record
    loss = record["final_val_loss"]
    bar.set_postfix_str(f"{record['kind']} {record['optimizer']} lr {record['lr']:.3g}: "
                        f"{'diverged' if loss is None else f'{loss:.4f}'}")
    bar.update(1)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (a silent stand-in when tqdm is missing or output is off)."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="run", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    total = n = 0

    def update(self, n: int = 1) -> None:
        del n

    def set_postfix_str(self, text: str) -> None:
        del text

    def close(self) -> None:
        return None


def collect(tasks: Sequence[Task], optimizers: Sequence[str], peers: Sequence[str],
            seeds: int, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results object: study settings, and per task its grids, settings and runs."""
    runs, _ = plan(tasks, optimizers, peers, seeds, done)
    out: dict[str, Any] = {
        "settings": {
            "optimizers": list(optimizers), "peers": list(peers), "seeds": seeds,
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cores": available_cores(),
        },
        "tasks": {},
    }
    for task in tasks:
        family = KINDS[task.kind][1]
        entry: dict[str, Any] = {
            "description": task.description, "kind": task.kind,
            "config": dataclasses.asdict(task.config),
            "settings": {o: contenders.settings(o, family) for o in [*optimizers, *peers]},
            "runs": [],
        }
        if task.largebatch:
            entry["optimizers"] = list(task.optimizers or optimizers)
            entry["batch_sizes"] = list(task.batch_sizes)
            entry["lr_rule"] = "lr(B) = lr(12) * sqrt(B/12); SGD: lr(12) * B/12"
        else:
            entry["grids"] = {o: [r.lr for r in _grid_runs(task, o, done)[0]]
                              for o in optimizers}
        for name, run in runs:
            if name == task.name and run.key() in done:
                entry["runs"].append({**done[run.key()], "role": run.role,
                                      "seed_index": run.seed_index,
                                      "batch_size": run.batch_size or run.config.batch_size})
        out["tasks"][task.name] = entry
    return out


def _mean_curve(records: list[dict[str, Any]]) -> list[list[float | None]]:
    """Elementwise mean of validation curves (a diverged run makes the mean undefined)."""
    if not records or any(r["final_val_loss"] is None for r in records):
        return []
    curves = [r["val_curve"] for r in records]
    length = min(len(c) for c in curves)
    return [[curves[0][i][0], statistics.fmean(c[i][1] for c in curves)] for i in range(length)]


def _stats(finals: list[float | None]) -> dict[str, Any]:
    """Mean and sample std of final losses (std 0 for one run); None if any run diverged."""
    mean = _mean_or_none(finals)
    values = [v for v in finals if v is not None]
    std = None if mean is None else statistics.stdev(values) if len(values) > 1 else 0.0
    return {"finals": finals, "mean": mean, "std": std, "n": len(finals)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per task: each optimizer's grid, best lr (and whether it sits on a grid edge), final
    validation loss over seeds (mean, sample std), mean curve; the best baseline; and the
    fraction of the budget Adan needs to reach the best baseline's final loss (and the best
    baseline to reach Adan's)."""
    ours = contenders.OURS
    summary: dict[str, Any] = {}
    for name, task in results["tasks"].items():
        runs = task["runs"]
        if "batch_sizes" in task:
            summary[name] = _summarize_largebatch(task)
            continue
        rows: dict[str, Any] = {}
        for opt, grid in task["grids"].items():
            trials = {r["lr"]: r["final_val_loss"] for r in runs
                      if r["optimizer"] == opt and r["role"] == "grid"}
            if len(trials) < len(grid):
                continue
            best = _best_lr([{"lr": lr, "final_val_loss": trials[lr]} for lr in grid])
            at_best = sorted((r for r in runs if r["optimizer"] == opt and r["lr"] == best
                              and r["role"] in ("grid", "seed")), key=lambda r: r["seed_index"])
            rows[opt] = {
                "grid": [[lr, trials[lr]] for lr in grid], "best_lr": best,
                "edge": best in (grid[0], grid[-1]),
                **_stats([r["final_val_loss"] for r in at_best]),
                "curve": _mean_curve(at_best),
                "max_iters": at_best[0]["max_iters"],
                "accuracy": _mean_or_none([r.get("final_val_acc") for r in at_best]),
            }
        for row in rows.values():
            row["minus_adan"] = _paired(row["finals"], rows[ours]["finals"]) if ours in rows \
                else None
        baselines = {o: row for o, row in rows.items() if o != ours and row["mean"] is not None}
        entry: dict[str, Any] = {"description": task["description"], "rows": rows}
        if baselines and ours in rows and rows[ours]["mean"] is not None:
            best_base = min(baselines, key=lambda o: baselines[o]["mean"])
            target = baselines[best_base]["mean"]
            reach = _first_at_or_below(rows[ours]["curve"], target)
            back = _first_at_or_below(baselines[best_base]["curve"], rows[ours]["mean"])
            budget = rows[ours]["max_iters"]
            entry.update(best_baseline=best_base, target=target,
                         adan_minus_best=rows[ours]["mean"] - target,
                         adan_reach_iter=reach,
                         adan_reach_fraction=None if reach is None else reach / budget,
                         baseline_reach_iter=back,
                         baseline_reach_fraction=None if back is None else back / budget)
        entry["peers"] = _peer_rows(runs, rows.get(ours))
        summary[name] = entry
    return summary


def _paired(finals: list[float | None], ours: list[float | None]) -> list[float] | None:
    """Per-seed differences (seeds share init, batches and evaluation windows), or None."""
    if len(finals) != len(ours) or None in finals or None in ours:
        return None
    return [a - b for a, b in zip(finals, ours, strict=True)]  # type: ignore[operator]


def _first_at_or_below(curve: list[list[float]], target: float) -> int | None:
    """The first evaluation step at which a mean curve is at or below ``target``."""
    return next((int(it) for it, v in curve if v <= target), None)


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None when there are no values or any is missing."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present and len(present) == len(values) else None


def _peer_rows(runs: list[dict[str, Any]], ours: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each peer's run against ours at the same lr and seed: final and largest curve gap."""
    if ours is None:
        return []
    mine = next((r for r in runs if r["optimizer"] == contenders.OURS
                 and r["lr"] == ours["best_lr"] and r["seed_index"] == 0), None)
    rows = []
    for r in runs:
        if r["role"] != "peer" or mine is None:
            continue
        gaps = [abs(a[1] - b[1]) for a, b in zip(r["val_curve"], mine["val_curve"], strict=False)
                if a[1] is not None and b[1] is not None]
        final = r["final_val_loss"]
        rows.append({"peer": r["optimizer"], "lr": r["lr"], "final": final,
                     "ours": mine["final_val_loss"],
                     "diff": None if final is None else final - mine["final_val_loss"],
                     "max_curve_gap": max(gaps) if gaps else None})
    return rows


def _summarize_largebatch(task: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[int, Any]] = {}
    for r in task["runs"]:
        rows.setdefault(r["optimizer"], {}).setdefault(r["batch_size"], []).append(r)
    table: dict[str, Any] = {}
    for opt, by_batch in rows.items():
        table[opt] = {}
        for batch in task["batch_sizes"]:
            records = sorted(by_batch.get(batch, []), key=lambda r: r["seed_index"])
            if not records:
                continue
            table[opt][str(batch)] = {"lr": records[0]["lr"], "max_iters": records[0]["max_iters"],
                                      **_stats([r["final_val_loss"] for r in records]),
                                      "curve": _mean_curve(records)}
    return {"description": task["description"], "lr_rule": task["lr_rule"],
            "batch_sizes": task["batch_sizes"], "largebatch": table}


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "diverged" if value is None else format(value, spec)


def format_tables(summary: dict[str, Any]) -> str:
    """Markdown tables of a :func:`summarize` result."""
    lines: list[str] = []
    for name, entry in summary.items():
        lines += [f"### {name}: {entry['description']}", ""]
        if "largebatch" in entry:
            lines += _largebatch_table(entry)
            continue
        lines += ["| optimizer | lr grid | best lr | final val loss (mean +- std, n) | "
                  "minus Adan, per seed | val acc |", "|---|---|---|---|---|---|"]
        for opt, row in entry["rows"].items():
            grid = ", ".join(f"{lr:.3g}: {_fmt(loss, '.3f')}" for lr, loss in row["grid"])
            edge = " (grid edge)" if row["edge"] else ""
            mean = "diverged" if row["mean"] is None else \
                f"{row['mean']:.4f} +- {row['std']:.4f} ({row['n']})"
            acc = "" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
            paired = "" if opt == contenders.OURS or row["minus_adan"] is None else \
                " ".join(f"{d:+.3f}" for d in row["minus_adan"])
            lines.append(f"| {opt} | {grid} | {row['best_lr']:.3g}{edge} | {mean} | {paired} "
                         f"| {acc} |")
        lines.append("")
        if "best_baseline" in entry:
            lines += [f"Best baseline: {entry['best_baseline']} ({entry['target']:.4f}); "
                      f"Adan minus best baseline: {entry['adan_minus_best']:+.4f}. "
                      f"Adan reaches the best baseline's final loss "
                      f"{_when(entry, 'adan')}; {entry['best_baseline']} reaches Adan's final "
                      f"loss {_when(entry, 'baseline')}.", ""]
        if entry["peers"]:
            lines += ["| peer (at Adan's best lr, seed 0) | final val loss | ours | difference "
                      "| largest gap along the curve |", "|---|---|---|---|---|"]
            for p in entry["peers"]:
                lines.append(f"| {p['peer']} | {_fmt(p['final'])} | {_fmt(p['ours'])} | "
                             f"{_fmt(p['diff'], '+.2e')} | {_fmt(p['max_curve_gap'], '.2e')} |")
            lines.append("")
    return "\n".join(lines).rstrip()


def _when(entry: dict[str, Any], who: str) -> str:
    """'after N steps (P% of the budget)' or 'not within the budget'."""
    fraction = entry[f"{who}_reach_fraction"]
    if fraction is None:
        return "not within the budget"
    return f"after {entry[f'{who}_reach_iter']} steps ({100 * fraction:.0f}% of the budget)"


def _largebatch_table(entry: dict[str, Any]) -> list[str]:
    batches = [str(b) for b in entry["batch_sizes"]]
    lines = [f"lr rule: {entry['lr_rule']}", "",
             "| optimizer | " + " | ".join(f"batch {b}: lr, final val loss" for b in batches)
             + " |", "|---|" + "---|" * len(batches)]
    for opt, by_batch in entry["largebatch"].items():
        cells = []
        for b in batches:
            cell = by_batch.get(b)
            if cell is None:
                cells.append("-")
            elif cell["mean"] is None:
                cells.append(f"{cell['lr']:.3g}: diverged")
            else:
                cells.append(f"{cell['lr']:.3g}: {cell['mean']:.4f} +- {cell['std']:.4f}")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(results: dict[str, Any], out: str | Path) -> list[Path]:
    """One PNG per task: mean validation curve of each optimizer at its best lr, +- std band
    omitted for clarity; largebatch plots loss against training tokens. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    written = []
    for name, entry in summary.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        values: list[float] = []
        finals: list[float] = []
        if "largebatch" in entry:
            cfg = results["tasks"][name]["config"]
            colors = {str(b): f"C{i}" for i, b in enumerate(entry["batch_sizes"])}
            for opt, by_batch in entry["largebatch"].items():
                for batch, cell in by_batch.items():
                    if not cell["curve"]:
                        continue
                    tokens = int(batch) * cfg["block_size"]
                    xs = [it * tokens / 1e6 for it, _ in cell["curve"]]
                    values += [v for _, v in cell["curve"]]
                    finals.append(cell["curve"][-1][1])
                    ax.plot(xs, [v for _, v in cell["curve"]], color=colors[batch],
                            label=f"{opt} batch {batch} (lr {cell['lr']:.3g})",
                            linestyle="-" if opt == contenders.OURS else "--")
            ax.set_xlabel("training tokens (millions)")
        else:
            for opt, row in entry["rows"].items():
                if row["curve"]:
                    values += [v for _, v in row["curve"]]
                    finals.append(row["curve"][-1][1])
                    ax.plot([it for it, _ in row["curve"]], [v for _, v in row["curve"]],
                            label=f"{opt} (lr {row['best_lr']:.3g})",
                            linewidth=2.2 if opt == contenders.OURS else 1.2)
            ax.set_xlabel("iteration")
        if values:
            # Zoom on the lower half of the losses, where the optimizers differ, keeping
            # every curve's end in view.
            low, mid = min(values), statistics.median(values)
            top = max(mid + 0.2 * (mid - low), max(finals) + 0.1 * (max(finals) - low)) + 0.05
            ax.set_ylim(low - 0.02 * abs(low), top)
        ax.set_ylabel("validation loss (mean over seeds)")
        # Wrapped: a long description ran past the figure's edge on one line.
        ax.set_title(textwrap.fill(f"{name}: {entry['description']}", 80), fontsize=9)
        ax.grid(alpha=0.3)
        if "largebatch" in entry:
            # Beside the axes: inside, it covered the batch-12 curves.
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.set_size_inches(9.5, 4.5)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out) / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks train``: run or resume the study, print the tables."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks train",
        description="Tune Adan and the baselines per task (lr grid at seed 0, more seeds at "
        "the best lr), then write results.json, results.md and one PNG per task. "
        "Re-running the same command resumes an interrupted study.",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--optimizers", nargs="+", default=[contenders.OURS,
                                                            *contenders.BASELINES],
                        choices=[contenders.OURS, *contenders.BASELINES])
    parser.add_argument("--largebatch-optimizers", nargs="+", default=None,
                        choices=[contenders.OURS, *contenders.BASELINES],
                        help="optimizers for largebatch (default: those of --optimizers)")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the agreement check: our per-tensor kernel and the installed "
                        "peers' Adans (timm, pytorch-optimizer, optimi) at our best lr")
    parser.add_argument("--seeds", type=_at_least_one, default=3,
                        help="seeds at the best lr (default 3)")
    parser.add_argument("--jobs", type=_at_least_one, default=max(1, available_cores()),
                        help="runs in parallel, one process each (default: one per core)")
    parser.add_argument("--iters-scale", type=_positive, default=1.0,
                        help="multiply every task's iterations (a reduced study; say so)")
    parser.add_argument("--data", default=None, help="the text for charlm/lstm")
    parser.add_argument("--out", default="bench-train", help="output directory")
    args = parser.parse_args(argv)
    tasks = default_tasks()
    chosen = [tasks[name] for name in args.tasks]
    if args.iters_scale != 1.0:
        chosen = [_rescale(task, args.iters_scale) for task in chosen]
    peers = [] if args.no_peers else contenders.available_peers()
    if args.largebatch_optimizers:
        lb_opts = tuple(dict.fromkeys([contenders.OURS, *args.largebatch_optimizers]))
        chosen = [dataclasses.replace(t, optimizers=lb_opts) if t.largebatch else t
                  for t in chosen]
    results = run_study(args.out, chosen, args.optimizers, peers, args.seeds, args.jobs,
                        args.data)
    print(format_tables(summarize(results)))
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md and "
          + ", ".join(f"{name}.png" for name in results["tasks"]))
    return 0


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _rescale(task: Task, scale: float) -> Task:
    """The task with iterations, warm-up and evaluation spacing multiplied by ``scale``."""
    return dataclasses.replace(task, config=_scale_schedule(task.config, scale))
