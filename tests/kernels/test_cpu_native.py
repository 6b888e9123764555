"""The C++ kernel for compact CPU state (``adan.kernels.cpu_native``): the eager path's bits for
every format, dtype and option, its build cache, and what happens where it cannot be built.
Its numbers against float64 are checked in test_compact.py (``KERNELS``)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adan import Adan
from adan.kernels import compact, cpu_native, routing
from adan.kernels.common import StepArgs
from adan.state.formats import BF16, FP32, INT8, PLAIN, storage_format
from adan.state.lifecycle import init_state

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(kernel, fmt, numel, dtype, grad_dtype, options, steps=3):
    """``steps`` steps of one tensor from fixed data: its parameter and state."""
    gen = torch.Generator().manual_seed(numel)
    p = torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)
    state = {**init_state(p, fmt), "seed": torch.tensor(2**40 + 17, dtype=torch.int64)}
    for k in range(steps):
        g = torch.randn(numel, generator=gen, dtype=torch.float64)
        g *= 10.0 ** (torch.rand(numel, generator=gen, dtype=torch.float64) * 8 - 5)
        if numel > 40:  # an outlier, a zero and a non-finite element in one block
            g[33], g[34] = 1e6, 0.0
            g[35] = (float("inf"), float("nan"), 1.0)[k % 3]
        factor = options.get("factor")
        args = StepArgs(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8,
                        weight_decay=0.02, fmt=fmt, no_prox=options.get("no_prox", False),
                        maximize=options.get("maximize", False),
                        stochastic_param=options.get("stochastic_param", False),
                        grad_factor=None if factor is None else torch.tensor(factor))
        kernel([p], [g.to(grad_dtype)], [state], args)
    return p, state


def assert_same_bits(a, b):
    """Parameters and every state tensor equal bit for bit (NaN where NaN)."""
    (pa, sa), (pb, sb) = a, b
    assert torch.equal(pa.view(-1).double().nan_to_num(7.0), pb.view(-1).double().nan_to_num(7.0))
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            other = sb[key]
            if value.is_floating_point():
                value, other = value.double().nan_to_num(7.0), other.double().nan_to_num(7.0)
            assert torch.equal(value, other), key


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["bf16", "int8", "fp32", "param"]), dtype=st.sampled_from(DTYPES),
       fp32_grad=st.booleans(),
       numel=st.sampled_from([0, 1, 31, 32, 33, 64, 65, 300]) | st.integers(100, 5000),
       no_prox=st.booleans(), maximize=st.booleans(),
       factor=st.sampled_from([None, 0.5, 3.0]), stochastic_param=st.booleans(),
       threads=st.sampled_from([1, 2, 3]))
def test_same_bits_as_the_eager_path(fmt, dtype, fp32_grad, numel, no_prox, maximize, factor,
                                     stochastic_param, threads):
    """Each format, parameter and gradient dtype, option and split over threads."""
    fmt = storage_format(torch.empty(0, dtype=dtype), fmt)
    grad_dtype = torch.float32 if fp32_grad else dtype
    options = dict(no_prox=no_prox, maximize=maximize, factor=factor,
                   stochastic_param=stochastic_param)
    eager = _run(compact.compact_adan, fmt, numel, dtype, grad_dtype, options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_native, "PARALLEL_MIN", 64)
        patch.setattr(torch, "get_num_threads", lambda: threads)
        fused = _run(cpu_native.cpu_native_adan, fmt, numel, dtype, grad_dtype, options)
    assert_same_bits(eager, fused)


@pytest.mark.parametrize("fmt", [INT8, BF16])
def test_large_tensor_over_threads(fmt):
    """Past PARALLEL_MIN, split over torch's threads, with a partial last 8-bit block."""
    numel = cpu_native.PARALLEL_MIN * 2 + 45
    assert_same_bits(_run(compact.compact_adan, fmt, numel, torch.float32, torch.float32, {}),
                     _run(cpu_native.cpu_native_adan, fmt, numel, torch.float32, torch.float32,
                          {}))


def test_every_format_is_built_for():
    """Float64 parameters and tensors that are not dense take the eager step, in the call."""
    for fmt in (PLAIN, FP32):
        a = _run(compact.compact_adan, fmt, 100, torch.float64, torch.float64, {})
        b = _run(cpu_native.cpu_native_adan, fmt, 100, torch.float64, torch.float64, {})
        assert_same_bits(a, b)
    base = torch.randn(20, 10)
    p, q = base[:, :5], base.clone()[:, :5]
    state = [{**init_state(p, BF16), "seed": torch.tensor(1)} for _ in range(2)]
    g = torch.randn(20, 5)
    args = StepArgs(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
                    fmt=BF16)
    compact.compact_adan([q], [g], [state[0]], args)
    cpu_native.cpu_native_adan([p], [g], [state[1]], args)
    assert torch.equal(p, q) and torch.equal(state[0]["exp_avg"], state[1]["exp_avg"])


def test_a_skip_decided_on_the_device_writes_nothing(monkeypatch):
    """A gradient factor read as a tensor (as under tracing): infinite, nothing is written."""
    monkeypatch.setattr(compact, "step_decision", lambda args: torch.tensor(False))
    p, state = _run(cpu_native.cpu_native_adan, INT8, 100, torch.float32, torch.float32, {},
                    steps=0)
    before = [p.clone()] + [t.clone() for t in state.values() if isinstance(t, torch.Tensor)]
    args = StepArgs(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
                    fmt=INT8, grad_factor=torch.tensor(float("inf")))
    cpu_native.cpu_native_adan([p], [torch.ones(100)], [state], args)
    after = [p] + [t for t in state.values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty build cache folder, and no variant loaded in this process."""
    monkeypatch.setenv("ADAN_CACHE_DIR", str(tmp_path))
    build = functools.cache(cpu_native.build.__wrapped__)
    monkeypatch.setattr(cpu_native, "build", build)
    return tmp_path


def test_a_built_variant_is_loaded_from_the_cache(fresh_cache, monkeypatch):
    variant = (0, 0, 0, INT8.triton_code)
    cpu_native.build(variant)
    assert len(list(fresh_cache.glob("adan_native_*.so"))) == 1
    cpu_native.build.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    fn = cpu_native.build(variant)  # loaded from the folder
    assert fn is not None
    cpu_native.build.cache_clear()
    monkeypatch.setattr(cpu_native, "_machine", functools.cache(lambda: "another machine"))
    with pytest.raises(AssertionError):  # the key changed with the machine: a new build
        cpu_native.build(variant)


@pytest.mark.parametrize("fmt", [INT8, BF16])
def test_without_openmp_the_kernel_starts_threads_of_its_own(fresh_cache, monkeypatch, fmt):
    """A compiler without OpenMP (Apple's clang) builds the kernel with threads of its own:
    the same bits."""
    monkeypatch.setattr(cpu_native, "OPENMP", ((),))
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    numel = 64 * 30 + 7
    assert_same_bits(_run(compact.compact_adan, fmt, numel, torch.float32, torch.float32, {}),
                     _run(cpu_native.cpu_native_adan, fmt, numel, torch.float32, torch.float32,
                          {}))
    library = next(fresh_cache.glob("adan_native_*.so")).read_bytes()
    assert b"GOMP_parallel" not in library


def test_a_failed_compile_names_the_compiler_error(fresh_cache, monkeypatch):
    monkeypatch.setattr(cpu_native, "SOURCE", fresh_cache / "broken.cpp")
    (fresh_cache / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="compiling broken.cpp failed"):
        cpu_native.build((0, 0, 0, INT8.triton_code))


def test_without_a_compiler_the_eager_path_steps_with_one_warning(monkeypatch, recwarn):
    monkeypatch.setattr(routing, "_builds", {})
    monkeypatch.setattr(routing, "BACKGROUND", False)
    monkeypatch.setattr(routing, "native_compiler_missing", lambda: "no compiler (test)")
    p = torch.zeros(1000, requires_grad=True)
    opt = Adan([p], lr=0.01, state_dtype="int8")
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    kernels = {c.kernel.__name__ for plan in opt._stepper.plans.values() for c in plan.calls}
    assert kernels == {"compact_adan"}
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler (test)" in messages[0]
    with pytest.raises(RuntimeError, match="fused=True cannot run here"):
        q = torch.zeros(10, requires_grad=True)
        q.grad = torch.ones_like(q)
        Adan([q], state_dtype="bf16", fused=True).step()


def test_a_failed_build_writes_nothing(monkeypatch):
    """The variants of every tensor are built before any is stepped: a build that fails for the
    second tensor leaves the first as it was."""
    build = cpu_native.build

    def fails_for_bf16(variant):
        if variant[0] == 1:
            raise RuntimeError("no compiler for this one (test)")
        return build(variant)

    monkeypatch.setattr(cpu_native, "build", fails_for_bf16)
    params = [torch.randn(100), torch.randn(100).bfloat16()]
    states = [{**init_state(p, INT8), "seed": torch.tensor(3)} for p in params]
    before = [p.clone() for p in params] + [s["step"].clone() for s in states]
    args = StepArgs(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
                    fmt=INT8)
    with pytest.raises(RuntimeError, match="no compiler"):
        cpu_native.cpu_native_adan(params, [torch.ones(100), torch.ones(100).bfloat16()],
                                   states, args)
    after = params + [s["step"] for s in states]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_a_parameter_moved_to_new_storage_is_stepped_there():
    """The calls a plan keeps hold the tensors' addresses: a parameter given new storage
    (``p.data = ...``, which changes no plan key) is found by its address and stepped where
    it now is, as the eager path steps it, and its old storage is left alone."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000))
        opt = Adan([p], lr=0.01, state_dtype="int8", fused=fused)
        gen = torch.Generator().manual_seed(1)
        for k in range(4):
            p.grad = torch.randn(1000, generator=gen)
            if k == 2:
                old = p.data
                p.data = p.data.clone()
            opt.step()
        runs.append((p.detach().clone(), old))
    (fused_p, fused_old), (eager_p, eager_old) = runs
    assert torch.equal(fused_old, eager_old) and torch.equal(fused_p, eager_p)


def test_a_read_only_cache_falls_back_to_a_private_temporary_folder(monkeypatch, tmp_path):
    """A cache folder that cannot be written sends the build to a folder of this user's in
    the temporary directory; one that others may write to is refused."""
    locked = tmp_path / "locked"
    monkeypatch.setenv("ADAN_CACHE_DIR", str(locked))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path))
    access = os.access
    monkeypatch.setattr(cpu_native.os, "access",
                        lambda path, mode: Path(path) != locked and access(path, mode))
    folder = cpu_native._folder()
    assert folder.parent == tmp_path and folder.name.startswith("adan-")
    assert not folder.stat().st_mode & 0o077
    folder.chmod(0o777)
    with pytest.raises(RuntimeError, match="no writable folder"):
        cpu_native._folder()


def test_every_float16_value_converts_as_torch_converts_it():
    """float16 moves by integer operations in the C++ kernel: every finite float16 value as a
    parameter and a gradient, with float16 state, steps to the eager path's bits (lr 0 keeps
    the parameters: each is read and written back)."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    values = values[torch.isfinite(values)]
    args = StepArgs(lr=0.0, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
                    fmt=PLAIN)
    results = []
    for kernel in (compact.compact_adan, cpu_native.cpu_native_adan):
        p, g = values.clone(), values.flip(0).clone()
        state = {**init_state(p, PLAIN), "seed": torch.tensor(1)}
        for _ in range(2):
            kernel([p], [g], [state], args)
        results.append((p, state))
    assert_same_bits(*results)
    assert torch.equal(results[1][0].view(torch.int16), values.view(torch.int16))


def test_a_call_without_tensors_does_nothing():
    """As every kernel: an empty part of a group is a call that steps nothing."""
    args = StepArgs(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
                    fmt=INT8)
    cpu_native.cpu_native_adan([], [], [], args, {})
