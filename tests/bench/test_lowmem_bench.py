"""``python -m benchmarks lowmem`` memory and speed modes: --device before or after the mode,
CPU runs, a clear error for CUDA without CUDA, and a CUDA run where a GPU exists. No timing
asserted."""

from __future__ import annotations

import pytest
import torch

import adan.release
from benchmarks import lowmem
from benchmarks.__main__ import main as benchmarks_main


@pytest.mark.parametrize("argv", [["memory", "--numel", "1000", "--device", "cpu"],
                                  ["--device", "cpu", "memory", "--numel", "1000"]])
def test_memory_mode_takes_device_either_side(argv: list[str], capsys):
    assert lowmem.main(argv) == 0
    out = capsys.readouterr().out
    assert "(1000 elements, cpu)" in out and "fp32  16.0000" in out and "step peak" not in out


def test_speed_mode_runs_on_cpu(capsys):
    argv = ["speed", "--device", "cpu", "--numel", "1000", "--tensors", "1", "--repeats", "1",
            "--steps", "1"]
    assert lowmem.main(argv) == 0
    out = capsys.readouterr().out
    assert "median step time, 1 x 1000 float32 params" in out and "x1.00 of fp32" in out
    assert "fp32*" in out and "x1.00 of AdamW" in out


def test_speed_mode_takes_the_parameters_dtype(capsys):
    argv = ["speed", "--device", "cpu", "--numel", "1000", "--tensors", "1", "--repeats", "1",
            "--steps", "1", "--dtype", "float16"]
    assert lowmem.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 x 1000 float16 params" in out and "int8" in out and "fp32*" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert benchmarks_main(["lowmem", "memory", "--device", "cuda"]) == 2
    assert lowmem.main(["memory", "--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "bad --device 'nonsense'" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_reports_state_and_step_peak():
    rows = lowmem.memory(1 << 16, "cuda")
    assert [fmt for fmt, _, _ in rows] == ["fp32", "bf16", "int8"]
    assert rows[0][1] == 16 and all(peak is not None and peak >= 0 for _, _, peak in rows)
    medians = lowmem.speed(1 << 16, 2, 1, 2, "cuda")
    assert set(medians) == {"fp32", "bf16", "int8"} and all(t > 0 for t in medians.values())


def test_help_names_the_command_as_typed(capsys):
    with pytest.raises(SystemExit):
        benchmarks_main(["lowmem", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks lowmem")


def test_report_plots_curves_and_differences_from_fp32(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import json

    runs = {f"{fmt}/1": {"val_curve": [[0, 4.0], [10, 3.0 + shift]], "final_val_loss": 3.0 + shift}
            for fmt, shift in (("fp32", 0.0), ("bf16", 0.01), ("int8", -0.02))}
    (tmp_path / "conv.json").write_text(json.dumps(runs))
    argv = ["report", "--out", str(tmp_path / "conv.json"), "--plot", str(tmp_path / "c.png")]
    assert lowmem.main(argv) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "bf16  mean final val loss 3.0100 (+0.0100 vs fp32, 1 seeds)" in capsys.readouterr().out


def test_training_mode_measures_what_release_frees(capsys, monkeypatch):
    """A tiny GPT-2-shaped model, each parameter released on its own: release holds no more
    than its largest gradient at once and lowers the step's peak; the table and the comparison
    are printed (no timing asserted)."""
    monkeypatch.setattr(adan.release, "SMALL_NUMEL", 0)
    argv = ["training", "--layers", "1", "--embd", "64", "--vocab", "64", "--block", "8",
            "--batch", "1", "--steps", "1", "--repeats", "1"]
    assert lowmem.main(argv) == 0
    out = capsys.readouterr().out
    assert "Adan int8 + release" in out and "Adan: release saves" in out
    rows = lowmem.training(1, 64, 64, 8, 1, 1, 1)
    for base in ("Adan", "Adan int8"):
        released = rows[f"{base} + release"]
        assert rows[base]["grads"] == 4.0 and released["grads"] < 2.0
        assert released["peak"] < rows[base]["peak"]
        assert released["state"] == rows[base]["state"]


def test_training_mode_compares_only_the_settings_named(capsys):
    """``--settings`` picks the optimizers (in its order); release's comparison is printed
    for a pair that is there and not for one that is not."""
    argv = ["training", "--layers", "1", "--embd", "64", "--vocab", "64", "--block", "8",
            "--batch", "1", "--steps", "1", "--repeats", "1",
            "--settings", "Adan + release", "Adan"]
    assert lowmem.main(argv) == 0
    out = capsys.readouterr().out
    table = [line.split()[0:3] for line in out.splitlines() if line.startswith("  Adan ")]
    assert table[:2] == [["Adan", "+", "release"], ["Adan", "4.00", "16.00"]]
    assert "Adan: release saves" in out and "int8" not in out
    with pytest.raises(SystemExit):
        lowmem.main([*argv[:-2], "SGD"])
