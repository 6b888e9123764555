"""The convergence study: every task end to end at tiny sizes, resuming, and the tables."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_text

from adan.demo.charlm import CharLMConfig
from benchmarks import train
from benchmarks.__main__ import BENCHMARKS
from benchmarks.charlstm import CharLSTMConfig
from benchmarks.digits import DigitsConfig
from benchmarks.train import Task, format_tables, run_study, scaled_config, scaled_lr, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_LM = CharLMConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8,
                       max_iters=40, warmup_iters=4, eval_interval=10, eval_iters=3, seed=5)
TINY_LSTM = CharLSTMConfig(n_embd=16, hidden=32, n_layer=1, block_size=16, batch_size=8,
                           max_iters=40, warmup_iters=4, eval_interval=10, eval_iters=3, seed=5)
TINY_CNN = DigitsConfig(width=8, batch_size=32, max_iters=40, warmup_iters=4, eval_interval=10)
OPTS = ["Adan", "AdamW"]


def tiny_tasks() -> list[Task]:
    return [
        Task("charlm", "charlm", TINY_LM, "tiny GPT"),
        Task("cnn", "cnn", TINY_CNN, "tiny CNN"),
        Task("lstm", "lstm", TINY_LSTM, "tiny LSTM"),
        Task("largebatch", "charlm", TINY_LM, "tiny GPT, batches 8 and 16",
             batch_sizes=(8, 16), lr_source="charlm"),
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """The four tasks, two optimizers, two seeds, run once for the whole module."""
    out = tmp_path_factory.mktemp("study")
    text = out / "text.txt"
    text.write_text(tiny_text(), encoding="utf-8")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_study(out, tiny_tasks(), OPTS, seeds=2, jobs=1, data_path=str(text),
                            progress=False)
    finally:
        torch.set_num_threads(before)
    return out, results, text


def test_every_task_learns_and_writes_its_outputs(study: tuple[Path, dict[str, Any], Path]
                                                  ) -> None:
    out, results, _ = study
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("charlm", "cnn", "lstm", "largebatch"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        runs = results["tasks"][name]["runs"]
        assert runs
        for run in runs:
            if run["final_val_loss"] is not None and run["optimizer"] == "Adan":
                assert run["final_val_loss"] < run["val_curve"][0][1]
    table = (out / "results.md").read_text()
    for name in ("charlm", "cnn", "lstm", "largebatch"):
        assert f"### {name}" in table
    # Each optimizer's grid (4 points, grown past an edge best) plus 1 extra seed.
    for name in ("charlm", "cnn", "lstm"):
        task = results["tasks"][name]
        grids = task["grids"]
        assert len(task["runs"]) == sum(len(grid) + 1 for grid in grids.values())
        for opt in OPTS:
            assert set(train.grid_for(task["kind"], opt)) <= set(grids[opt])
            assert 4 <= len(grids[opt]) <= 4 + train.MAX_EXTEND
    assert "final_val_acc" in results["tasks"]["cnn"]["runs"][0]


def test_largebatch_uses_the_rule_from_charlm_best_and_same_tokens(
        study: tuple[Path, dict[str, Any], Path]) -> None:
    _, results, _ = study
    summary = summarize(results)
    for opt in OPTS:
        best = summary["charlm"]["rows"][opt]["best_lr"]
        cells = summary["largebatch"]["largebatch"][opt]
        assert cells["8"]["lr"] == pytest.approx(best)
        assert cells["16"]["lr"] == pytest.approx(best * math.sqrt(2))
        assert cells["8"]["max_iters"] * 8 == cells["16"]["max_iters"] * 16
        # batch 8 is charlm's own setting: those runs are the charlm seeds, not retrained.
        assert cells["8"]["finals"] == summary["charlm"]["rows"][opt]["finals"]
    keys = {task: {r["key"] for r in results["tasks"][task]["runs"]}
            for task in ("charlm", "largebatch")}
    assert len(keys["largebatch"] & keys["charlm"]) == len(OPTS) * 2


def test_resume_runs_only_what_is_missing(study: tuple[Path, dict[str, Any], Path],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, results, text = study
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    files = sorted((out / "runs").glob("*.json"))
    for path in files[3:]:
        (copy / "runs" / path.name).write_bytes(path.read_bytes())
    calls: list[str] = []
    real = train.execute

    def counting(run: train.Run, data_path: str | None, threads: int) -> dict[str, Any]:
        calls.append(run.key())
        return real(run, data_path, threads)

    monkeypatch.setattr(train, "execute", counting)
    again = run_study(copy, tiny_tasks(), OPTS, seeds=2, jobs=1, data_path=str(text),
                      progress=False)
    assert sorted(calls) == sorted(p.stem for p in files[:3])
    assert summarize(again) == summarize(results)


def test_interrupted_study_continues(tmp_path: Path, text_file: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [Task("cnn", "cnn", dataclasses.replace(TINY_CNN, max_iters=6, eval_interval=3),
                  "tiny CNN")]
    real = train.execute
    calls: list[str] = []

    def flaky(run: train.Run, data_path: str | None, threads: int) -> dict[str, Any]:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(run.key())
        return real(run, data_path, threads)

    monkeypatch.setattr(train, "execute", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path, tasks, ["Adan"], seeds=2, progress=False)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3
    assert not list((tmp_path / "runs").glob(".*"))
    monkeypatch.setattr(train, "execute", real)
    results = run_study(tmp_path, tasks, ["Adan"], seeds=2, progress=False)
    cnn = results["tasks"]["cnn"]
    assert len(cnn["runs"]) == len(cnn["grids"]["Adan"]) + 1 >= 5


def _record(opt: str, lr: float, final: float | None, curve: list[float], role: str = "grid",
            seed_index: int = 0, batch: int = 12, iters: int = 400) -> dict[str, Any]:
    step = iters // (len(curve) - 1)
    return {"optimizer": opt, "lr": lr, "final_val_loss": final, "role": role,
            "seed_index": seed_index, "batch_size": batch, "max_iters": iters,
            "val_curve": [[i * step, v] for i, v in enumerate(curve)]}


def known_results() -> dict[str, Any]:
    """A hand-made results object whose summary is worked out in the test below."""
    runs = [
        _record("Adan", 0.01, 2.0, [4.0, 3.0, 2.5, 2.2, 2.0]),
        _record("Adan", 0.02, 1.8, [4.0, 2.6, 2.0, 1.9, 1.8]),
        _record("Adan", 0.02, 1.9, [4.0, 2.7, 2.1, 1.95, 1.9], "seed", 1),
        _record("Adan", 0.02, 2.0, [4.0, 2.8, 2.2, 2.0, 2.0], "seed", 2),
        _record("AdamW", 0.001, None, [4.0, 9.0, None, None, None]),
        _record("AdamW", 0.003, 2.1, [4.0, 3.0, 2.5, 2.2, 2.1]),
        _record("AdamW", 0.003, 2.2, [4.0, 3.0, 2.5, 2.3, 2.2], "seed", 1),
        _record("AdamW", 0.003, 2.3, [4.0, 3.0, 2.6, 2.4, 2.3], "seed", 2),
        _record("SGD-Nesterov", 0.1, 2.5, [4.0, 3.5, 3.0, 2.7, 2.5]),
        _record("SGD-Nesterov", 0.3, 2.6, [4.0, 3.5, 3.0, 2.8, 2.6]),
        _record("SGD-Nesterov", 0.3, 2.7, [4.0, 3.6, 3.1, 2.9, 2.7], "seed", 1),
        _record("SGD-Nesterov", 0.1, 2.4, [4.0, 3.4, 2.9, 2.6, 2.4], "seed", 1),
        _record("SGD-Nesterov", 0.1, 2.6, [4.0, 3.5, 3.1, 2.8, 2.6], "seed", 2),
        _record("timm Adan", 0.02, 1.81, [4.0, 2.62, 2.0, 1.9, 1.81], "peer"),
    ]
    lb = [_record(opt, lr, final, [4.0, final], "largebatch", seed, batch)
          for opt, lr, batch, seed, final in [
              ("Adan", 0.02, 12, 0, 1.8), ("Adan", 0.02, 12, 1, 1.9),
              ("Adan", 0.04, 48, 0, 2.0), ("Adan", 0.04, 48, 1, 2.2),
              ("AdamW", 0.003, 12, 0, 2.1), ("AdamW", 0.003, 12, 1, None)]]
    return {
        "settings": {},
        "tasks": {
            "toy": {"description": "toy", "kind": "charlm", "runs": runs,
                    "grids": {"Adan": [0.01, 0.02], "AdamW": [0.001, 0.003, 0.01],
                              "SGD-Nesterov": [0.1, 0.3]}},
            "lb": {"description": "lb", "kind": "charlm", "runs": lb, "batch_sizes": [12, 48],
                   "lr_rule": "sqrt", "config": {"block_size": 4}},
        },
    }


def test_summary_and_table_from_a_known_json() -> None:
    summary = summarize(json.loads(json.dumps(known_results())))
    toy = summary["toy"]
    adan = toy["rows"]["Adan"]
    assert adan["best_lr"] == 0.02 and adan["edge"]
    assert adan["finals"] == [1.8, 1.9, 2.0]
    assert adan["mean"] == pytest.approx(1.9)
    assert adan["std"] == pytest.approx(0.1)
    assert [v for _, v in adan["curve"]] == pytest.approx([4.0, 2.7, 2.1, 1.95, 1.9])
    # AdamW's grid has 3 points, one still missing: no row until it is complete.
    assert "AdamW" not in toy["rows"]
    sgd = toy["rows"]["SGD-Nesterov"]
    assert sgd["best_lr"] == 0.1 and sgd["finals"] == [2.5, 2.4, 2.6]
    assert sgd["std"] == pytest.approx(statistics.stdev([2.5, 2.4, 2.6]))
    assert sgd["minus_adan"] == pytest.approx([0.7, 0.5, 0.6])
    assert toy["best_baseline"] == "SGD-Nesterov" and toy["target"] == pytest.approx(2.5)
    # Adan's mean curve first gets to <= 2.5 at the third evaluation: iteration 200 of 400.
    assert toy["adan_reach_iter"] == 200 and toy["adan_reach_fraction"] == pytest.approx(0.5)
    assert toy["adan_minus_best"] == pytest.approx(-0.6)
    # SGD's mean curve [4, 3.5, 3.0, 2.7, 2.5] never gets to Adan's 1.9.
    assert toy["baseline_reach_iter"] is None
    (peer,) = toy["peers"]
    assert peer["peer"] == "timm Adan" and peer["diff"] == pytest.approx(0.01)
    assert peer["max_curve_gap"] == pytest.approx(0.02)
    lb = summary["lb"]["largebatch"]
    assert lb["Adan"]["48"]["mean"] == pytest.approx(2.1)
    assert lb["Adan"]["48"]["std"] == pytest.approx(statistics.stdev([2.0, 2.2]))
    assert lb["AdamW"]["12"]["mean"] is None

    table = format_tables(summary)
    assert "| Adan | 0.01: 2.000, 0.02: 1.800 | 0.02 (grid edge) | 1.9000 +- 0.1000 (3) |  |" \
        in table
    assert "| 2.5000 +- 0.1000 (3) | +0.700 +0.500 +0.600 |" in table
    assert "Best baseline: SGD-Nesterov (2.5000); Adan minus best baseline: -0.6000" in table
    assert "Adan reaches the best baseline's final loss after 200 steps (50% of the budget); " \
        "SGD-Nesterov reaches Adan's final loss not within the budget." in table
    assert "| timm Adan | 1.8100 | 1.8000 | +1.00e-02 | 2.00e-02 |" in table
    assert "0.04: 2.1000 +- 0.1414" in table and "0.003: diverged" in table


def test_baseline_reaching_a_worse_adan_is_timed() -> None:
    results = known_results()
    for run in results["tasks"]["toy"]["runs"]:
        if run["optimizer"] == "Adan":
            run["final_val_loss"] += 1.0
            run["val_curve"] = [[i, v + 1.0] for i, v in run["val_curve"]]
    toy = summarize(results)["toy"]
    assert toy["adan_minus_best"] == pytest.approx(0.4) and toy["adan_reach_iter"] is None
    # SGD's mean curve [4, 3.47, 3.0, 2.7, 2.5] first gets to Adan's 2.9 at step 300 of 400.
    assert toy["baseline_reach_iter"] == 300
    assert toy["baseline_reach_fraction"] == pytest.approx(0.75)
    assert "SGD-Nesterov reaches Adan's final loss after 300 steps (75% of the budget)" in \
        format_tables(summarize(results))


def test_diverged_grid_point_loses_and_is_reported(tmp_path: Path) -> None:
    results = known_results()
    results["tasks"]["toy"]["runs"].append(_record("AdamW", 0.01, 2.0, [4.0, 3, 2.5, 2.1, 2.0]))
    for seed, final in ((1, 2.1), (2, 2.2)):
        results["tasks"]["toy"]["runs"].append(
            _record("AdamW", 0.01, final, [4.0, 3, 2.5, 2.2, final], "seed", seed))
    toy = summarize(results)["toy"]
    row = toy["rows"]["AdamW"]
    # AdamW's mean curve [4, 3, 2.5, 2.1667, 2.1] never reaches Adan's 1.9; Adan's reaches
    # AdamW's 2.1 at its third point.
    assert toy["best_baseline"] == "AdamW" and toy["adan_reach_iter"] == 200
    assert row["grid"][0] == [0.001, None]
    assert row["best_lr"] == 0.01 and row["mean"] == pytest.approx(2.1)
    assert "0.001: diverged" in format_tables(summarize(results))
    assert train.plot(results, tmp_path) == [tmp_path / "toy.png", tmp_path / "lb.png"]


def test_a_diverging_run_stops_early_and_is_stored_as_null(text_file: Path) -> None:
    run = train.Run("charlm", TINY_LM, "Adan", 1e30, "grid")
    record = train.execute(run, str(text_file), 1)
    assert record["diverged"] and record["final_val_loss"] is None
    assert len(record["val_curve"]) < TINY_LM.max_iters // TINY_LM.eval_interval + 1
    json.dumps(record, allow_nan=False)


def test_plan_waits_for_the_grid_before_seeds_and_largebatch() -> None:
    tasks = tiny_tasks()
    runs, total = train.plan(tasks, OPTS, ["timm Adan (foreach)"], 3, {})
    roles = {run.role for _, run in runs}
    assert roles == {"grid"}
    assert total == 3 * (2 * (4 + 2) + 1) + 2 * 2 * 3
    done = {run.key(): {"lr": run.lr, "final_val_loss":
                        abs(run.lr - train.grid_for(run.kind, run.optimizer)[1])}
            for _, run in runs}
    runs, _ = train.plan(tasks, OPTS, ["timm Adan (foreach)"], 3, done)
    by_role = {role: [r for _, r in runs if r.role == role] for role in ("seed", "peer",
                                                                         "largebatch")}
    assert len(by_role["seed"]) == 3 * 2 * 2 and len(by_role["peer"]) == 3
    assert {r.lr for name, r in runs if r.role == "seed" and r.optimizer == "Adan"
            and name == "charlm"} == {train.grid_for("charlm", "Adan")[1]}
    assert len(by_role["largebatch"]) == 2 * 2 * 3


def test_grid_grows_past_an_edge_best_a_bounded_number_of_times() -> None:
    task = tiny_tasks()[0]
    base = train.grid_for("charlm", "AdamW")
    done: dict[str, dict[str, Any]] = {}
    longest = 4 + train.MAX_EXTEND
    for size in range(4, longest + 1):
        runs, best = train._grid_runs(task, "AdamW", done)
        assert [r.lr for r in runs] == pytest.approx([base[0] * 2.0**k for k in range(size)])
        assert best is None
        done.update({r.key(): {"lr": r.lr, "final_val_loss": 1 / r.lr} for r in runs})
    runs, best = train._grid_runs(task, "AdamW", done)
    assert len(runs) == longest and best == pytest.approx(base[-1] * 2.0**train.MAX_EXTEND)
    # An inner best ends the search at once; below the grid it grows downwards.
    done = {r.key(): {"lr": r.lr, "final_val_loss": abs(r.lr - base[1])}
            for r in train._grid_runs(task, "AdamW", {})[0]}
    assert train._grid_runs(task, "AdamW", done)[1] == base[1]
    done = {k: {**v, "final_val_loss": v["lr"]} for k, v in done.items()}
    assert train._grid_runs(task, "AdamW", done)[0][0].lr == pytest.approx(base[0] / 2)


def test_scaling_rules() -> None:
    base = CharLMConfig()
    assert scaled_config(base, base.batch_size) is base
    big = scaled_config(base, 192)
    assert big.max_iters * 192 == base.max_iters * base.batch_size
    assert big.warmup_iters == round(100 * 12 / 192) and big.eval_batch_size == 12
    assert scaled_lr("Adan", 1e-2, 12, 48) == pytest.approx(2e-2)
    assert scaled_lr("SGD-Nesterov", 0.1, 12, 48) == pytest.approx(0.4)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(seeds=0), "seeds"), (dict(jobs=0), "jobs"), (dict(optimizers=["AdamW"]), "Adan")])
def test_study_rejects_bad_settings(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(tasks=tiny_tasks(), optimizers=OPTS, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_study(tmp_path, **args)


def test_cli_is_registered() -> None:
    assert "train" in BENCHMARKS
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0


@pytest.mark.parametrize(("argv", "match"), [
    (["--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--jobs", "-1"], "--jobs: must be an integer >= 1"),
    (["--iters-scale", "0"], "--iters-scale: must be a finite number > 0"),
    (["--tasks", "mnist"], "--tasks: invalid choice")])
def test_cli_rejects_bad_arguments(argv: list[str], match: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2 and match in capsys.readouterr().err
