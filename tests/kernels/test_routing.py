"""Which kernel each tensor gets: the routing table of adan.kernels.routing, with torch's
meaning of the flags (fused=False never fused, foreach=True the multi-tensor eager path)."""

from __future__ import annotations

import pytest
import torch

from adan import Adan
from adan.kernels import compact, cpu_compiled, cpu_native, foreach, routing, single
from adan.state.formats import BF16, FORMATS, FP32, INT8, PLAIN

FUSED = {cpu_compiled.cpu_compiled_adan, cpu_native.cpu_native_adan}
COMPACT_FORMATS = [FP32, BF16, INT8]


def _route(fmt=PLAIN, params=None, **options):
    params = params or [torch.zeros(10)]
    group = Adan(params, **options).param_groups[0]
    return routing.route(group, fmt, params, params, [None] * len(params))


@pytest.mark.parametrize("options, fmt, kernel", [
    ({}, PLAIN, foreach.multi_tensor_adan),
    ({}, INT8, cpu_native.cpu_native_adan),
    ({}, BF16, cpu_native.cpu_native_adan),
    ({}, FP32, cpu_native.cpu_native_adan),
    ({"foreach": False}, PLAIN, single.single_tensor_adan),
    ({"foreach": False}, INT8, compact.compact_adan),
    ({"foreach": True}, PLAIN, foreach.multi_tensor_adan),
    ({"foreach": True}, BF16, compact.compact_adan),
    ({"fused": False}, PLAIN, foreach.multi_tensor_adan),
    ({"fused": False}, INT8, compact.compact_adan),
    ({"fused": True}, PLAIN, cpu_compiled.cpu_compiled_adan),
    ({"fused": True}, INT8, cpu_native.cpu_native_adan),
    ({"stochastic_param_rounding": True}, PLAIN, cpu_native.cpu_native_adan),
    ({"differentiable": True}, PLAIN, single.single_tensor_adan),
    ({"stochastic_param_rounding": True, "foreach": False}, PLAIN, compact.compact_adan),
])
def test_cpu_routes(options, fmt, kernel):
    assert _route(fmt, **options) == [(kernel, [0])]


@pytest.mark.parametrize("options", [{"fused": False}, {"foreach": True}, {"foreach": False},
                                     {"fused": False, "foreach": True}], ids=str)
@pytest.mark.parametrize("fmt", [PLAIN, *COMPACT_FORMATS], ids=repr)
def test_eager_choices_never_route_to_a_fused_kernel(options, fmt):
    """Large tensors, where the default would compile, of every format."""
    params = [torch.zeros(1 << 17), torch.zeros(5)]
    kernels = {kernel for kernel, _ in _route(fmt, params, **options)}
    assert not kernels & FUSED


@pytest.mark.parametrize("options", [{"fused": False}, {"foreach": True}, {"foreach": False}],
                         ids=str)
@pytest.mark.parametrize("state_dtype", [None, "fp32", "bf16", "int8"])
def test_eager_choices_run_no_compiled_code(options, state_dtype, monkeypatch):
    """Through the optimizer: a step of a 2^17-element parameter never calls a compiled
    kernel (the compiler is made to fail loudly if it is reached)."""
    def no_compile(*args, **kwargs):
        raise AssertionError("a compiled kernel was built")

    monkeypatch.setattr(cpu_compiled, "_compiled", no_compile)
    monkeypatch.setattr(routing, "_builds", {})
    p = torch.zeros(1 << 17, dtype=torch.bfloat16 if state_dtype == "fp32" else torch.float32)
    p.grad = torch.ones_like(p)
    opt = Adan([p], lr=0.01, state_dtype=state_dtype, **options)
    opt.step()
    opt.step()
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("compact_state", [False, True])
def test_cuda_rules(compact_state):
    """The same rules for CUDA tensors, read from the table (no GPU needed): the default and
    fused=True take Triton, every eager choice an eager kernel."""
    assert routing.kernel_name("cuda", compact_state, "default") == "triton"
    assert routing.kernel_name("cuda", compact_state, "fused") == "triton"
    eager = "compact" if compact_state else "foreach"
    assert routing.kernel_name("cuda", compact_state, "eager") == eager
    assert routing.kernel_name("cuda", compact_state, "foreach") == eager
    assert routing.kernel_name("cuda", compact_state, "single") == (
        "compact" if compact_state else "single")
    assert routing.kernel_name("mps", compact_state, "fused") is None


@pytest.mark.parametrize("flags, how", [
    ({"fused": None, "foreach": None}, "default"), ({"fused": True, "foreach": None}, "fused"),
    ({"fused": False, "foreach": None}, "eager"), ({"fused": None, "foreach": True}, "foreach"),
    ({"fused": False, "foreach": True}, "foreach"), ({"fused": None, "foreach": False}, "single"),
    ({"fused": False, "foreach": False}, "single")])
def test_choice_reads_the_flags_as_torch(flags, how):
    assert routing.choice(flags) == how


def test_every_format_has_a_row_for_every_choice():
    for fmt in FORMATS.values():
        for how in ("default", "eager", "foreach", "single"):
            assert routing.kernel_name("cpu", fmt is not PLAIN, how) is not None


def test_tensor_subclasses_take_the_single_tensor_path():
    class Tagged(torch.Tensor):
        pass

    p = torch.zeros(routing.FUSED_MIN_NUMEL).as_subclass(Tagged)
    assert _route(params=[p]) == [(single.single_tensor_adan, [0])]


def test_fused_true_on_another_device_type_is_a_clear_error():
    with pytest.raises(RuntimeError,
                       match="fused=True cannot run here: .*CPU and CUDA.*not for meta"):
        _route(params=[torch.zeros(10, device="meta")], fused=True)


def test_triton_takes_what_it_supports_and_routes_the_rest(monkeypatch):
    """float64 and non-contiguous tensors go to the fallback in the same step."""
    pytest.importorskip("triton")
    from conftest import route_cpu_to_triton

    from adan.kernels.triton import triton_adan

    route_cpu_to_triton(monkeypatch)
    params = [torch.zeros(8), torch.zeros(8, dtype=torch.float64), torch.zeros(4, 3).t(),
              torch.zeros(5, dtype=torch.bfloat16)]
    group = dict(no_prox=False, maximize=False, max_grad_norm=0.0, lr=0.01, fused=True,
                 foreach=None, differentiable=False, stochastic_param_rounding=False)
    got = routing.route(group, PLAIN, params, params, [None] * 4)
    assert got == [(triton_adan, [0, 3]), (foreach.multi_tensor_adan, [1, 2])]
