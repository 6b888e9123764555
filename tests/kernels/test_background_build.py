"""Fused kernels are built off the critical path: the eager path steps until the build is
done, with the same bits, and nothing waits for a build but ``fused=True`` and ``warm_up()``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from conftest import assert_same_runs

from adan import Adan
from adan.kernels import cpu_compiled, routing


@pytest.fixture
def gated_builds(monkeypatch):
    """Background builds on, each held until the test opens the gate (a fresh build cache)."""
    gate = threading.Event()
    probe = routing._probe

    def held(*args, **kwargs):
        gate.wait()
        probe(*args, **kwargs)

    monkeypatch.setattr(routing, "BACKGROUND", True)
    monkeypatch.setattr(routing, "PREWARM", False)
    monkeypatch.setattr(routing, "_builds", {})
    monkeypatch.setattr(routing, "_probe", held)
    yield gate
    gate.set()


def _kernels(opt: Adan) -> set[str]:
    return {c.kernel.__name__ for plan in opt._stepper.plans.values() for c in plan.calls}


FUSED = {"cpu_compiled_adan", "cpu_native_adan"}
"""The CPU's fused kernels: Inductor's for plain state, the C++ one for compact state."""


def _wait_for_builds() -> None:
    for build in list(routing._builds.values()):
        build.done.wait()


CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "fp32"),
         (torch.float32, "bf16"), (torch.float32, "int8")]


@pytest.mark.parametrize("dtype, state_dtype", CASES, ids=str)
def test_switching_to_the_fused_kernel_changes_no_bit(gated_builds, monkeypatch, dtype,
                                                      state_dtype):
    """Steps 1-3 on the eager twin (the build held), the rest fused: the same bits as a run
    fused from its first step, parameters and every state buffer."""
    runs = []
    for background in (True, False):
        monkeypatch.setattr(routing, "BACKGROUND", background)
        torch.manual_seed(0)
        params = [torch.randn(1 << 16, dtype=dtype), torch.randn(300, dtype=dtype)]
        opt = Adan(params, lr=0.01, weight_decay=0.1, state_dtype=state_dtype)
        gen = torch.Generator().manual_seed(1)
        for k in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if k == 3:
                gated_builds.set()
                _wait_for_builds()
            opt.step()
            assert bool(FUSED & _kernels(opt)) == (k >= 3 or not background), k
        runs.append((params, opt))
    assert_same_runs(*runs[0], *runs[1])


def test_fused_true_waits_and_says_so(gated_builds, monkeypatch, capsys):
    monkeypatch.setattr(routing, "WAIT_NOTICE_S", 0.01)
    p = torch.zeros(1 << 16)
    p.grad = torch.ones_like(p)
    opt = Adan([p], lr=0.01, fused=True)
    threading.Timer(0.2, gated_builds.set).start()
    opt.step()
    assert "cpu_compiled_adan" in _kernels(opt)
    assert "adan: waiting for the fused kernel" in capsys.readouterr().err


def test_warm_up_waits_for_the_build_up_front(gated_builds):
    p = torch.zeros(1 << 16)
    opt = Adan([p], lr=0.01, state_dtype="int8")
    threading.Timer(0.2, gated_builds.set).start()
    opt.warm_up()
    p.grad = torch.ones_like(p)
    opt.step()
    assert _kernels(opt) == {"cpu_native_adan"}


def test_a_failed_background_build_warns_once_and_loses_no_step(gated_builds, monkeypatch,
                                                                recwarn):
    monkeypatch.setattr(routing, "cpu_compiler_missing", lambda: "no compiler (test)")
    gated_builds.set()
    p = torch.zeros(1 << 16)
    opt = Adan([p], lr=0.01)
    for _ in range(4):
        p.grad = torch.ones_like(p)
        opt.step()
        _wait_for_builds()
    assert opt.state[p]["step"].item() == 4
    assert _kernels(opt) == {"multi_tensor_adan"}
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler (test)" in messages[0]


def test_a_deleted_optimizer_is_not_kept_by_its_build(gated_builds):
    p = torch.zeros(1 << 16)
    p.grad = torch.ones_like(p)
    opt = Adan([p], lr=0.01)
    opt.step()
    ref = weakref.ref(opt)
    del opt
    assert ref() is None
    gated_builds.set()
    _wait_for_builds()


CHILD = r"""
import atexit, threading, time, torch
from adan import Adan
from adan.kernels import routing
p = torch.zeros(1 << 18)
p.grad = torch.ones_like(p)
opt = Adan([p], lr=0.01)
opt.step()
assert all(t.daemon for t in threading.enumerate() if t.name == "adan-build")
build = next(iter(routing._builds.values()))
while not routing._children:  # the compile subprocess has started
    if build.done.is_set():  # a clear failure rather than a wait without end
        raise SystemExit("the build ended without starting its compile subprocess")
    time.sleep(0.05)
atexit.register(lambda: print("groups", *(c.pid for c in routing._children)))
"""


def test_a_process_that_exits_during_a_build_ends_cleanly(tmp_path):
    """The build is still compiling in its subprocess when the script ends (Inductor's compile
    of plain state takes seconds): the process stops it and the compilers it started instead of
    waiting, and exits with status 0, leaving no process behind."""
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
                                "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert child.returncode == 0, child.stderr
    assert "finishing a fused kernel's build" not in child.stderr
    groups = [int(pid) for pid in child.stdout.split("groups", 1)[1].split()]
    assert groups
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


def test_the_cpu_probe_builds_the_variants_the_tensors_need(monkeypatch):
    """A large tensor steps with the threaded variant, a small one with the serial one: the
    probe builds those, so the switch compiles nothing on the critical path."""
    built = []
    compiled = cpu_compiled._compiled

    def record(signature, serial):
        built.append(serial)
        return compiled(signature, serial)

    monkeypatch.setattr(cpu_compiled, "_compiled", record)
    monkeypatch.setattr(routing, "_builds", {})
    p = torch.zeros(cpu_compiled.SERIAL_MAX)
    opt = Adan([p], lr=0.01, fused=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert built and all(serial is False for serial in built)
