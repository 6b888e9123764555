"""The Triton kernel's host side on CUDA: launches on the tensors' device, state on another
device refused, CUDA graphs (the address arrays a capture copies from, what a replay may still
read after a re-plan, the skipped-step count, a float lr fixed at capture), and part plans
bounded. Without a GPU, CPU tensors run through Triton's interpreter under a simulated
capture (``launch.capturing`` says yes; a replay repeats the copies the capture made);
CUDA-only tests run the real thing (two devices: skipped unless there are two GPUs)."""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
import weakref

import numpy as np
import pytest
import torch
from conftest import route_cpu_to_triton
from reference import ReferenceAdan, RefGroup

from adan import Adan, stepping

triton = pytest.importorskip("triton")
from adan.kernels.triton import launch  # noqa: E402  (needs Triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETED
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2,
                                    reason="needs two CUDA devices")
F32 = dict(rtol=1e-5, atol=1e-6)


class SimulatedCapture:
    """``launch.capturing`` under the test's control, and the copies each capture made into
    device arrays, which :meth:`replay` repeats as a graph's replay would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        monkeypatch.setattr(launch, "capturing", lambda device: self.on)
        capture = launch._Staging._capture

        def recording(staging, values):
            out = capture(staging, values)
            self.copies.append((out, out.clone()))
            return out

        monkeypatch.setattr(launch._Staging, "_capture", recording)

    @contextlib.contextmanager
    def __call__(self):
        self.on = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a float lr's, tested below
                yield
        finally:
            self.on = False

    def replay(self) -> None:
        """What a replay writes into the address arrays (its kernels are not run here)."""
        for array, values in self.copies:
            array.copy_(values)


@pytest.fixture
def capture(monkeypatch):
    route_cpu_to_triton(monkeypatch)
    return SimulatedCapture(monkeypatch)


def _plan(opt, slot=(0, None)):
    return opt._stepper.plans[slot].calls[0].cache["plan"]


# --- the device guard and state on another device --------------------------------------------


def test_the_guard_makes_the_tensors_device_current_only_when_it_is_not(monkeypatch):
    """Triton launches on the current device: a guard switches to the tensors' one, only
    where it is not the current one (cheap in the common case)."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or
                        contextlib.nullcontext())
    with launch._device_guard(torch.device("cuda", 1)):
        pass
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        with launch._device_guard(device):
            pass
    assert entered == [torch.device("cuda", 1)]


@needs_interpreter
def test_every_launch_runs_inside_the_guard(monkeypatch):
    route_cpu_to_triton(monkeypatch)
    inside, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        inside.append(device)
        yield
        inside.pop()

    class Kernel:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(list(inside))
                return self.real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(launch, "_device_guard", guard)
    monkeypatch.setattr(launch, "_adan_kernel", Kernel(launch._adan_kernel))
    monkeypatch.setattr(launch, "_scalars_kernel", Kernel(launch._scalars_kernel))
    p = torch.zeros(launch.BLOCK + 3)
    p.grad = torch.ones_like(p)
    opt = Adan([p], lr=0.01)
    opt.step()  # the build's self-check launches too
    assert launched and all(guards == [p.device] for guards in launched)
    launched.clear()
    opt.step()
    assert launched == [[p.device]] * 3  # the step's scalars, the full and the partial tile


@needs_interpreter
@pytest.mark.parametrize("key,fmt", [("step", None), ("exp_avg_sq", None), ("seed", "bf16"),
                                     ("exp_avg_exp", "int8")])
def test_state_on_another_device_is_refused_before_anything_is_written(monkeypatch, key, fmt):
    """Every state tensor whose address goes into the kernel's table must be on the
    parameter's device: the error names the tensor and the devices, and neither this
    parameter nor the group's others are written."""
    route_cpu_to_triton(monkeypatch)
    params = [torch.randn(300), torch.randn(50)]
    opt = Adan(params, lr=0.01, state_dtype=fmt)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.clone() for p in params]
    opt.state[params[1]][key] = torch.empty_like(opt.state[params[1]][key], device="meta")
    with pytest.raises(RuntimeError, match=f"'{key}' is on meta.*device cpu"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert opt.state[params[0]]["step"].item() == 1


# --- CUDA graphs, simulated -----------------------------------------------------------------


def _reference(p0, lr=0.01):
    group = RefGroup([p0.double().numpy()], lr=lr)
    return ReferenceAdan([group]), group


@needs_interpreter
def test_an_eager_step_after_a_replay_sends_its_own_addresses(capture):
    """A replay rewrites the gradient-address array with the captured gradient's address; the
    next eager step, whose gradient is the one it sent before the replay, must send it again
    (before: it skipped the copy and stepped with the graph's gradient)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, generator=gen)
    ref, group = _reference(p)
    g1, g2 = torch.randn(300, generator=gen), torch.randn(300, generator=gen) * 3
    opt = Adan([p], lr=0.01)
    for grad, captured in ((g1, False), (g2, True), (g1, False), (None, False), (g1, False)):
        if grad is None:
            capture.replay()
            continue
        p.grad = grad
        with capture() if captured else contextlib.nullcontext():
            opt.step()
        ref.step([[grad.double().numpy()]])
    np.testing.assert_allclose(p.double().numpy(), group.params[0], **F32)


@needs_interpreter
def test_what_a_capture_used_outlives_a_re_plan(capture):
    """A re-plan (here add_param_group, then a parameter without a gradient) drops a plan,
    but a graph may still replay its launches: the captured plan's tables, tiles, counters and
    staged arrays stay (the optimizer keeps them), while a plan no capture used is freed."""
    p, q = torch.randn(300), torch.randn(40)
    opt = Adan([p], lr=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    with capture():
        opt.step()
    captured = _plan(opt)
    part = captured.parts[0]
    alive = [weakref.ref(t) for t in (part.table, part.counters, part.grads.device, part.scalars,
                                      captured.hyper.device, *(t for _, t in part.tiles))]
    captured_ref = weakref.ref(captured)
    del captured, part
    opt.add_param_group({"params": [q]})
    q.grad = torch.ones_like(q)
    opt.step()
    uncaptured = weakref.ref(_plan(opt))
    p.grad = None
    opt.step()  # p without a gradient: group 0's plan is re-made
    gc.collect()
    assert captured_ref() is not None and all(r() is not None for r in alive)
    assert uncaptured() is None
    assert len(opt._stepper.captured) == 1


@needs_interpreter
def test_capture_never_allocates_pinned_memory(capture, monkeypatch):
    """A capture copies from host memory reserved at an eager step: a second capture of the
    same values reuses what the first kept; one with new gradient addresses and no eager step
    between, or one that would make a plan, is refused with a clear error, allocating
    nothing."""
    host = launch._Staging._host

    def no_allocation_in_capture(staging):
        assert not capture.on, "host memory allocated during capture"
        return host(staging)

    monkeypatch.setattr(launch._Staging, "_host", no_allocation_in_capture)
    p = torch.randn(300)
    opt = Adan([p], lr=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    with capture():
        opt.step()
        opt.step()  # the same gradient: the kept buffers serve
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="eager step"):
            opt.step()
    q = torch.randn(30)
    q.grad = torch.ones_like(q)
    fresh = Adan([q], lr=0.01)
    with capture(), pytest.raises(RuntimeError, match="plan is made at an eager step"):
        fresh.step()


@needs_interpreter
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_float_lr_warns_at_capture(capture, tensor_lr):
    """A float lr is fixed in the graph at capture (a scheduler's changes never reach the
    replays): the capture says so once, and advises a tensor lr; a tensor lr is read by the
    kernel at every replay, so it says nothing."""
    p = torch.randn(300)
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    opt = Adan([p], lr=lr, capturable=tensor_lr)
    p.grad = torch.ones_like(p)
    opt.step()
    capture.on = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    capture.on = False
    said = [w for w in caught if "CUDA tensor" in str(w.message)]
    assert len(said) == (0 if tensor_lr else 1)


def test_skipped_steps_is_one_tensor_counted_in_place():
    """A captured step adds to the count it captured, so the count must be one tensor updated
    in place (before, each step made a new one: replays never added to it)."""
    p = torch.zeros(10)
    opt = Adan([p], lr=0.01, max_grad_norm=1.0)
    p.grad = torch.ones_like(p)
    opt.step()
    count = opt._skips
    for _ in range(2):
        p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert opt._skips is count and opt.skipped_steps == 2


def test_part_plans_are_kept_least_recently_used_first(monkeypatch):
    """Gradient release keeps a plan per set of parameters stepped together: a varying set
    (the experts a batch reaches) cannot grow them past PART_PLANS_MAX, and the least recently
    used is dropped first, so the sets in use keep theirs."""
    monkeypatch.setattr(stepping, "PART_PLANS_MAX", 3)
    params = [torch.zeros(4) for _ in range(5)]
    opt = Adan(params, lr=0.01)
    stepper = opt._stepper

    def step(*which):
        chosen = [params[i] for i in which]
        for p in chosen:
            p.grad = torch.ones_like(p)
        stepper.step_part(opt.param_groups, 0, opt.state, chosen)
        return stepper.plans[(0, tuple(map(id, chosen)))]

    first = step(0)
    step(1)
    step(2, 3)
    assert step(0) is first  # used again: now the most recent
    step(4)  # drops (1,), the least recently used
    assert len(stepper.plans) == 3
    assert (0, (id(params[1]),)) not in stepper.plans and step(0) is first


# --- CUDA only ------------------------------------------------------------------------------


def _steps(n, shapes, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(n)]


@needs_two_gpus
def test_a_group_on_two_devices_steps_each_on_its_own():
    """One group with tensors on cuda:0 and cuda:1 (one plan each), stepped while cuda:0 is
    current; a tensor lr on cuda:0 reaches cuda:1's launch without a host read."""
    shapes = [(5000,), (300,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    params = [init[0].to("cuda:0"), init[1].to("cuda:1")]
    lr = torch.tensor(0.01, device="cuda:0")
    opt = Adan(params, lr=lr, capturable=True, weight_decay=0.02)
    group = RefGroup([t.double().numpy() for t in init], lr=0.01, weight_decay=0.02)
    ref = ReferenceAdan([group])
    torch.cuda.set_device(0)
    for k, grads in enumerate(_steps(4, shapes, 2, "cpu")):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.device)
        if k:  # plans made: no host synchronisation from here
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref.step([[g.double().numpy() for g in grads]])
    assert torch.cuda.current_device() == 0
    assert len(opt._stepper.plans[(0, None)].calls) == 2
    for p, want in zip(params, group.params, strict=True):
        np.testing.assert_allclose(p.double().cpu().numpy(), want, **F32)
        assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].item() == 4


@needs_two_gpus
def test_state_on_another_gpu_is_refused():
    p = torch.zeros(300, device="cuda:1")
    opt = Adan([p], lr=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["step"] = opt.state[p]["step"].to("cuda:0")
    with pytest.raises(RuntimeError, match="'step' is on cuda:0"):
        opt.step()


def _graphed(params, opt, static):
    """A graph of ``opt.step()`` reading ``static`` gradients, after one eager step on a side
    stream (torch's recipe)."""
    for p, g in zip(params, static, strict=True):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.cuda.graph(graph):
            opt.step()
    return graph


def _run(shapes, schedule, fmt, replan=False):
    """Steps of ``schedule`` ("g": replay a graph, "e": an eager step with gradients of their
    own), the graph's gradients copied into static tensors; everything eager if no "g"."""
    params = [t.cuda() for t in _steps(1, shapes, 1, "cpu")[0]]
    opt = Adan(params, lr=0.01, max_grad_norm=5.0, state_dtype=fmt)
    data = _steps(len(schedule) + 1, shapes, 3)
    static = [g.clone() for g in data[0]]
    graph = _graphed(params, opt, static) if "g" in schedule else None
    if graph is None:
        for p, g in zip(params, static, strict=True):
            p.grad = g
        opt.step()
    if replan:  # a new group and a parameter without a gradient: the plans are re-made
        extra = torch.zeros(7, device="cuda")
        opt.add_param_group({"params": [extra]})
        opt.step()
        del extra
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    for kind, grads in zip(schedule, data[1:], strict=True):
        if kind == "g":
            for s, g in zip(static, grads, strict=True):
                s.copy_(g)
            graph.replay()
        else:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    torch.cuda.synchronize()
    return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]


@needs_cuda
@pytest.mark.parametrize("fmt", [None, "int8"])
@pytest.mark.parametrize("replan", [False, True])
def test_replays_between_eager_steps_equal_eager_stepping(fmt, replan):
    """Replays and eager steps interleaved (an eager step's gradients at their own
    addresses), after a re-plan or not: the same as stepping eagerly throughout."""
    shapes = [(5000,), (33, 7), (1,)]
    schedule = "gegeegg"
    graphed = _run(shapes, schedule, fmt, replan)
    eager = _run(shapes, "e" * len(schedule), fmt, replan)
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_skipped_steps_accumulate_across_replays():
    p = torch.zeros(300, device="cuda")
    opt = Adan([p], lr=0.01, max_grad_norm=1.0)
    static = [torch.ones_like(p)]
    graph = _graphed([p], opt, static)
    static[0].fill_(float("nan"))
    for _ in range(3):
        graph.replay()
    assert opt.skipped_steps == 3
    static[0].fill_(1.0)
    graph.replay()
    assert opt.skipped_steps == 3 and opt.state[p]["step"].item() == 2


@needs_cuda
def test_a_tensor_lr_in_host_memory_is_read_without_a_synchronisation():
    p = torch.zeros(300, device="cuda")
    opt = Adan([p], lr=torch.tensor(0.01), weight_decay=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.state[p]["step"].item() == 2
