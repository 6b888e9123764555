"""Adan under torch.distributed (2 gloo processes on CPU): DDP, FSDP2, ZeRO and DCP checkpoints.

Each distributed run records the full gradients it saw; replaying them through the float64
reference must give its final parameters, and the run must equal one process on the global batch.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import ReferenceAdan, RefGroup

from adan import Adan

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available on this platform",
                allow_module_level=True)

import dist_worker  # noqa: E402  (imports torch.distributed.fsdp, checkpoint, optim)

# Only a deadlock (a collective that one process never joins) should reach this: a launch
# takes seconds (18 s at most on 2 quiet cores, compiling with a cold cache), so this is
# ample on a slow or busy machine, and ends the run before gloo's own 30-minute timeout.
TIMEOUT_S = 20 * 60
PATHS = [dict(foreach=False), dict(foreach=True), dict(foreach=True, capturable=True),
         dict(fused=True)]
# Compact state takes the eager path here: compiling its kernel in every process would cost
# more than the whole test (the kernels are tested against the reference on their own).
STATE_OPTIONS: list[dict[str, Any]] = [{}, {"state_dtype": "bf16", "foreach": False},
                                       {"state_dtype": "int8", "foreach": False}]
TOL = dict(rtol=1e-10, atol=1e-12)  # float64; the runs agree to ~1e-16 on this machine
# Compact state rounds the moments carried between steps (stochastically, with other draws on
# each rank and in each run): parameters then agree to a fraction of how far they moved. The
# 8-bit codes' 3 mantissa bits spread it more than the power codes did (one element of 40
# was 6.6 % off, measured).
TRACK_TOL = {"bf16": 0.02, "int8": 0.1}


def _start_method() -> str:
    """forkserver where there is one: it imports torch once for every launch of the file.

    (The server does not see this directory on sys.path, so it preloads dist_worker's imports.)
    """
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(
        ["adan", "torch.distributed.checkpoint", "torch.distributed.fsdp",
         "torch.distributed.optim", "torch.nn.parallel", "numpy", "pytest"]
    )
    return "forkserver"


START_METHOD = _start_method()


def launch(scenario: str, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """Run ``scenario`` on ``world`` gloo processes; fail (killing them) past the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(dist_worker.entry, args=(world, port, scenario, str(out), opt_kwargs),
                             nprocs=world, join=False, start_method=START_METHOD)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{scenario} on {world} processes did not finish in {TIMEOUT_S} s")


def load(out: Path, name: str) -> dict[str, Any]:
    return torch.load(out / f"{name}.pt")


def replay(grads: list[list[torch.Tensor]], max_grad_norm: float = 0.0) -> list[np.ndarray]:
    """The reference's parameters after the recorded gradients (model order: w1, b1, w2, b2)."""
    init = [p.detach().numpy() for p in dist_worker.make_model().parameters()]
    groups = [RefGroup([init[0], init[2]], **dist_worker.GROUP_HPARAMS[0]),
              RefGroup([init[1], init[3]], **dist_worker.GROUP_HPARAMS[1])]
    ref = ReferenceAdan(groups, max_grad_norm=max_grad_norm)
    for step in grads:
        g = [t.numpy() for t in step]
        ref.step([[g[0], g[2]], [g[1], g[3]]])
    w, b = groups[0].params, groups[1].params
    return [w[0], b[0], w[1], b[1]]


def single_process(opt_kwargs: dict[str, Any], clip: float = 0.0) -> list[torch.Tensor]:
    """The same training in this process on the whole global batch, without torch.distributed."""
    model = dist_worker.make_model()
    opt = Adan(dist_worker.param_groups(model), **opt_kwargs)
    dist_worker.train(model, opt, range(dist_worker.STEPS), rank=0, world=1, clip=clip)
    return list(model.parameters())


def assert_params(actual: list[torch.Tensor], expected: list[Any], tol: dict[str, float]) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        e = e.detach().numpy() if isinstance(e, torch.Tensor) else e
        np.testing.assert_allclose(a.numpy(), e, err_msg=f"parameter {i}", **tol)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_fsdp2_matches_reference_and_single_process(tmp_path, path):
    """Sharded (uneven) DTensor params and state; clipping uses the norm over all shards.

    ``grad_norm_group`` leaves it unchanged: DTensor norms are global already.
    """
    launch("fsdp", 2, tmp_path, path)
    for name in ("0.0", "0.05", "0.05-group"):
        max_grad_norm = float(name.split("-")[0])
        result = load(tmp_path, f"fsdp-{name}")
        assert result["plain_state_rejected"]
        assert all(layout == ("DTensor", torch.float64, "DTensor", torch.float64)
                   for layout in result["state_layout"].values())
        first = torch.linalg.vector_norm(torch.cat([g.flatten() for g in result["grads"][0]]))
        assert max_grad_norm == 0.0 or first > 2 * max_grad_norm  # clipping is active
        assert_params(result["params"], replay(result["grads"], max_grad_norm), TOL)
        expected = single_process(dict(path, max_grad_norm=max_grad_norm))
        assert_params(result["params"], expected, TOL)


def assert_tracks(actual: list[torch.Tensor], expected: list[Any], fmt: str) -> None:
    """Parameters agree to the compact format's rounding, relative to how far they moved."""
    init = list(dist_worker.make_model().parameters())
    for i, (a, e, p0) in enumerate(zip(actual, expected, init, strict=True)):
        e = e.detach().numpy() if isinstance(e, torch.Tensor) else e
        moved = np.abs(e - p0.detach().numpy()).max()
        np.testing.assert_allclose(a.numpy(), e, rtol=0, atol=TRACK_TOL[fmt] * moved,
                                   err_msg=f"parameter {i}")


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_fsdp2_compact_state_tracks_single_process(tmp_path, fmt):
    """bf16 state is sharded like the parameter; 8-bit codes live with the local shard and
    state_dict() hands them out dequantised as float32 DTensors."""
    kwargs = dict(state_dtype=fmt, max_grad_norm=0.05, foreach=False)
    launch("fsdp_compact", 2, tmp_path, kwargs)
    result = load(tmp_path, "fsdp_compact")
    layout = ("DTensor", torch.bfloat16, "DTensor", torch.bfloat16) if fmt == "bf16" else None
    for key, held in result["state_layout"].items():
        if fmt == "int8":
            code = torch.int8 if key != "exp_avg_sq" else torch.uint8
            layout = ("Tensor", code, "DTensor", torch.float32)
        assert held == layout, key
    assert_tracks(result["params"], replay(result["grads"], 0.05), fmt)
    assert_tracks(result["params"], single_process(kwargs), fmt)


def test_ddp_matches_reference_and_single_process(tmp_path):
    launch("ddp", 2, tmp_path, {})
    result = load(tmp_path, "ddp")
    assert_params(result["params"], replay(result["grads"]), TOL)
    assert_params(result["params"], single_process({}), TOL)


def test_gradient_release_under_ddp_equals_a_normal_step(tmp_path):
    """Each parameter stepped in DDP's communication hook with the averaged gradient; release
    without DDP's reduction and under FSDP2 is refused."""
    launch("release", 2, tmp_path, {})
    result = load(tmp_path, "release")
    assert result["freed"] and result["local_refused"] and result["fsdp_refused"]
    assert_params(result["params"], single_process({}), TOL)
    # Two micro-batches per rank, the first inside DDP's no_sync(): as one process pausing
    # release for the first of two micro-batches, each made of both ranks' halves.
    model = dist_worker.make_model()
    opt = Adan(dist_worker.param_groups(model), gradient_release=True)
    for k in range(dist_worker.STEPS):
        x, y = dist_worker.batch(k, 0, 1)
        half = x.shape[0] // 2
        micro = [torch.cat([t[j:j + 2], t[half + j:half + j + 2]]) for t in (x, y)
                 for j in (0, 2)]
        with opt.pause_gradient_release():
            torch.nn.functional.mse_loss(model(micro[0]), micro[2]).backward()
        torch.nn.functional.mse_loss(model(micro[1]), micro[3]).backward()
        opt.step()
    assert_params(load(tmp_path, "release-accumulated")["params"], list(model.parameters()),
                  TOL)


def test_zero_redundancy_optimizer_matches_reference(tmp_path):
    """Partitioned state; Adan clips by the norm over all partitions (grad_norm_group)."""
    launch("zero", 2, tmp_path, dict(max_grad_norm=0.05))
    result = load(tmp_path, "zero")
    assert 0 < result["local_states"] < 4
    first = torch.linalg.vector_norm(torch.cat([g.flatten() for g in result["grads"][0]]))
    assert first > 2 * 0.05  # clipping is active
    assert_params(result["params"], replay(result["grads"], 0.05), TOL)
    assert_params(result["params"], single_process(dict(max_grad_norm=0.05)), TOL)


def test_grad_norm_group_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="grad_norm_group"):
        Adan([torch.zeros(2, requires_grad=True)], grad_norm_group=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("state_option", STATE_OPTIONS, ids=lambda o: repr(o) if o else "default")
def test_checkpoint_resume_and_reshard_2_to_1(tmp_path, state_option):
    """Save at step 3 with 2 ranks; new processes (2 ranks FSDP2, or 1 plain) load and go on."""
    args = dict(adan=dict(state_option, max_grad_norm=0.05), stop=3)
    launch("dcp_save", 2, tmp_path, args)
    uninterrupted = single_process(args["adan"])
    before = load(tmp_path, "dcp_save")["grads"]
    fmt = state_option.get("state_dtype")
    for world in (2, 1):
        launch("dcp_resume", world, tmp_path, args)
        result = load(tmp_path, f"dcp_resume-{world}")
        if fmt is None:
            assert_params(result["params"], replay(before + result["grads"], 0.05), TOL)
            assert_params(result["params"], uninterrupted, TOL)
        else:
            assert_tracks(result["params"], replay(before + result["grads"], 0.05), fmt)
            assert_tracks(result["params"], uninterrupted, fmt)
