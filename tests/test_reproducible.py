"""Compact state rounds with noise that is a function of (seed, step, element) alone: every
path gives the same bits, a resumed run equals the uninterrupted one, and a step draws
nothing from torch's generator. Also: float64 exactness under ``capturable``, gradients of
another dtype with compact state, and clipping's skip decided on the device."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import allow_grad_dtype, step_beside_reference
from reference import ReferenceAdan, RefGroup

from adan import Adan
from adan.kernels import common

SHAPES = [(64, 33), (33,), (700,), (1,), (260, 256)]
PATHS = {"foreach": dict(foreach=True), "single": dict(foreach=False),
         "fused": dict(fused=True), "default": {}}
SETTINGS = dict(lr=3e-3, weight_decay=0.02, max_grad_norm=5.0)


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _train(opt: Adan, params: list[torch.Tensor], steps: range) -> None:
    for k in steps:
        for p, g in zip(params, _grads(k, params), strict=True):
            p.grad = g
        opt.step()


def _snapshot(opt: Adan, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [*params, *(v for p in params for v in opt.state[p].values()
                       if isinstance(v, torch.Tensor))]


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_every_cpu_path_rounds_alike(fmt):
    """foreach=True, foreach=False, fused=True and the default give the same bits (torch's
    test_foreach_matches_forloop for compact state), bf16 parameters rounded too."""
    results = {}
    for name, path in PATHS.items():
        torch.manual_seed(0)
        params = _params(torch.bfloat16)
        opt = Adan(params, state_dtype=fmt, stochastic_param_rounding=True, **SETTINGS, **path)
        _train(opt, params, range(4))
        results[name] = _snapshot(opt, params)
    first = results.pop("foreach")
    for name, tensors in results.items():
        for a, b in zip(first, tensors, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt", ["bf16", "int8", None])
@pytest.mark.parametrize("path", list(PATHS))
def test_resumed_run_equals_the_uninterrupted_one(fmt, path):
    """Save after step 3 (torch.save, torch.load with weights_only), load into a fresh
    optimizer, reseed torch as the uninterrupted run does, and end on the same bits."""
    torch.manual_seed(0)
    params = _params()
    opt = Adan(params, state_dtype=fmt, **SETTINGS, **PATHS[path])
    _train(opt, params, range(3))
    torch.manual_seed(7)
    _train(opt, params, range(3, 6))
    whole = _snapshot(opt, params)

    torch.manual_seed(0)
    params = _params()
    opt = Adan(params, state_dtype=fmt, **SETTINGS, **PATHS[path])
    _train(opt, params, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt = Adan(params, state_dtype=fmt, **SETTINGS, **PATHS[path])
    opt.load_state_dict(saved)
    torch.manual_seed(7)
    _train(opt, params, range(3, 6))
    for a, b in zip(whole, _snapshot(opt, params), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_a_step_leaves_torchs_generator_alone(fmt):
    """The seed is drawn once, when the compact state is created; later steps draw none."""
    params = _params()
    opt = Adan(params, state_dtype=fmt, **SETTINGS)
    _train(opt, params, range(1))
    seeds = [opt.state[p]["seed"].item() for p in params]
    assert len(set(seeds)) == len(seeds)  # each tensor has its own
    before = torch.random.get_rng_state()
    _train(opt, params, range(1, 3))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert [opt.state[p]["seed"].item() for p in params] == seeds
    opt.restart()
    assert [opt.state[p]["seed"].item() for p in params] == seeds


def test_plain_state_draws_no_seed():
    params = _params()
    opt = Adan(params, **SETTINGS)
    _train(opt, params, range(1))
    assert all("seed" not in opt.state[p] for p in params)


def test_a_bad_saved_seed_is_named():
    params = _params()
    opt = Adan(params, state_dtype="bf16")
    _train(opt, params, range(1))
    saved = opt.state_dict()
    saved["state"][0]["seed"] = torch.tensor(1.5)
    with pytest.raises(ValueError, match="parameter 0.*'seed'.*int64"):
        Adan(params, state_dtype="bf16").load_state_dict(saved)


@pytest.mark.parametrize("path", ["fused", "single", "foreach"])
def test_float64_capturable_is_float64_exact(path):
    """Step-dependent scalars stay float64 for float64 parameters with tensor scalars."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(40, 3))
    p = torch.tensor(p0)
    opt = Adan([p], lr=torch.tensor(0.01, dtype=torch.float64), weight_decay=0.02,
               capturable=True, **PATHS[path])
    ref = ReferenceAdan([RefGroup([p0], lr=0.01, weight_decay=0.02)])
    step_beside_reference(p, opt, ref, rng, 6)
    np.testing.assert_allclose(p.numpy(), ref.groups[0].params[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float32)])
def test_compact_state_takes_gradients_of_another_dtype(fmt, path, dtypes):
    """torch's ``grad_dtype``: bf16 gradients of float32 parameters, float32 ones of float64
    parameters, with compact state, computed in the parameter's precision."""
    p_dtype, g_dtype = dtypes
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(300, 4))
    p = torch.nn.Parameter(torch.tensor(p0, dtype=p_dtype))
    allow_grad_dtype(p)
    opt = Adan([p], lr=0.01, state_dtype=fmt, **PATHS[path])
    ref = ReferenceAdan([RefGroup([p0], lr=0.01)])
    for _ in range(3):
        g = torch.tensor(rng.normal(size=p0.shape), dtype=g_dtype)
        p.grad = g
        opt.step()
        ref.step([[g.double().numpy()]])
    moved = np.abs(ref.groups[0].params[0] - p0).max()
    np.testing.assert_allclose(p.detach().double().numpy(), ref.groups[0].params[0], rtol=0,
                               atol=0.06 * moved)


def _device_decision(monkeypatch):
    """Make the eager kernels decide the skip on the device, as on CUDA or meta."""
    def decide(args):
        return True if args.grad_factor is None else torch.isfinite(args.grad_factor)

    for module in ("single", "foreach", "compact"):
        monkeypatch.setattr(f"adan.kernels.{module}.step_decision", decide)


@pytest.mark.parametrize("path", ["foreach", "single"])
@pytest.mark.parametrize("fmt", [None, "bf16"])
def test_a_skip_decided_on_the_device_leaves_everything_and_a_step_matches(
        monkeypatch, path, fmt):
    """The device-side select keeps params, state and step counts on a non-finite norm, and
    changes nothing else: the run equals one whose factor is read on the host."""
    kwargs = dict(lr=0.01, max_grad_norm=1.0, state_dtype=fmt, **PATHS[path])
    runs = []
    for device_side in (False, True):
        if device_side:
            _device_decision(monkeypatch)
        torch.manual_seed(0)
        params = _params()
        opt = Adan(params, **kwargs)
        _train(opt, params, range(2))
        before = [t.clone() for t in _snapshot(opt, params)]
        for p, g in zip(params, _grads(9, params), strict=True):
            p.grad = g
        params[2].grad[5] = float("nan")
        opt.step()
        for a, b in zip(before, _snapshot(opt, params), strict=True):
            assert torch.equal(a, b)
        assert opt.skipped_steps == 1
        _train(opt, params, range(2, 4))
        runs.append(_snapshot(opt, params))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["foreach", "single", "default"])
def test_clipping_steps_on_meta_tensors(path):
    """torch's AdamW steps on meta tensors; so does Adan with clipping (nothing read)."""
    params = [torch.empty(5, 3, device="meta"), torch.empty(7, device="meta")]
    opt = Adan(params, lr=0.01, max_grad_norm=1.0, **PATHS[path])
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    assert all(opt.state[p]["exp_avg"].device.type == "meta" for p in params)


def test_step_decision_reads_a_cpu_factor_and_keeps_others_on_the_device():
    args = dict(lr=0.01, beta1=0.9, beta2=0.9, beta3=0.9, eps=1e-8, weight_decay=0.0)
    assert common.step_decision(common.StepArgs(**args)) is True
    nan = torch.tensor(float("nan"))
    assert common.step_decision(common.StepArgs(**args, grad_factor=nan)) is False
    meta = torch.ones((), device="meta")
    decision = common.step_decision(common.StepArgs(**args, grad_factor=meta))
    assert isinstance(decision, torch.Tensor) and decision.device.type == "meta"
