"""torch.optim's conventions, as torch's own optimizer tests expect them, on every path and
state format: state dicts from elsewhere, tensor lr shapes, load hooks, copies, devices, the
default dtype, and GradScaler's two ways of unscaling."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import step_beside_reference
from reference import ReferenceAdan, RefGroup

from adan import Adan

PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True),
         "fused": dict(fused=True), "default": {}}
FORMATS = [None, "bf16", "int8"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1))


def _steps(model, opt, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(16, 8, generator=gen, dtype=torch.float32)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        torch.manual_seed(1)  # the same stochastic rounding in every run
        opt.step()


def _equal_runs(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def _resume(path, fmt, edit):
    """Train 3 steps, save, edit the state dict, load it into a fresh optimizer, train 3 more;
    the result must equal 6 uninterrupted steps."""
    model, opt = _model(), None
    opt = Adan(model.parameters(), lr=0.01, state_dtype=fmt, **PATHS[path])
    _steps(model, opt, 3)
    saved = edit(copy.deepcopy(opt.state_dict()))
    resumed = _model()
    resumed.load_state_dict(model.state_dict())
    opt2 = Adan(resumed.parameters(), lr=0.01, state_dtype=fmt, **PATHS[path])
    opt2.load_state_dict(saved)
    _steps(model, opt, 3, seed=1)
    _steps(resumed, opt2, 3, seed=1)
    _equal_runs(model, resumed)
    return opt2


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("number", [int, float])
def test_step_saved_as_a_number(path, fmt, number):
    """Older checkpoints and other libraries keep ``step`` as a Python number."""
    def to_number(sd):
        for s in sd["state"].values():
            s["step"] = number(s["step"].item())
        return sd

    opt = _resume(path, fmt, to_number)
    assert all(isinstance(s["step"], torch.Tensor) for s in opt.state.values())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_extra_keys_in_a_parameters_state_are_kept(path, fmt):
    def add_key(sd):
        for s in sd["state"].values():
            s["note"] = "from another tool"
        return sd

    opt = _resume(path, fmt, add_key)
    assert all(s["note"] == "from another tool" for s in opt.state.values())


@pytest.mark.parametrize("path", [*PATHS, "capturable"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_of_one_element_is_the_scalar(path, shape):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(30,))
    p = torch.tensor(start)
    kwargs = dict(foreach=True, capturable=True) if path == "capturable" else PATHS[path]
    opt = Adan([p], lr=torch.full(shape, 0.02, dtype=torch.float64), **kwargs)
    assert opt.param_groups[0]["lr"].dim() == 0
    ref = ReferenceAdan([RefGroup([start], lr=0.02)])
    step_beside_reference(p, opt, ref, rng, 3)
    np.testing.assert_allclose(p.numpy(), ref.groups[0].params[0], rtol=1e-12, atol=1e-12)


def test_tensor_lr_of_several_elements_is_rejected():
    with pytest.raises(ValueError, match="lr"):
        Adan([torch.zeros(2)], lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_state_dict_hooks(fmt):
    """Pre-hooks see the whole dict (buffers included) and may replace it; post-hooks run once
    everything is loaded and converted to the group's format."""
    model = _model()
    opt = Adan(model.parameters(), lr=0.01)
    _steps(model, opt, 2)
    saved = opt.state_dict()
    target = Adan(_model().parameters(), lr=0.01, state_dtype=fmt)
    seen = {}

    def pre(optimizer, state_dict):
        seen["buffers"] = sorted(state_dict["state"][0])
        edited = copy.deepcopy(state_dict)
        edited["param_groups"][0]["lr"] = 0.123
        return edited

    def post(optimizer):
        state = next(iter(optimizer.state.values()))
        seen["lr"] = optimizer.param_groups[0]["lr"]
        seen["exp_avg"] = state["exp_avg"].dtype

    target.register_load_state_dict_pre_hook(pre)
    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(saved)
    assert seen["buffers"] == ["exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad", "step"]
    assert seen["lr"] == 0.123
    assert seen["exp_avg"] == {None: torch.float32, "bf16": torch.bfloat16,
                               "int8": torch.int8}[fmt]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_deepcopy_and_pickle_continue_identically(path, fmt):
    model = _model()
    opt = Adan(model.parameters(), lr=0.01, state_dtype=fmt, **PATHS[path])
    _steps(model, opt, 2)
    copies = []
    for clone in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        twin_model, twin_opt = clone((model, opt))
        copies.append((twin_model, twin_opt))
    _steps(model, opt, 2, seed=1)
    for twin_model, twin_opt in copies:
        _steps(twin_model, twin_opt, 2, seed=1)
        _equal_runs(model, twin_model)


@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_state_saved_on_one_device_loads_on_another(fmt):
    """CPU state into CUDA parameters and back; step counts follow their parameters."""
    model = _model()
    opt = Adan(model.parameters(), lr=0.01, state_dtype=fmt)
    _steps(model, opt, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    gpu = _model().cuda()
    gpu.load_state_dict(model.state_dict())
    gpu_opt = Adan(gpu.parameters(), lr=0.01, state_dtype=fmt)
    gpu_opt.load_state_dict(torch.load(buffer))
    for p in gpu.parameters():
        assert all(t.device == p.device for t in gpu_opt.state[p].values()
                   if isinstance(t, torch.Tensor))
    gpu_opt.zero_grad()
    gpu(torch.randn(4, 8, device="cuda")).sum().backward()
    gpu_opt.step()
    cpu_opt = Adan(_model().parameters(), lr=0.01, state_dtype=fmt)
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    assert all(t.device.type == "cpu" for s in cpu_opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_step_counts_follow_the_default_dtype(path, fmt):
    model = _model()  # float32 parameters: their kernels are the ones the other tests build
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = Adan(model.parameters(), lr=0.01, state_dtype=fmt, **PATHS[path])
        _steps(model, opt, 2)
    finally:
        torch.set_default_dtype(before)
    assert all(s["step"].dtype == torch.float64 and s["step"].item() == 2
               for s in opt.state.values())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", [None, "int8"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_with_and_without_unscale(path, fmt, unscale_first):
    """Only fused=True claims to unscale inside the step (as torch's fused optimizers do), so
    Lightning allows clipping under 16-mixed otherwise; both GradScaler flows must work."""
    results = []
    for use_scaler in (False, True):
        model = _model()
        opt = Adan(model.parameters(), lr=0.01, state_dtype=fmt, **PATHS[path])
        assert opt._step_supports_amp_scaling == (path == "fused")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(16, 8, generator=gen)).pow(2).mean()).backward()
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            torch.manual_seed(1)
            scaler.step(opt)
            scaler.update()
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("params", ["fp32", "bf16 params, fp32 state"])
def test_a_step_without_stochastic_rounding_leaves_torchs_generator_alone(path, params):
    """AdamW never draws from torch's generator; Adan draws only to round stochastically, so
    swapping one for the other leaves dropout masks and data sampling as they were."""
    model = _model()
    kwargs = dict(PATHS[path])
    if params != "fp32":
        model = model.to(torch.bfloat16)
        kwargs["state_dtype"] = "fp32"
    opt = Adan(model.parameters(), lr=1e-2, **kwargs)
    model(torch.randn(4, 8, dtype=next(model.parameters()).dtype)).sum().backward()
    before = torch.get_rng_state()
    opt.step()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("path", list(PATHS))
def test_stochastic_rounding_draws_its_seed_from_torchs_generator(path):
    """The other side: bf16 state draws (so ``torch.manual_seed`` reproduces a run)."""
    model = _model()
    opt = Adan(model.parameters(), lr=1e-2, state_dtype="bf16", **PATHS[path])
    model(torch.randn(4, 8)).sum().backward()
    before = torch.get_rng_state()
    opt.step()
    assert not torch.equal(torch.get_rng_state(), before)
