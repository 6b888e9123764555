"""The CPU compiled kernel against the float64 reference, the foreach path, AMP, the fallback
rule, and Dynamo's recompile limit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import allow_grad_dtype, assert_matches_reference, run_pair
from reference import ReferenceAdan, RefGroup

from adan import Adan
from adan.kernels import compact, cpu_compiled, foreach, routing
from adan.kernels.common import StepArgs
from adan.kernels.compact import LR, scalar_vector
from adan.state.formats import PLAIN

F32 = dict(rtol=1e-5, atol=1e-6)
LAYOUTS = {"packed": {}, "per-tensor": dict(PACK_MAX=0, SERIAL_MAX=0)}


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    """Small tensors packed into one call, or one (multi-threaded) call per tensor."""
    for name, value in LAYOUTS[request.param].items():
        monkeypatch.setattr(cpu_compiled, name, value)
    return request.param


@pytest.mark.parametrize(
    "no_prox,max_grad_norm,maximize", list(itertools.product([False, True], [0.0, 3.0],
                                                             [False, True])))
def test_matches_reference(layout, no_prox, max_grad_norm, maximize):
    kwargs = dict(fused=True, no_prox=no_prox, max_grad_norm=max_grad_norm, maximize=maximize)
    tparams, ref, opt = run_pair(32, torch.float32, kwargs)
    assert_matches_reference(tparams, ref, opt, **F32)


def test_float64_params_compute_in_float64():
    tparams, ref, opt = run_pair(31, torch.float64, dict(fused=True, max_grad_norm=3.0))
    assert_matches_reference(tparams, ref, opt, rtol=1e-11, atol=1e-12)


def test_matches_foreach_path(layout):
    kwargs = dict(no_prox=True, max_grad_norm=3.0)
    fused_params, _, fused_opt = run_pair(32, torch.float32, dict(fused=True, **kwargs))
    eager_params, _, eager_opt = run_pair(32, torch.float32, dict(foreach=True, **kwargs))
    for a, b in zip(itertools.chain(*fused_params), itertools.chain(*eager_params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key, value in fused_opt.state[a].items():
            torch.testing.assert_close(value, eager_opt.state[b][key], rtol=1e-6, atol=1e-7)


def test_capturable_keeps_scalars_on_device():
    tparams, ref, opt = run_pair(32, torch.float32, dict(fused=True, capturable=True,
                                                          max_grad_norm=3.0))
    assert_matches_reference(tparams, ref, opt, **F32)


def test_complex_params_follow_their_real_view():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2))
    p = torch.tensor(p0, dtype=torch.complex64)
    opt = Adan([p], lr=0.05, weight_decay=0.1, fused=True)
    ref = ReferenceAdan([RefGroup([np.stack([p0.real, p0.imag], -1)], lr=0.05,
                                  weight_decay=0.1)])
    for _ in range(12):
        g = torch.tensor(rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2)),
                         dtype=torch.complex64)
        p.grad = g
        opt.step()
        ref.step([[torch.view_as_real(g).double().numpy()]])
    np.testing.assert_allclose(torch.view_as_real(p).numpy(), ref.groups[0].params[0], **F32)


def test_non_contiguous_params_are_written_back():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 5, generator=gen).t(), torch.randn(4, 3, generator=gen).t()]
    twins = [p.clone() for p in params]
    opts = Adan(params, fused=True), Adan(twins, foreach=True)
    for _ in range(4):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=gen).t().contiguous().t()
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    assert not params[0].is_contiguous()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_params_within_bf16_rounding():
    """State is kept in bf16 and math in fp32: the drift from float64 stays at bf16 scale."""
    tparams, ref, opt = run_pair(32, torch.bfloat16, dict(fused=True))
    for ps, rg in zip(tparams, ref.groups, strict=True):
        for p, rp in zip(ps, rg.params, strict=True):
            assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
            np.testing.assert_allclose(p.double().numpy(), rp, rtol=2e-2, atol=2e-2)


def test_no_recompilation_for_lr_steps_or_sizes(monkeypatch):
    """After the first step, lr changes, later steps and new sizes reuse the compiled kernel."""
    monkeypatch.setattr(cpu_compiled, "PACK_MAX", 64)
    params = [torch.randn(300), torch.randn(10, 7)]
    opt = Adan(params, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(3):
            opt.param_groups[0]["lr"] = 1e-3 * (k + 2)
            opt.step()
        other = [torch.randn(123), torch.randn(3, 5), torch.randn(77)]
        for p in other:
            p.grad = torch.randn_like(p)
        Adan(other, lr=0.5, betas=(0.9, 0.9, 0.9), fused=True).step()


@pytest.mark.parametrize("path", [dict(fused=True), dict(foreach=True), dict(foreach=False)],
                         ids=["fused", "foreach", "single"])
def test_grad_scaler_skips_inf_steps_and_unscales(path):
    rng = np.random.default_rng(3)
    params = [torch.tensor(rng.normal(size=s), dtype=torch.float32) for s in ((5, 3), (4,))]
    opt = Adan(params, lr=0.01, weight_decay=0.02, max_grad_norm=2.0, **path)
    ref = ReferenceAdan([RefGroup([p.double().numpy() for p in params], lr=0.01,
                                  weight_decay=0.02)], max_grad_norm=2.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(8):
        grads = [torch.tensor(rng.normal(size=p.shape), dtype=torch.float32) for p in params]
        scale = scaler.scale(torch.ones(())).item()  # what loss.backward() would scale by
        for p, g in zip(params, grads, strict=True):
            p.grad = g * scale
        if k in (0, 4):
            params[1].grad[0] = float("inf")
            before = [p.clone() for p in params]
            state = {id(p): {n: t.clone() for n, t in opt.state[p].items()
                             if isinstance(t, torch.Tensor)} for p in params if p in opt.state}
        scaler.step(opt)
        scaler.update()
        if k in (0, 4):  # skipped: params, step counts and moments as they were
            for p, b in zip(params, before, strict=True):
                assert torch.equal(p, b)
                for name, value in state.get(id(p), {}).items():
                    assert torch.equal(opt.state[p][name], value), name
                steps = opt.state[p].get("step", torch.zeros(()))  # GradScaler may not step
                assert steps.item() == (0 if k == 0 else 3)
        else:
            ref.step([[g.double().numpy() for g in grads]])
    for p, rp in zip(params, ref.groups[0].params, strict=True):
        np.testing.assert_allclose(p.double().numpy(), rp, **F32)
    assert opt.state[params[0]]["step"].item() == 6


def _no_backend(monkeypatch):
    monkeypatch.setattr(routing, "_builds", {})
    monkeypatch.setattr(routing, "cpu_compiler_missing", lambda: "no compiler (test)")


def test_default_falls_back_to_foreach_with_one_warning(monkeypatch, recwarn):
    _no_backend(monkeypatch)
    monkeypatch.setattr(routing, "FUSED_MIN_NUMEL", 1)
    tparams, ref, opt = run_pair(32, torch.float32, {})
    assert_matches_reference(tparams, ref, opt, **F32)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler (test)" in messages[0]


def test_fused_true_without_backend_raises_and_leaves_params(monkeypatch):
    _no_backend(monkeypatch)
    p = torch.ones(3)
    p.grad = torch.ones(3)
    opt = Adan([p], fused=True)
    with pytest.raises(RuntimeError, match="fused=True cannot run here: no compiler"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state.get(p)  # nothing created


def test_default_compiles_each_tensor_of_2_16_elements_or_more():
    """Each tensor's size decides (docs/benchmarks.md): from 2^16 elements the compiled kernel
    is faster, below it foreach, which steps 64 tensors of 2^15 2.4x faster; a group's large
    and small tensors each take theirs."""
    small, large = torch.zeros(10), torch.zeros(routing.FUSED_MIN_NUMEL)
    group = Adan([small]).param_groups[0]
    for p, kernel in ((small, foreach.multi_tensor_adan), (large, cpu_compiled.cpu_compiled_adan)):
        assert routing.route(group, PLAIN, [p], [p], [None]) == [(kernel, [0])]
    many = [torch.zeros(routing.FUSED_MIN_NUMEL // 2) for _ in range(64)]
    assert routing.route(group, PLAIN, many, many, [None] * 64) == [
        (foreach.multi_tensor_adan, list(range(64)))]
    mixed = [*many, torch.zeros(64 * routing.FUSED_MIN_NUMEL)]
    assert routing.route(group, PLAIN, mixed, mixed, [None] * 65) == [
        (cpu_compiled.cpu_compiled_adan, [64]), (foreach.multi_tensor_adan, list(range(64)))]


def test_recompile_limit_is_never_reached():
    """12 dtype/format/option combinations and view offsets in one process: each signature has
    its own compiled callable, so Dynamo's limit of 8 graphs per code object is never hit."""
    combos = [(dtype, grad_dtype, fmt, sr)
              for dtype, grad_dtype in ((torch.float32, torch.float32),
                                        (torch.float32, torch.bfloat16),
                                        (torch.bfloat16, torch.bfloat16),
                                        (torch.float16, torch.float16),
                                        (torch.float64, torch.float32),
                                        (torch.complex64, torch.complex64))
              for fmt, sr in ((None, False), ("bf16", True))]
    assert len(combos) == 12
    with torch._dynamo.config.patch(error_on_recompile=False, fail_on_recompile_limit_hit=True):
        for dtype, grad_dtype, fmt, sr in combos:
            storage = torch.randn(4 * 70_000).to(dtype)
            params = [storage[5:70_005].view(7, 10_000), storage[80_000:150_000]]
            opt = Adan(params, fused=True, state_dtype=fmt, stochastic_param_rounding=sr,
                       max_grad_norm=1.0)
            for _ in range(2):
                for p in params:
                    allow_grad_dtype(p)
                    p.grad = torch.randn(p.shape).to(grad_dtype)
                opt.step()
            assert all(torch.isfinite(torch.view_as_real(p) if p.is_complex() else p).all()
                       for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_matches_cpu_foreach():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1000, 300), (300,), (7,), (4096,)]
    cpu = [torch.randn(s, generator=gen) for s in shapes]
    gpu = [p.cuda() for p in cpu]
    opts = (Adan(cpu, foreach=True, max_grad_norm=1.0), Adan(gpu, fused=True, max_grad_norm=1.0))
    for _ in range(5):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for c, g, grad in zip(cpu, gpu, grads, strict=True):
            c.grad, g.grad = grad, grad.cuda()
        for opt in opts:
            opt.step()
    for c, g in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)


def test_the_recompile_limit_never_fails_a_step():
    """Past Dynamo's limit (forced to 1 here; a process that switches torch's default dtype, a
    global state Dynamo guards on, can reach the real one) the step still runs, eagerly, with
    one warning, and equals the eager path. bfloat16 parameters with bfloat16 state rounded to
    nearest: a signature no other test compiles."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    results = {}
    with config.patch(**{name: 1}), pytest.warns(RuntimeWarning, match="recompile limit"):
        for fused in (True, False):
            torch.manual_seed(0)
            p = torch.randn(1000).bfloat16()
            opt = Adan([p], lr=0.01, state_dtype="param",
                       **(dict(fused=True) if fused else dict(foreach=False)))
            for default in (torch.float32, torch.float64, torch.float32):
                before = torch.get_default_dtype()
                torch.set_default_dtype(default)
                try:
                    p.grad = torch.ones_like(p)
                    torch.manual_seed(1)
                    opt.step()
                finally:
                    torch.set_default_dtype(before)
            results[fused] = p
    # the compiled and eager steps may round a bfloat16 write differently (one ulp)
    torch.testing.assert_close(results[True], results[False], rtol=1e-2, atol=1e-3)


def test_shared_scalar_vectors_are_those_of_their_exact_values():
    """The scalar vectors kept between calls (one per step for every tensor released in its
    own hook) are looked up by the values' bits: lr 0.0 and -0.0 get their own."""
    args = StepArgs(lr=0.0, beta1=0.9, beta2=0.8, beta3=0.7, eps=1e-8, weight_decay=0.1)
    for lr in (0.0, -0.0, 0.0, 1e-3):
        shared = compact.shared_scalars(3.0, lr, args, torch.float32, torch.device("cpu"))
        assert torch.equal(shared, scalar_vector(3.0, lr, args, torch.float32,
                                                 torch.device("cpu")))
        assert math.copysign(1.0, float(shared[LR])) == math.copysign(1.0, lr)
