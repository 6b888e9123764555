"""Bad input on every path and state format: each case either matches the float64 reference or
raises an error naming the argument, leaving params, gradients and state as they were."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from codes import outlier_distances, spike_finals
from conftest import allow_grad_dtype
from reference import ReferenceAdan, RefGroup

from adan import Adan
from adan.kernels import cpu_compiled, cpu_native

PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True),
         "fused": dict(fused=True), "default": {}}
FORMATS = [None, "bf16", "int8"]
TRACK_TOL = {None: 1e-5, "fp32": 1e-5, "bf16": 0.02, "int8": 0.06}


def run(params, opt, ref, grads_per_step):
    """Step ``opt`` and the reference on the same float64 gradient arrays."""
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        ref.step([[g for g in grads]])


def assert_tracks(params, ref_params, starts, fmt, rtol=1e-5):
    """Plain state: the reference's values; compact state: within its rounding, relative to
    how far each parameter moved."""
    for p, want, start in zip(params, ref_params, starts, strict=True):
        got = p.detach().double().numpy()
        if fmt is None:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
        else:
            moved = np.abs(want - start).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=TRACK_TOL[fmt] * moved + 1e-6)


def snapshot(opt):
    """A deep copy of the optimizer's state and groups, to compare after a failed call."""
    return ({id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_unchanged(opt, snap, params=(), before=()):
    state, groups = snap
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert (torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor)
                    else v == state[id(p)][k]), k
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


# --- 1. no hyperparameter baked into a compiled kernel ---------------------------------------


@pytest.mark.parametrize("path", ["fused", "default"])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_groups_with_other_betas_share_no_compiled_constants(path, fmt):
    rng = np.random.default_rng(0)
    starts = [rng.normal(size=(300,)), rng.normal(size=(300,))]
    params = [torch.tensor(x, dtype=torch.float32) for x in starts]
    betas = [(0.5, 0.6, 0.7), (0.98, 0.92, 0.99)]
    opt = Adan([{"params": [params[0]], "betas": betas[0]},
                {"params": [params[1]], "betas": betas[1]}], lr=0.01, state_dtype=fmt,
               **PATHS[path])
    ref = ReferenceAdan([RefGroup([starts[0]], lr=0.01, betas=betas[0]),
                         RefGroup([starts[1]], lr=0.01, betas=betas[1])])
    for _ in range(5):
        grads = [rng.normal(size=(300,)) for _ in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        ref.step([[grads[0]], [grads[1]]])
    assert_tracks(params, [g.params[0] for g in ref.groups], starts, fmt)


def test_another_process_betas_do_not_reach_this_one_through_the_compile_cache(tmp_path):
    """A process that compiled with betas (0.5, 0.6, 0.7) shares Inductor's on-disk cache with a
    later default-betas process; the later one must still match the reference."""
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        sys.path.insert(0, {tests!r})
        from reference import ReferenceAdan, RefGroup
        from adan import Adan
        betas = tuple(float(b) for b in sys.argv[1:4])
        rng = np.random.default_rng(0)
        start = rng.normal(size=(300,))
        p = torch.tensor(start, dtype=torch.float32)
        opt = Adan([p], lr=0.01, betas=betas, state_dtype="bf16", fused=True)
        ref = ReferenceAdan([RefGroup([start], lr=0.01, betas=betas)])
        for _ in range(5):
            g = rng.normal(size=(300,))
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            ref.step([[g]])
        want = ref.groups[0].params[0]
        print(np.abs(p.double().numpy() - want).max() / np.abs(want - start).max())
    """).format(tests=str(Path(__file__).parent))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    errors = []
    for betas in (("0.5", "0.6", "0.7"), ("0.98", "0.92", "0.99")):
        out = subprocess.run([sys.executable, "-c", script, *betas], env=env, check=True,
                             capture_output=True, text=True)
        errors.append(float(out.stdout.strip().splitlines()[-1]))
    assert max(errors) < TRACK_TOL["bf16"]


# --- 2. 8-bit outliers stay in their elements ---------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("count, scale", [(1, 1e6), (4, 1e6), (4, 1e5), (4, 1e3)])
def test_int8_outliers_move_no_neighbour_further(path, count, scale):
    """Up to 4 elements of one 32-block with gradients up to 1e6 times the others', over 50
    steps: no other element moves more than 1.5x as far as with float32 state (their second
    moments floor at the smallest code, never at 0), and the outliers move about as with float32
    (the 8-bit state's spread without outliers is 0.84-1.28x, measured)."""
    got = outlier_distances(lambda ps, fmt: Adan(ps, lr=0.01, state_dtype=fmt, **PATHS[path]),
                            "cpu", count, scale)
    assert got["ratio"][~got["outlier"]].max() <= 1.5
    assert np.all((got["ratio"][got["outlier"]] >= 0.7) & (got["ratio"][got["outlier"]] <= 1.5))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("spike", [float("inf"), float("nan")])
def test_int8_non_finite_gradient_damages_no_neighbour(path, spike):
    """A non-finite gradient element ends as with float32 state, and its block neighbours
    step as they do with float32 state (it takes a reserved code, not the block's scale)."""
    finals = spike_finals(lambda ps, fmt: Adan(ps, lr=0.01, state_dtype=fmt, **PATHS[path]),
                          "cpu", spike)
    torch.testing.assert_close(finals["int8"][300], finals["fp32"][300], equal_nan=True)
    rest = torch.ones(512, dtype=torch.bool)
    rest[300] = False
    moved = finals["fp32"][rest].abs().max()
    assert (finals["int8"][rest] - finals["fp32"][rest]).abs().max() < 0.1 * moved


# --- 3. load_state_dict checks everything first ---------------------------------------------


def _trained(fmt=None, path="default"):
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(300)]
    opt = Adan(params, lr=0.01, state_dtype=fmt, **PATHS[path])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _corrupt(kind, sd):
    state = sd["state"]
    if kind == "none-buffer":
        state[1]["exp_avg_sq"] = None
    elif kind == "codes-size":
        state[1]["exp_avg"] = state[1]["exp_avg"][:-5]
    elif kind == "no-step":
        del state[1]["step"]
    elif kind == "shape":
        state[0]["exp_avg"] = state[0]["exp_avg"].reshape(3, 4)
    elif kind == "adamw":
        for s in state.values():
            s.pop("exp_avg_diff")
            s.pop("prev_grad", None)
        sd["param_groups"][0]["betas"] = (0.9, 0.999)
    elif kind == "nan-step":
        state[0]["step"] = torch.tensor(float("nan"))
    elif kind == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    elif kind == "betas":
        sd["param_groups"][0]["betas"] = (0.9, 0.999)
    return sd


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind, match", [
    ("none-buffer", r"parameter 1 .*exp_avg_sq"), ("codes-size", r"parameter 1 .*exp_avg"),
    ("no-step", r"parameter 1 .*'step'"), ("shape", r"parameter 0 .*shape"),
    ("adamw", "AdamW"), ("nan-step", r"parameter 0 .*'step'"),
    ("groups", "param groups"), ("betas", r"betas"),
])
def test_bad_state_dict_raises_one_clear_error_and_changes_nothing(fmt, kind, match):
    if kind == "codes-size" and fmt != "int8":
        pytest.skip("8-bit codes only")
    params, opt = _trained(fmt)
    bad = _corrupt(kind, _trained(fmt)[1].state_dict())
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(opt, snap)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # still usable


# --- 4. groups are validated; a format changed between steps is converted --------------------


@pytest.mark.parametrize("saved, release, match", [
    ([1.0, 1.0], True, "max_grad_norm.*gradient_release"),
    ([1.0, 0.0], False, r"max_grad_norm in param group 1: 0\.0 \(allowed: 1\.0"),
])
def test_loaded_groups_are_checked_as_the_constructor_checks_them(saved, release, match):
    """A dict saved with clipping loaded into a releasing optimizer, or groups that disagree
    on max_grad_norm, are refused before anything changes (the constructor and
    add_param_group refuse both), and the optimizer keeps working."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    opt = Adan(groups, lr=0.01, gradient_release=release)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for group, clip in zip(sd["param_groups"], saved, strict=True):
        group["max_grad_norm"] = clip
        group["lr"] = 0.5
    snap = snapshot(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap, list(model.parameters()), before)
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # still usable


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_clipping_under_a_huge_grad_scale_does_not_overflow(fmt):
    """fused=True takes GradScaler's scale and unscales inside the step: the clipping norm of
    the scaled gradients must not overflow where the unscaled ones' is finite (a scale of
    2**64, which a long run's growth reaches, made every step a skipped one)."""
    finals = []
    for scale in (None, 2.0**64):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = Adan(model.parameters(), lr=0.01, max_grad_norm=0.5, fused=True, state_dtype=fmt)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None,
                                      growth_interval=10**6)
        for k in range(3):
            opt.zero_grad()
            loss = model(torch.full((2, 8), float(k + 1))).square().sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert opt.skipped_steps == 0
        finals.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*finals, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, match", [
    ("state_dtype", "fp16", "state_dtype"), ("betas", (0.9, float("nan"), 0.9), r"betas\[1\]"),
    ("betas", (0.9, 0.99), "betas"), ("lr", -1.0, "lr"), ("lr", float("inf"), "lr"),
    ("eps", float("inf"), "eps"), ("weight_decay", float("inf"), "weight_decay"),
    ("weight_decay", float("nan"), "weight_decay"), ("max_grad_norm", float("nan"),
                                                     "max_grad_norm"),
])
def test_group_settings_are_validated_everywhere(field, value, match):
    """In group dicts, in add_param_group, and when changed between steps (nothing written)."""
    a, b = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=f"{match}.* in param group 1"):
        Adan([{"params": [a]}, {"params": [b], field: value}])
    opt = Adan([a])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], field: value})
    assert len(opt.param_groups) == 1
    a.grad = torch.ones(3)
    opt.step()
    snap, before = snapshot(opt), a.clone()
    opt.param_groups[0][field] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    opt.param_groups[0].update(snap[1][0])
    assert_unchanged(opt, snap, [a], [before])


@pytest.mark.parametrize("path", list(PATHS))
def test_state_dtype_changed_between_steps_is_converted(path):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(300,))
    p = torch.tensor(start, dtype=torch.float32)
    opt = Adan([p], lr=0.01, **PATHS[path])
    ref = ReferenceAdan([RefGroup([start], lr=0.01)])
    for fmt in ("fp32", "int8", "bf16", None, "int8"):
        opt.param_groups[0]["state_dtype"] = fmt
        run([p], opt, ref, [[rng.normal(size=(300,))] for _ in range(2)])
        codes = opt.state[p]["exp_avg"]
        assert codes.dtype == {"int8": torch.int8, "bf16": torch.bfloat16}.get(fmt,
                                                                            torch.float32)
    assert_tracks([p], ref.groups[0].params, [start], "int8")


# --- 5. bias corrections for betas near 1 ---------------------------------------------------


@pytest.mark.parametrize("path", [*PATHS, "capturable"])
@pytest.mark.parametrize("fmt", [None, "fp32"])
def test_bias_corrections_for_betas_near_one(path, fmt):
    """b = 1 - 1e-6 and 1 - 1e-8 (valid decay rates): 1 - b**k in float32 is 0.7 % off or 0.

    fmt "fp32" on float64 parameters takes the compact-state kernels (float32 buffers).
    """
    betas = (0.9, 0.999999, 0.99999999)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(50,))
    kwargs = dict(foreach=True, capturable=True) if path == "capturable" else PATHS[path]
    p = torch.tensor(start, dtype=torch.float32 if fmt is None else torch.float64)
    opt = Adan([p], lr=0.01, betas=betas, state_dtype=fmt, **kwargs)
    ref = ReferenceAdan([RefGroup([start], lr=0.01, betas=betas)])
    run([p], opt, ref, [[rng.normal(size=(50,))] for _ in range(8)])
    np.testing.assert_allclose(p.double().numpy(), ref.groups[0].params[0], rtol=1e-5, atol=1e-6)


# --- 6. reshaped and integer parameters -------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_reshaped_parameter_raises(path, fmt):
    p = torch.zeros(4, 6)
    opt = Adan([p], state_dtype=fmt, **PATHS[path])
    p.grad = torch.ones_like(p)
    opt.step()
    p.data = p.data.view(6, 4)
    p.grad = torch.ones_like(p)
    snap, before = snapshot(opt), p.clone()
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_unchanged(opt, snap, [p], [before])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_parameters_are_rejected(dtype):
    with pytest.raises(ValueError, match="parameter 0.*dtype"):
        Adan([torch.zeros(3, dtype=dtype)])


# --- 7. non-finite norms skip the step -------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm_skips_the_step_and_counts_it(path, fmt, bad):
    params = [torch.randn(300), torch.randn(7)]
    opt = Adan(params, lr=0.01, max_grad_norm=1.0, state_dtype=fmt, **PATHS[path])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snap, before = snapshot(opt), [p.clone() for p in params]
    params[1].grad[3] = bad
    opt.step()
    assert_unchanged(opt, snap, params, before)
    assert opt.skipped_steps == 1
    params[1].grad[3] = 0.5
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    assert all(torch.isfinite(p).all() for p in params)


# --- 8. a gradient in another dtype --------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_dtype_other_than_the_parameters(path):
    """float64 parameters with float32 gradients: computed in float64, prev_grad stays float64."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(40,))
    p = torch.tensor(start)
    allow_grad_dtype(p)
    opt = Adan([p], lr=0.01, weight_decay=0.1, **PATHS[path])
    ref = ReferenceAdan([RefGroup([start], lr=0.01, weight_decay=0.1)])
    for _ in range(4):
        g = torch.tensor(rng.normal(size=(40,)), dtype=torch.float32)
        p.grad = g
        opt.step()
        ref.step([[g.double().numpy()]])
    assert opt.state[p]["prev_grad"].dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), ref.groups[0].params[0], rtol=1e-12, atol=1e-12)


# --- 16. an error in a step is not a compiler failure ---------------------------------------


@pytest.mark.parametrize("module, name, options", [
    (cpu_compiled, "_compiled", {"fused": True}),  # Inductor's kernel, plain state
    (cpu_native, "build", {"state_dtype": "int8"}),  # the C++ kernel, compact state
], ids=["inductor", "c++"])
def test_an_error_inside_the_fused_step_does_not_switch_the_kernel_off(monkeypatch, module,
                                                                       name, options):
    """It reaches the caller, and the next step uses the fused kernel again: only a kernel
    that cannot be built makes the default fall back, and that is decided on scratch tensors."""
    calls = []
    make = getattr(module, name)

    def flaky(*key):
        kernel = make(*key)

        def run(*args):
            calls.append(key)
            if len(calls) == 2:
                raise RuntimeError("out of memory (test)")
            kernel(*args)
        return run

    p = torch.zeros(300)
    opt = Adan([p], **options)
    p.grad = torch.ones(300)
    opt.warm_up()  # built and checked (in this test or before): only the steps count below
    monkeypatch.setattr(module, name, flaky)
    for expect_error in (False, True, False):
        p.grad = torch.ones(300)
        if expect_error:
            with pytest.raises(RuntimeError, match="out of memory"):
                opt.step()
        else:
            opt.step()
    assert len(calls) == 3 and opt.state[p]["step"].item() == 2
