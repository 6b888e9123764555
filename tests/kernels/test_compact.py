"""Compact-state Adan (bf16 and 8-bit state) against a float64 Adan that applies the same codes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from codes import (
    KEYS,
    MX_BLOCK,
    check_kernel_step,
    code_levels,
    decode,
    encode,
    encode_power,
    encode_v2,
)
from conftest import initial_params, run_pair
from reference import ReferenceAdan, RefGroup

import adan
from adan import state as adan_state
from adan.kernels import compact, cpu_compiled, cpu_native

TRACK_TOL = {"bf16": 0.02, "int8": 0.06}
KERNELS = {"compact": compact.compact_adan, "cpu_compiled": cpu_compiled.cpu_compiled_adan,
           "cpu_native": cpu_native.cpu_native_adan}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize(
    "shape, no_prox, factor, maximize",
    [((1000,), False, None, False), ((7, 64), True, 0.5, True), ((512,), False, None, True)],
)
def test_step_matches_float64_reference_with_same_quantisation(kernel, fmt, shape, no_prox,
                                                               factor, maximize):
    check_kernel_step(KERNELS[kernel], fmt, "cpu", shape, no_prox, factor, maximize)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("opts", [{}, {"no_prox": True, "max_grad_norm": 1.0},
                                  {"maximize": True}])
def test_optimizer_tracks_float64_adan(fmt, opts):
    """Through the optimizer (stochastic rounding, late and skipped grads, two groups)."""
    tparams, ref, _ = run_pair(12, torch.float32, {"state_dtype": fmt, "foreach": False, **opts})
    init = initial_params()
    for ps, rg, ips in zip(tparams, ref.groups, init, strict=True):
        for p, rp, ip in zip(ps, rg.params, ips, strict=True):
            # Rounded moments perturb each update slightly (measured: <= 0.5 % of the movement
            # for bf16, 2 % for int8); a wrong sign, scale or step is off by the movement.
            moved = np.abs(rp - ip).max()
            np.testing.assert_allclose(p.double().numpy(), rp, rtol=0,
                                       atol=TRACK_TOL[fmt] * moved + 1e-5)


def assert_nearest_codes(state: dict, key: str, signed: bool, codes: np.ndarray,
                         exps: np.ndarray) -> None:
    """The state's 8-bit ``key`` holds the NumPy twin's nearest codes (but where float32's
    rounding of a value at a tie between codes picks the other) and its scale bytes."""
    np.testing.assert_array_equal(state[key + "_exp"].numpy(), exps, err_msg=key)
    diff = np.abs(code_levels(state[key], signed) - codes)
    assert diff.max(initial=0) <= 1 and (diff > 0).mean() <= 0.01, key


def train(fmt, steps=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    opt = adan.Adan(model.parameters(), lr=0.01, weight_decay=0.02, state_dtype=fmt,
                    foreach=False, **kwargs)
    x = torch.randn(64, 20)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt


def saved(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_state_dict_round_trip_is_bit_exact(fmt):
    model, opt = train(fmt)
    model2, opt2 = train(fmt, steps=0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved(opt))
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() == s2.keys()
        for key in s:
            if not isinstance(s[key], torch.Tensor):
                assert s[key] == s2[key], key
                continue
            assert s[key].dtype == s2[key].dtype and torch.equal(s[key], s2[key]), key
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        p2.grad = p.grad.clone()
    for o in (opt, opt2):  # identical continuation, random rounding included
        torch.manual_seed(7)
        o.step()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


@pytest.mark.parametrize("src, dst", [("int8", "fp32"), ("fp32", "int8"), ("bf16", "int8"),
                                      ("int8", "bf16"), ("fp32", "bf16"), ("bf16", "fp32")])
def test_state_converts_on_load(src, dst):
    model, opt = train(src)
    model2, opt2 = train(dst, steps=0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved(opt))
    assert all(g["state_dtype"] == dst for g in opt2.param_groups)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        s, s2 = opt.state[p], opt2.state[p2]
        assert torch.equal(s["step"], s2["step"])
        for key, signed in KEYS:
            source = decode(s, key, signed, tuple(p.shape))
            if dst == "int8":
                codes, exps = encode(source, signed)
                assert_nearest_codes(s2, key, signed, codes, exps)
            else:
                dtype = torch.float32 if dst == "fp32" else torch.bfloat16
                assert s2[key].dtype == dtype and s2[key].shape == p.shape
                expect = torch.tensor(source).to(dtype)
                assert torch.equal(s2[key], expect), key
    opt2.zero_grad()
    model2(torch.randn(4, 20)).sum().backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def _old_entry(entry: dict, rng: np.random.Generator, version: str) -> None:
    """Replace ``entry``'s float32 buffers by the 8-bit codes of an older version, of values
    near theirs: version 2's minifloats (with a block scale set by an outlier, so that
    subnormal codes occur) or the power codes (``<buffer>_meta`` rows, no record)."""
    for key, signed in KEYS:
        value = entry[key].double().numpy() * rng.uniform(0.5, 2.0, entry[key].shape)
        if not signed:
            value = np.abs(value)
        dtype = torch.int8 if signed else torch.uint8
        if version == "2":
            value[..., :1] *= 1e4
            codes, exps = encode_v2(value, signed)
            entry[key + "_exp"] = torch.tensor(exps, dtype=torch.uint8)
            entry["int8_codes"] = 2
        else:
            codes, meta = encode_power(value, signed)
            entry[key + "_meta"] = torch.tensor(meta.reshape(-1), dtype=torch.float32)
        entry[key] = torch.tensor(codes.reshape(value.shape)).to(dtype)


@pytest.mark.parametrize("version", ["2", "power codes"])
def test_older_8bit_state_loads_into_the_current_codes(version):
    """A checkpoint of the version-2 minifloats (two's complement e4m3 and e5m3 over
    ``2**(s - 128)``, ``int8_codes == 2``) or of the power codes before them (``_meta`` rows
    of 3 floats per 256-block) loads: decoded, then encoded as the current codes, nearest."""
    model, opt = train("fp32")
    old = saved(opt)
    rng = np.random.default_rng(1)
    for entry in old["state"].values():
        _old_entry(entry, rng, version)
    model2, opt2 = train("int8", steps=0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(old)
    for pid, p2 in enumerate(model2.parameters()):
        s2 = opt2.state[p2]
        assert s2["int8_codes"] == 3 and not any(k.endswith("_meta") for k in s2)
        for key, signed in KEYS:
            source = decode(old["state"][pid], key, signed, tuple(p2.shape))
            assert np.all(np.isfinite(source)) and np.any(source != 0)
            codes, exps = encode(source.astype(np.float32), signed)
            assert_nearest_codes(s2, key, signed, codes, exps)
            assert s2[key + "_exp"].numel() == p2.numel() // MX_BLOCK + 1
    opt2.zero_grad()
    model2(torch.randn(4, 20)).sum().backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_state_bytes_per_parameter():
    p = torch.zeros(1 << 16, requires_grad=True)
    p.grad = torch.randn_like(p)
    sizes = {}
    for fmt in ("fp32", "bf16", "int8"):
        opt = adan.Adan([p], state_dtype=fmt, foreach=False)
        opt.step()
        sizes[fmt] = adan_state.state_bytes([opt.state[p]]) / p.numel()
    assert sizes["fp32"] == 16 and sizes["bf16"] == 8
    assert 4.12 < sizes["int8"] < 4.13  # 4 codes + 4 scale bytes per 32


@pytest.mark.parametrize("bad", ["fp16", torch.float16, 8, "float8"])
def test_invalid_state_dtype(bad):
    with pytest.raises(ValueError, match="state_dtype"):
        adan.Adan([torch.zeros(2, requires_grad=True)], state_dtype=bad)


def test_differentiable_rejects_compact_state():
    with pytest.raises(ValueError, match="differentiable"):
        adan.Adan([torch.zeros(2, requires_grad=True)], state_dtype="int8", differentiable=True)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_stochastic_param_rounding_keeps_small_bf16_updates(fmt):
    """lr*|u| = 1e-4 per step is far below bf16's spacing at 1 (2^-8 below, 2^-7 above)."""
    torch.manual_seed(0)
    results = {}
    for sr in (False, True):
        p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
        opt = adan.Adan([p], lr=1e-4, state_dtype=fmt, foreach=False,
                        stochastic_param_rounding=sr)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        results[sr] = p.double().mean().item()
    assert results[False] == 1.0  # every update lost
    assert abs(results[True] - (1 - 200 * 1e-4)) < 1e-3


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_grad_scaler_steps_match_and_skip_overflow(fmt):
    """AMP's GradScaler: a power-of-two scale unscales exactly; an inf step is skipped."""
    results = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        opt = adan.Adan(model.parameters(), lr=0.01, state_dtype=fmt, foreach=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        x = torch.randn(32, 16)
        for k in range(4):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if use_scaler and k == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            torch.manual_seed(100 + k)
            if use_scaler or k != 2:  # the plain run skips the same step by hand
                scaler.step(opt)
            scaler.update()
        results.append((model, opt))
    (plain, plain_opt), (amp, amp_opt) = results
    for p, q in zip(plain.parameters(), amp.parameters(), strict=True):
        assert amp_opt.state[q]["step"].item() == 3
        assert torch.equal(p, q)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_complex_parameters_follow_the_real_view(fmt):
    """Complex parameters are updated as their (real, imag) pairs, as fp32 state does."""
    torch.manual_seed(0)
    grads = [torch.randn(300, dtype=torch.complex64) for _ in range(5)]
    start = torch.randn(300, dtype=torch.complex64)
    init = np.stack([start.real.numpy(), start.imag.numpy()], -1).astype(np.float64)
    ref_opt = ReferenceAdan([RefGroup([init], lr=0.01)])
    p = torch.nn.Parameter(start.clone())
    opt = adan.Adan([p], lr=0.01, state_dtype=fmt, foreach=False)
    for g in grads:
        p.grad = g
        opt.step()
        ref_opt.step([[torch.view_as_real(g).double().numpy()]])
    want = ref_opt.groups[0].params[0]
    moved = np.abs(want - init).max()
    np.testing.assert_allclose(torch.view_as_real(p.detach()).double().numpy(), want, rtol=0,
                               atol=TRACK_TOL[fmt] * moved)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True), {}],
                         ids=["single", "foreach", "fused", "default"])
def test_float16_parameters_keep_float32_state_by_default(path):
    """With gradients near 1e-3, n ~ 1e-8 underflows float16 (as does eps): float16 state left
    most elements non-finite. By default float16 parameters keep float32 state."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(300,))
    p = torch.tensor(start, dtype=torch.float16)
    opt = adan.Adan([p], lr=1e-3, **path)
    ref = ReferenceAdan([RefGroup([p.double().numpy()], lr=1e-3)])
    for _ in range(5):
        g = torch.tensor(rng.normal(size=(300,)) * 1e-3, dtype=torch.float16)
        p.grad = g
        opt.step()
        ref.step([[g.double().numpy()]])
    assert all(opt.state[p][k].dtype == torch.float32 for k, _ in KEYS)
    assert torch.isfinite(p).all()
    # float16 rounds each step's parameter write: a few ulps (2**-9 at 2-4) after 5 steps
    np.testing.assert_allclose(p.double().numpy(), ref.groups[0].params[0], rtol=4e-3, atol=1e-3)


def test_bf16_parameters_default_state_keeps_slow_averages_moving():
    """bf16 parameters with state_dtype=None: n with b3 = 0.999 must reach 1 - 0.999**k (bf16
    rounded to nearest froze it at 0.50 / 0.25 of that after 3000 steps, differently on the
    eager and fused paths); stochastic rounding keeps it unbiased, every path the same bits.
    state_dtype='param' keeps the old rounding."""
    steps, finals = 3000, {}
    for name, path in (("eager", dict(foreach=False)), ("fused", dict(fused=True)),
                       ("param", dict(foreach=False, state_dtype="param"))):
        p = torch.zeros(512, dtype=torch.bfloat16)
        torch.manual_seed(0)  # the rounding seed
        opt = adan.Adan([p], lr=0.0, betas=(0.98, 0.92, 0.999), **path)
        p.grad = torch.ones_like(p)
        for _ in range(steps):
            opt.step()
        finals[name] = opt.state[p]["exp_avg_sq"].float()
    exact = 1 - 0.999**steps
    for name in ("eager", "fused"):
        assert abs(finals[name].mean().item() / exact - 1) < 0.01, name
    assert torch.equal(finals["eager"], finals["fused"])
    assert finals["param"].mean().item() < 0.6 * exact  # the old default, still reachable
