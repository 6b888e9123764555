"""The Triton kernel against the float64 reference, on CUDA and, without a GPU, on CPU tensors
through Triton's interpreter (CI). CUDA-only: no host synchronisation, CUDA graphs, a tensor
of more than 2**31 elements (a compiled training step on CUDA: tests/test_optimizer.py)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from codes import check_kernel_step, outlier_distances, spike_finals
from conftest import assert_matches_reference, route_cpu_to_triton, run_pair
from reference import ReferenceAdan, RefGroup

from adan import Adan
from adan.state.formats import BF16, FP32, INT8, PLAIN

triton = pytest.importorskip("triton")
from adan.kernels.triton import (  # noqa: E402  (needs Triton)
    BLOCK,
    FMT_BF16,
    FMT_FLOAT,
    FMT_INT8,
    codes,
    launch,
    triton_adan,
)

tl = triton.language

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETED
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED,
                                                 reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=needs_cuda),
]
F32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device to test on; every group takes the Triton kernel there (CPU tensors too)."""
    route_cpu_to_triton(monkeypatch)
    return request.param


def test_format_codes_are_the_state_formats_codes():
    """The kernel's FMT_* are the codes the state formats hand it (plain and float32 buffers
    are both plain floats)."""
    codes_of = [fmt.triton_code for fmt in (PLAIN, FP32, BF16, INT8)]
    assert codes_of == [FMT_FLOAT.value, FMT_FLOAT.value, FMT_BF16.value, FMT_INT8.value]


@pytest.mark.parametrize("no_prox,max_grad_norm,maximize",
                         list(itertools.product([False, True], [0.0, 3.0], [False, True])))
def test_matches_reference(device, no_prox, max_grad_norm, maximize):
    """Two groups, a late and an intermittent gradient, clipping, both weight decays."""
    kwargs = dict(no_prox=no_prox, max_grad_norm=max_grad_norm, maximize=maximize)
    tparams, ref, opt = run_pair(12, torch.float32, kwargs, device=device)
    assert_matches_reference(tparams, ref, opt, **F32)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("shape, no_prox, factor, maximize",
                         [((1000,), False, None, False), ((7, 300), True, 0.5, True)])
def test_compact_state_matches_reference_with_same_quantisation(device, fmt, shape, no_prox,
                                                                factor, maximize):
    check_kernel_step(triton_adan, fmt, device, shape, no_prox, factor, maximize,
                      steps=3)


def _edge_blocks(rng, shape):
    """Blocks of 256 that are all equal, all zero, one huge value among small ones, and a
    partial last block."""
    g = rng.normal(size=shape).ravel()
    g[:256] = 0.75
    g[256:512] = 0.0
    g[512:768] *= 1e-3
    g[600] = 1e4
    return g.reshape(shape)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_compact_state_block_edges(device, fmt):
    check_kernel_step(triton_adan, fmt, device, (1000,), False, None, False,
                      steps=3, gradient=_edge_blocks)


def _reference_run(device, shapes, steps, dtype=torch.float32, **kwargs):
    """Adan on tensors of ``shapes`` (two groups) and the float64 reference on the same."""
    rng = np.random.default_rng(0)
    init = [rng.normal(size=s) for s in shapes]
    params = [torch.tensor(x, dtype=dtype, device=device) for x in init]
    half = len(params) // 2
    opt = Adan([{"params": params[:half], "weight_decay": 0.1}, {"params": params[half:]}],
               lr=0.01, **kwargs)
    ref = ReferenceAdan([RefGroup([p.double().cpu().numpy() for p in params[:half]], lr=0.01,
                                  weight_decay=0.1),
                         RefGroup([p.double().cpu().numpy() for p in params[half:]], lr=0.01)],
                        max_grad_norm=kwargs.get("max_grad_norm", 0.0))
    for _ in range(steps):
        grads = [torch.tensor(rng.normal(size=s), dtype=dtype, device=device) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        ref.step([[g.double().cpu().numpy() for g in grads[:half]],
                  [g.double().cpu().numpy() for g in grads[half:]]])
    return params, [p for g in ref.groups for p in g.params], opt


def test_sizes_around_blocks_and_many_tensors(device):
    """Sizes 0, 1, odd, a block and one past it, 2.x blocks, and 24 more of mixed sizes."""
    rng = np.random.default_rng(1)
    shapes = [(0,), (1,), (7, 3), (BLOCK,), (BLOCK + 1,), (2 * BLOCK + 5,),
              *[(int(n),) for n in rng.integers(1, 300, size=24)]]
    params, want, opt = _reference_run(device, shapes, 3, max_grad_norm=5.0)
    for p, w in zip(params, want, strict=True):
        np.testing.assert_allclose(p.double().cpu().numpy(), w, **F32)
    assert all(s["step"].item() == 3 for s in opt.state.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params(device, dtype):
    """bf16 keeps bf16 state (rounded to nearest), fp16 float32 state; math in float32."""
    params, want, opt = _reference_run(device, [(300,), (33, 4)], 4, dtype=dtype)
    state_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    for p, w in zip(params, want, strict=True):
        assert opt.state[p]["exp_avg"].dtype == state_dtype
        np.testing.assert_allclose(p.double().cpu().numpy(), w, rtol=2e-2, atol=2e-2)


def test_float64_and_non_contiguous_tensors_take_an_exact_eager_path(device):
    rng = np.random.default_rng(2)
    p64 = torch.tensor(rng.normal(size=(5,)), device=device)
    strided = torch.tensor(rng.normal(size=(6, 4)), dtype=torch.float32, device=device).t()
    dense = torch.tensor(rng.normal(size=(9,)), dtype=torch.float32, device=device)
    params = [p64, strided, dense]
    opt = Adan(params, lr=0.01)
    ref = ReferenceAdan([RefGroup([p.double().cpu().numpy() for p in params], lr=0.01)])
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=p.dtype, device=device) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        ref.step([[g.double().cpu().numpy() for g in grads]])
    for p, w in zip(params, ref.groups[0].params, strict=True):
        tol = dict(rtol=1e-12, atol=1e-12) if p.dtype == torch.float64 else F32
        np.testing.assert_allclose(p.double().cpu().numpy(), w, **tol)


def _snapshot(opt, params):
    return ([p.clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for p in params])


def _assert_unchanged(opt, params, snapshot):
    for p, before, state in zip(params, *snapshot, strict=True):
        assert torch.equal(p, before)
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_overflow_and_non_finite_norm_skip_without_a_host_read(device, fmt):
    """GradScaler's found_inf and a NaN clipping norm skip the step inside the kernel."""
    params = [torch.randn(300, device=device), torch.randn(5, device=device)]
    opt = Adan(params, lr=0.01, max_grad_norm=1.0, state_dtype=fmt)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = _snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=device), torch.ones((),
                                                                                device=device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    _assert_unchanged(opt, params, snapshot)
    assert opt.skipped_steps == 0
    params[1].grad[2] = float("nan")
    opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert opt.skipped_steps == 1
    params[1].grad[2] = 1.0
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)


@pytest.mark.parametrize("shape", [(), (1,)])
def test_tensor_lr_on_the_device(device, shape):
    """A 0-d or 1-element tensor lr, changed in place by a scheduler, is read by the kernel."""
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=(40,))
    p = torch.tensor(p0, dtype=torch.float32, device=device)
    lr = torch.full(shape, 0.01, device=device)
    opt = Adan([p], lr=lr, weight_decay=0.02, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    group = RefGroup([p0], weight_decay=0.02)
    ref = ReferenceAdan([group])
    for _ in range(4):
        g = rng.normal(size=(40,))
        group.lr = float(opt.param_groups[0]["lr"])
        p.grad = torch.tensor(g, dtype=torch.float32, device=device)
        opt.step()
        sched.step()
        ref.step([[g]])
    np.testing.assert_allclose(p.double().cpu().numpy(), group.params[0], **F32)


def test_stochastic_param_rounding_keeps_small_bf16_updates(device):
    """lr*|u| = 1e-4 per step is far below bf16's spacing at 1 (2**-8 below, 2**-7 above)."""
    results = {}
    for sr in (False, True):
        p = torch.ones(2048, dtype=torch.bfloat16, device=device)
        opt = Adan([p], lr=1e-4, state_dtype="fp32", stochastic_param_rounding=sr)
        for _ in range(60):
            p.grad = torch.ones_like(p)
            opt.step()
        results[sr] = p.double().mean().item()
    assert results[False] == 1.0  # every update lost
    assert abs(results[True] - (1 - 60 * 1e-4)) < 1e-3


def test_compact_state_is_reproducible_under_manual_seed(device):
    """Stochastic rounding draws from Philox seeded by torch's generator."""
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(600, generator=gen).to(device)
        opt = Adan([p], lr=0.01, state_dtype="int8", stochastic_param_rounding=True)
        for _ in range(3):
            p.grad = torch.randn(600, generator=gen).to(device)
            opt.step()
        runs.append((p, opt.state[p]))
    (p1, s1), (p2, s2), (_, s3) = runs
    assert torch.equal(p1, p2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k != "int8_codes")
    assert not torch.equal(s1["exp_avg_sq"], s3["exp_avg_sq"])


@pytest.mark.parametrize("count, scale", [(4, 1e6)])
def test_int8_outliers_move_no_neighbour_further(device, count, scale):
    """As tests/test_bad_input.py on the CPU paths: 4 elements of one 32-block at 1e6 times
    the others' gradients for 50 steps; no other element moves more than 1.5x as far as with
    float32 state, the outliers about as with float32 state, no nonzero n decodes to zero."""
    got = outlier_distances(lambda ps, fmt: Adan(ps, lr=0.01, state_dtype=fmt), device, count,
                            scale)
    assert got["ratio"][~got["outlier"]].max() <= 1.5
    assert np.all((got["ratio"][got["outlier"]] >= 0.7) & (got["ratio"][got["outlier"]] <= 1.5))


@pytest.mark.parametrize("spike", [float("inf"), float("nan")])
def test_int8_non_finite_gradient_damages_no_neighbour(device, spike):
    finals = spike_finals(lambda ps, fmt: Adan(ps, lr=0.01, state_dtype=fmt), device, spike)
    torch.testing.assert_close(finals["int8"][300], finals["fp32"][300], equal_nan=True)
    rest = torch.ones(512, dtype=torch.bool)
    rest[300] = False
    moved = finals["fp32"][rest].abs().max()
    assert (finals["int8"][rest] - finals["fp32"][rest]).abs().max() < 0.1 * moved


# --- CUDA only ----------------------------------------------------------------------------


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@needs_cuda
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, None), (torch.bfloat16, None),
                                       (torch.float32, "bf16"), (torch.float32, "int8"),
                                       (torch.bfloat16, "fp32")])
def test_no_host_synchronisation_in_any_option_combination(dtype, fmt):
    x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 4, device="cuda")
    options = itertools.product([False, True], repeat=5)
    for no_prox, maximize, clip, tensor_lr, scaler in options:
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4)).to(
            "cuda", dtype)
        lr = torch.tensor(0.01, device="cuda") if tensor_lr else 0.01
        opt = Adan(model.parameters(), lr=lr, no_prox=no_prox, maximize=maximize,
                   max_grad_norm=1.0 if clip else 0.0, state_dtype=fmt, capturable=tensor_lr)
        _train_step(model, opt, x.to(dtype), y.to(dtype))  # state and kernels built
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
            if scaler:
                opt.grad_scale = torch.tensor(2.0, device="cuda")
                opt.found_inf = torch.zeros((), device="cuda")
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            opt.__dict__.pop("grad_scale", None)
            opt.__dict__.pop("found_inf", None)


@needs_cuda
@pytest.mark.parametrize("fmt", [None, "bf16", "int8"])
@pytest.mark.parametrize("grads_in_capture", [False, True])
def test_cuda_graph_capture_equals_eager(fmt, grads_in_capture):
    """A whole training step, opt.step() included, captured once and replayed, with the lr
    scheduler writing a tensor lr between replays. With ``grads_in_capture`` the gradients
    are set to None before capture, as torch's whole-network recipe does, so they are
    allocated (and the kernel's addresses sent) inside the capture. Compact state rounds
    with fresh noise at every replay (from the seed and the device's step count), so replay
    equals eager."""
    torch.manual_seed(0)
    data = [(torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda"))
            for _ in range(6)]
    results = []
    for graphed in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).cuda()
        opt = Adan(model.parameters(), lr=torch.tensor(0.01, device="cuda"), capturable=True,
                   max_grad_norm=1.0, state_dtype=fmt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        sx, sy = data[0][0].clone(), data[0][1].clone()
        if graphed:  # one real step on a side stream; the capture itself runs nothing
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                _train_step(model, opt, sx, sy)
            torch.cuda.current_stream().wait_stream(stream)
            if grads_in_capture:
                opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _train_step(model, opt, sx, sy)
        else:
            _train_step(model, opt, sx, sy)
        sched.step()
        for x, y in data[1:]:
            sx.copy_(x)
            sy.copy_(y)
            graph.replay() if graphed else _train_step(model, opt, sx, sy)
            sched.step()
        torch.cuda.synchronize()
        results.append([t.detach().clone() for p in model.parameters()
                        for t in (p, *opt.state[p].values()) if isinstance(t, torch.Tensor)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_a_tensor_of_more_than_2_31_elements():
    """64-bit offsets: the last elements of a (2**31 + 5)-element bf16 tensor are updated."""
    n = 2**31 + 5
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    p.grad = torch.ones_like(p)
    p.grad[-3:] = -2.0
    Adan([p], lr=2.0**-6).step()  # step 1 with d = 0: u = sign(g), so p = -lr * sign(g)
    assert p[0].item() == -(2.0**-6) and p[2**31 + 1].item() == -(2.0**-6)
    assert p[-1].item() == 2.0**-6


# --- the same bits as the CPU paths, and a table that follows its tensors -------------------


@pytest.mark.parametrize("fmt", ["bf16", "int8", None])
def test_same_bits_as_the_cpu_compact_path(device, fmt):
    """The kernel computes what adan.kernels.compact computes, rounding noise included (a
    function of seed, step and element alone), with clipping: on CUDA with a norm below
    the limit (a factor of exactly 1), since torch sums the norm in another order there."""
    _assert_same_bits_as_the_cpu_compact_path(device, fmt)


def _assert_same_bits_as_the_cpu_compact_path(device, fmt):
    results = []
    for kernel in ("triton", "cpu"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        shapes = [(BLOCK + 300,), (7, 33), (1,)]
        params = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
        kwargs = dict(lr=0.01, weight_decay=0.02, state_dtype=fmt,
                      max_grad_norm=5.0 if device == "cpu" else 1e4,
                      stochastic_param_rounding=True)
        if kernel == "triton":
            params = [p.to(device) for p in params]
            opt = Adan(params, **kwargs)
        else:
            opt = Adan(params, foreach=False, **kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)
            opt.step()
        results.append([t.cpu() for p in params for t in (p, *opt.state[p].values())
                        if isinstance(t, torch.Tensor)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@triton.jit
def _mx_kernel(x_ptr, noise_ptr, codes_ptr, scales_ptr, out_ptr, SIGNED: tl.constexpr,
               NOISE: tl.constexpr, COMPILED: tl.constexpr):
    # (annotated `tl.constexpr`, which Triton 3.6 recognises in a string annotation)
    rows = tl.program_id(0) * 8 + tl.arange(0, 8)
    offs = rows[:, None] * 32 + tl.arange(0, 32)[None, :]
    k, s = codes.mx_encode(tl.load(x_ptr + offs), tl.load(noise_ptr + offs), SIGNED, NOISE,
                           COMPILED)
    if SIGNED:
        k = k.to(tl.int8)
    else:
        k = k.to(tl.uint8)
    tl.store(codes_ptr + offs, k)
    tl.store(scales_ptr + rows, s)
    tl.store(out_ptr + offs, codes.mx_decode(k, s, SIGNED, COMPILED))


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_those_of_the_cpu_at_every_boundary(device, signed):
    """The kernel's 8-bit encoder and decoder give adan.numeric.codes' bits: at every code
    value and one float32 step either side of it, across the subnormal codes, with the
    smallest, a random and the largest noise and without noise, in blocks of every scale
    (tiny ones near 1e-39 and huge ones), and blocks with zeros, infinities and NaNs."""
    from adan.numeric.codes import mx_code, mx_decode, mx_encode
    gen = torch.Generator().manual_seed(0)
    levels = torch.arange(256).to(torch.uint8)
    levels = levels.view(torch.int8) if signed else levels
    scales = torch.full((levels.numel() // 32 + 1,), 128, dtype=torch.uint8)
    c = mx_decode(levels, scales, levels.shape, signed=signed)
    c = c[torch.isfinite(c)]
    t = torch.cat([c, torch.nextafter(c, torch.zeros(())), torch.nextafter(c, c * 2 + 1)])
    t = t[torch.randperm(t.numel(), generator=gen)]
    blocks = [t, t * 2.0**-140, t * 2.0**120, torch.randn(256, generator=gen) * 1e-39,
              torch.tensor([0.0] * 31 + [1e-45]), torch.zeros(32),
              torch.tensor([float("inf"), float("nan"), -float("inf")] * 10 + [1.0, -0.0])]
    x = torch.cat([torch.cat([b, torch.zeros(-b.numel() % 32)]) for b in blocks])
    x = torch.cat([x, torch.zeros(-x.numel() % 256)])
    if not signed:
        x = x.abs()
    code = mx_code(signed)
    draws = (torch.zeros_like(x, dtype=torch.int32), torch.full_like(x, 1023, dtype=torch.int32),
             torch.randint(0, 1024, x.shape, generator=gen, dtype=torch.int32))
    for noise in [code.noise(r) for r in draws] + ([None] if signed else []):
        want_codes, want_scales = mx_encode(x, signed, noise)
        want = mx_decode(want_codes, want_scales, x.shape, signed=signed)
        got_codes = torch.empty(x.shape, dtype=want_codes.dtype, device=device)
        got_scales = torch.empty(x.numel() // 32, dtype=torch.int32, device=device)
        out = torch.empty_like(x, device=device)
        _mx_kernel[(x.numel() // 256,)](
            x.to(device), (torch.zeros_like(x, dtype=torch.int32) if noise is None else noise
                           ).to(device), got_codes, got_scales, out, SIGNED=signed,
            NOISE=noise is not None, COMPILED=launch.COMPILED)
        assert torch.equal(got_codes.cpu(), want_codes)
        assert torch.equal(got_scales.cpu(), want_scales[:-1].to(torch.int32))
        assert torch.equal(out.cpu().nan_to_num(), want.nan_to_num())
        assert torch.equal(out.cpu().isnan(), want.isnan())
        assert torch.equal(out.cpu().signbit(), want.signbit())


def test_replaced_state_tensors_are_followed(device):
    """A state tensor replaced between steps (some libraries assign new ones) is the one the
    kernel updates: the plan is renewed, never writing the old, orphaned tensor."""
    p = torch.zeros(300, device=device)
    opt = Adan([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    old = opt.state[p]["step"]
    opt.state[p]["step"] = torch.full_like(old, 10.0)
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert old.item() == 2.0 and opt.state[p]["step"].item() == 11.0


def test_data_replaced_by_another_shape_is_refused(device):
    """A parameter whose .data takes another shape keeps its gradient and state: the kernel
    refuses them instead of reading and writing past their ends."""
    p = torch.zeros(300, device=device)
    opt = Adan([p], lr=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    p.data = torch.zeros(600, device=device)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()


def test_a_steady_loop_builds_its_table_once(device, monkeypatch):
    """zero_grad(set_to_none=True) gives new gradients at every step: only their addresses
    travel, the table is built once."""
    builds = []
    build = launch._build
    monkeypatch.setattr(launch, "_build", lambda *a: builds.append(1) or build(*a))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)).to(device)
    opt = Adan(model.parameters(), lr=0.01)
    x = torch.randn(4, 8, device=device)
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    assert len(builds) == 1


def test_misaligned_tensors_launch_apart(device):
    """A gradient that is a view at an odd offset into a flat buffer (DDP's bucket views)
    goes to a launch of its own; the aligned ones keep 16-byte accesses."""
    params = [torch.zeros(BLOCK + 4, device=device), torch.zeros(40, device=device)]
    flat = torch.ones(BLOCK + 4 + 41, device=device)
    opt = Adan(params, lr=0.01)
    params[0].grad = flat[: BLOCK + 4]
    params[1].grad = flat[BLOCK + 5:]  # 4 * (BLOCK + 5) bytes in: not 16-byte aligned
    opt.step()
    plan = opt._stepper.plans[(0, None)].calls[0].cache["plan"]
    assert sorted(part.signature[-1] for part in plan.parts) == [False, True]
    assert all(torch.all(p == -0.01) for p in params)  # step 1: p = -lr * sign(g)


def test_numpy_scalar_hyperparameters(device):
    """NumPy scalars (and integers) are normalised to Python floats where they are checked;
    Triton refuses NumPy scalars as kernel arguments."""
    p = torch.zeros(50, device=device)
    opt = Adan([p], lr=np.float32(0.01), eps=np.float32(1e-8), weight_decay=np.float64(0.1),
               betas=(np.float32(0.98), 0.92, 0.99), max_grad_norm=np.int64(0))
    group = opt.param_groups[0]
    assert all(type(group[k]) is float for k in ("lr", "eps", "weight_decay", "max_grad_norm"))
    assert all(type(b) is float for b in group["betas"])
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(p, torch.full_like(p, -0.01 / 1.001))
