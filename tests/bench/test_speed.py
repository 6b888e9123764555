"""Smoke test of the speed benchmark CLI (no timing is asserted)."""

from __future__ import annotations

from adan.bench import speed


def test_gpt2_shapes_have_148_tensors_incl_biases_and_norms():
    shapes = speed.gpt2_shapes()
    assert len(shapes) == 148 and sum(len(s) == 1 for s in shapes) == 98


def test_cli_prints_a_row_per_optimizer(capsys):
    argv = ["--workload", "custom", "--numel", "1000", "--steps", "1", "--warmup", "0",
            "--bandwidth-mib", "4", "--rows", "adan foreach,AdamW foreach,timm,optimi"]
    assert speed.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("adan foreach", "torch AdamW foreach", "timm Adan", "torch-optimi Adan"):
        assert row in out
    assert "GB/s" in out and "x floor" in out
