"""The first use of a fused kernel variant proves itself (adan.kernels.verify): it passes for
every format and option on the Triton kernel (through Triton's interpreter here, on the GPU
where there is one), and a planted wrong result, a planted fault or a write on a skipped step
routes the variant to the eager path with one warning, or raises under ``fused=True``, before
any user tensor is written."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_same_runs, route_cpu_to_triton

from adan import Adan
from adan.kernels import compact, cpu_compiled, foreach, routing, single, verify
from adan.state.formats import BF16, BUFFERS, FORMATS, FP32, INT8, PLAIN

triton = pytest.importorskip("triton")
from adan.kernels import triton as adan_triton  # noqa: E402  (needs Triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED,
                                                 reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")),
]
# (state_dtype, parameter dtype) of each format
FORMAT_CASES = [(None, torch.float32, PLAIN), ("fp32", torch.bfloat16, FP32),
                ("bf16", torch.float32, BF16), ("int8", torch.float32, INT8)]
ALL_OPTIONS = dict(no_prox=True, maximize=True, max_grad_norm=1e6,
                   stochastic_param_rounding=True)


@pytest.fixture(autouse=True)
def _fresh_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees each variant's first use."""
    monkeypatch.setattr(routing, "_builds", {})


def _default_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU groups take the Triton kernel by default (not ``fused=True``), as CUDA ones do: a
    failed check then falls back."""
    table = dict(routing.TABLE)
    for compact_state in (False, True):
        table[("cpu", compact_state, "default")] = "triton"
    monkeypatch.setattr(routing, "TABLE", table)


def _adan_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("adan:")]


def _run(dtype: torch.dtype, state_dtype: str | None, steps: int, device: str = "cpu",
         **options: Any) -> tuple[list[torch.Tensor], Adan]:
    """Two parameters (one over a tile, one small), stepped on fixed gradients, from the same
    global seed (which draws the rounding seeds)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).to(device=device, dtype=dtype)
              for n in (adan_triton.BLOCK + 9, 33)]
    opt = Adan(params, state_dtype=state_dtype, **{"lr": 0.01, "weight_decay": 0.1, **options})
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["defaults", "every-option"])
@pytest.mark.parametrize("state_dtype, dtype, fmt", FORMAT_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("device", DEVICES)
def test_the_check_passes_for_every_format_and_option(monkeypatch, device, state_dtype, dtype,
                                                      fmt, options):
    """fused=True (an error if the check failed) steps on the Triton kernel, once checked; a
    tensor learning rate too."""
    route_cpu_to_triton(monkeypatch)
    if options:
        options = dict(options, lr=torch.tensor(0.01, device=device))
    params, opt = _run(dtype, state_dtype, 2, device, **options)
    assert [b.error for b in routing._builds.values()] == [None]
    assert next(iter(routing._builds))[2] is fmt
    assert "triton_adan" in {c.kernel.__name__ for plan in opt._stepper.plans.values()
                             for c in plan.calls}


def _planted(monkeypatch: pytest.MonkeyPatch, plant: Callable[..., None]) -> list[int]:
    """Wrap the Triton kernel: ``plant(params, grads, states, args)`` after each call; the
    number of calls is returned (in a list that grows)."""
    calls: list[int] = []
    kernel = adan_triton.triton_adan

    def wrapped(params, grads, states, args, cache=None):
        calls.append(1)
        kernel(params, grads, states, args, cache)
        plant(params, grads, states, args)

    monkeypatch.setattr(adan_triton, "triton_adan", wrapped)
    return calls


def _wrong_param(params, grads, states, args) -> None:
    params[0].view(-1)[adan_triton.BLOCK + 2] += 0.5  # in the partial tile


def _wrong_second_moment(params, grads, states, args) -> None:
    n = states[1]["exp_avg_sq"].view(-1)
    if n.dtype == torch.uint8:  # an 8-bit code moved by more than a code gap
        n[1] = 255 if n[1] < 128 else 0
    else:
        n[1] *= 1.01


def _fault(params, grads, states, args) -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered (planted)")


def _writes_when_skipped(params, grads, states, args) -> None:
    if args.grad_factor is not None and not torch.isfinite(args.grad_factor):
        params[2].view(-1)[0] += 1


PLANTS = {"wrong-param": (_wrong_param, r"param of tensor 0 \(4101 elements\) at \[4098\]"),
          "wrong-second-moment": (_wrong_second_moment,
                                  r"exp_avg_sq of tensor 1 \(7 elements\) at \[1\]"),
          "fault": (_fault, "raised RuntimeError: CUDA error: an illegal memory access"),
          "skipped-step-written": (_writes_when_skipped,
                                   "parameter 2 written by a step skipped")}


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("state_dtype, dtype, fmt", [FORMAT_CASES[0], FORMAT_CASES[3]],
                         ids=lambda c: str(c))
def test_a_failed_check_falls_back_with_one_warning(monkeypatch, plant, state_dtype, dtype,
                                                    fmt):
    """One warning naming the variant, the device and what went wrong; the user's tensors
    step on the eager twin, the same bits as a run that never tried the kernel; the next
    step runs no check again."""
    planted, message = PLANTS[plant]
    _default_to_triton(monkeypatch)
    calls = _planted(monkeypatch, planted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, opt = _run(dtype, state_dtype, 1)
        checked = len(calls)
        for _ in range(2):
            opt.step()
    found = _adan_warnings(caught)
    assert len(found) == 1, found
    assert f"the self-check of the triton kernel (state {fmt}, parameters float32" in found[0]
    assert "on the CPU (Triton's interpreter)" in found[0]
    assert "using the eager implementation instead" in found[0]
    assert re.search(message, found[0]), found[0]
    assert 1 <= checked <= 3 and len(calls) == checked  # never for the user's tensors
    eager_params, eager_opt = _run(dtype, state_dtype, 1, fused=False)
    for _ in range(2):
        eager_opt.step()
    assert_same_runs(params, opt, eager_params, eager_opt)


@pytest.mark.parametrize("plant", ["wrong-param", "fault"])
def test_a_failed_check_under_fused_true_raises_and_writes_nothing(monkeypatch, plant):
    planted, message = PLANTS[plant]
    route_cpu_to_triton(monkeypatch)
    _planted(monkeypatch, planted)
    p = torch.randn(100)
    p.grad = torch.randn(100)
    before = (p.clone(), p.grad.clone())
    opt = Adan([p], lr=0.01, fused=True)
    with pytest.raises(RuntimeError, match="fused=True cannot run here: the self-check of the "
                       r"triton kernel \(state plain, .*\) on the CPU") as raised:
        opt.step()
    assert re.search(message, str(raised.value))
    assert torch.equal(p, before[0]) and torch.equal(p.grad, before[1])
    assert all(s["step"].item() == 0 for s in opt.state.values())


def test_the_cpu_compiled_kernel_is_checked_too(monkeypatch):
    """The same check for the CPU kernel: a planted wrong result falls back to foreach."""
    kernel = cpu_compiled.cpu_compiled_adan

    def wrong(params, grads, states, args, cache=None):
        kernel(params, grads, states, args, cache)
        params[0].view(-1)[7] -= 1

    monkeypatch.setattr(routing, "cpu_compiled_adan", wrong)
    p = torch.zeros(routing.FUSED_MIN_NUMEL)
    p.grad = torch.ones_like(p)
    opt = Adan([p], lr=0.01)
    with pytest.warns(RuntimeWarning, match=r"self-check of the cpu kernel \(state plain, "
                      r"parameters float32, .*\) on the CPU found param of tensor 0"):
        opt.step()
    assert torch.all(p == -0.01)


def test_first_reached_during_cuda_graph_capture_it_refuses_clearly(monkeypatch):
    """The check synchronises, so it is not run inside a capture: fused=True says why, and
    the next step outside the capture builds and checks the variant."""
    route_cpu_to_triton(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = torch.zeros(10)
    p.grad = torch.ones(10)
    opt = Adan([p], lr=0.01)
    with pytest.raises(RuntimeError, match="cannot run during CUDA graph capture.*warm-up"):
        opt.step()
    assert routing._builds == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()
    assert [b.error for b in routing._builds.values()] == [None]


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_error_bounds_a_stored_value(fmt, dtype):
    """The bound the check allows each format holds for its own store and load, rounded
    stochastically (the compact formats) over values spanning 12 orders and an outlier."""
    gen = torch.Generator().manual_seed(0)
    param = torch.zeros(1000, dtype=dtype)
    x = torch.randn(1000, generator=gen, dtype=torch.float64)
    x *= 10.0 ** (torch.rand(1000, generator=gen, dtype=torch.float64) * 12 - 8)
    x[300] = 1e4
    buffers = fmt.new_buffers(param)
    words = [torch.randint(0, 1 << 32, (1000,), generator=gen, dtype=torch.int64)
             for _ in range(fmt.noise_words)]
    for index, (key, signed) in enumerate(BUFFERS):
        value = x.abs() if not signed else x
        noise = fmt.noise(words, index) if words else None
        meta = buffers.get(key + "_exp")
        fmt.store(buffers[key], meta, value.float(), signed, noise, None)
        got = fmt.load(buffers[key], meta, param.shape, signed, torch.float64)
        assert torch.all((got - value).abs() <= fmt.store_error(value, param, signed)), key


def test_the_variant_reads_well():
    variant = verify.Variant("triton", torch.device("cpu"), INT8, torch.bfloat16,
                             torch.float32, dict(factor=True, maximize=False))
    assert str(variant) == ("triton kernel (state int8, parameters bfloat16, gradients "
                            "float32, factor=True, maximize=False)")
    assert variant.where() == "the CPU (Triton's interpreter)"


@pytest.mark.parametrize("kernel, fmt, dtype", [
    (compact.compact_adan, fmt, torch.float32) for fmt in (FP32, BF16, INT8)] + [
    (kernel, PLAIN, dtype) for kernel in (single.single_tensor_adan, foreach.multi_tensor_adan,
                                          compact.compact_adan)
    for dtype in (torch.float32, torch.float64)], ids=str)
def test_the_eager_kernels_pass_the_check(kernel, fmt, dtype):
    """The check holds the reference paths to the same bound (float64 parameters, whose host
    copies must not be the tensors themselves, included)."""
    options = dict(factor=True, maximize=True, no_prox=True, tensor_lr=True)
    variant = verify.Variant("eager", torch.device("cpu"), fmt, dtype, dtype, options)
    verify.self_check(kernel, variant, [adan_triton.BLOCK + 5, 7],
                      misaligned=[adan_triton.BLOCK + 300])
