"""Which kernel each param group gets: the routing table of adan.kernels.select."""

from __future__ import annotations

import pytest
import torch

from adan import Adan
from adan.kernels import compact, cpu_compiled, foreach, select, single


def _route(fmt="plain", params=None, **options):
    params = params or [torch.zeros(10)]
    group = Adan(params, **options).param_groups[0]
    return select.route(group, fmt, params, params, [None] * len(params))


@pytest.mark.parametrize("options, fmt, kernel", [
    ({}, "plain", foreach.multi_tensor_adan),
    ({}, "int8", cpu_compiled.cpu_compiled_adan),
    ({}, "bf16", cpu_compiled.cpu_compiled_adan),
    ({"foreach": False}, "plain", single.single_tensor_adan),
    ({"foreach": False}, "int8", compact.compact_adan),
    ({"foreach": True}, "plain", foreach.multi_tensor_adan),
    ({"foreach": True}, "bf16", cpu_compiled.cpu_compiled_adan),
    ({"fused": True}, "plain", cpu_compiled.cpu_compiled_adan),
    ({"differentiable": True}, "plain", single.single_tensor_adan),
    ({"stochastic_param_rounding": True, "foreach": False}, "plain", compact.compact_adan),
])
def test_cpu_routes(options, fmt, kernel):
    assert _route(fmt, **options) == [(kernel, [0])]


def test_tensor_subclasses_take_the_single_tensor_path():
    class Tagged(torch.Tensor):
        pass

    p = torch.zeros(select.FUSED_MIN_MEAN_NUMEL).as_subclass(Tagged)
    assert _route(params=[p]) == [(single.single_tensor_adan, [0])]


def test_fused_true_on_another_device_type_is_a_clear_error():
    with pytest.raises(RuntimeError,
                       match="fused=True cannot run here: .*CPU and CUDA.*not for meta"):
        _route(params=[torch.zeros(10, device="meta")], fused=True)


def test_triton_takes_what_it_supports_and_routes_the_rest():
    """float64 and non-contiguous tensors go to the fallback in the same step."""
    pytest.importorskip("triton")
    from adan.kernels import cuda_triton

    params = [torch.zeros(8), torch.zeros(8, dtype=torch.float64), torch.zeros(4, 3).t(),
              torch.zeros(5, dtype=torch.bfloat16)]
    group = dict(no_prox=False, maximize=False, max_grad_norm=0.0, lr=0.01,
                 stochastic_param_rounding=False)
    got = select._fused("triton", foreach.multi_tensor_adan, True, params, params,
                        [None] * 4, "plain", group)
    assert got == [(cuda_triton.triton_adan, [0, 3]), (foreach.multi_tensor_adan, [1, 2])]
