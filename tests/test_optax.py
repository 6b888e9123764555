"""adan.optax against the float64 reference, against adan.Adan in torch, and beside optax.adan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceAdan, RefGroup

import adan

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout's ``adan``."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}, check=False)


def test_import_adan_does_not_import_jax():
    result = _python("import adan, sys; bad = {'jax', 'optax'} & set(sys.modules); "
                     "assert not bad, bad")
    assert result.returncode == 0, result.stderr


jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from adan import optax as adan_optax  # noqa: E402

finite = dict(allow_nan=False, allow_infinity=False)


def run_jax(tx, p0, grads, dtype, jit=True):
    """Apply ``tx`` to the dict of arrays ``p0`` over the gradient dicts; return params, state."""
    params = {k: jnp.asarray(v, dtype) for k, v in p0.items()}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update({k: jnp.asarray(v, dtype) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def run_reference(p0, grads, decayed=None, lrs=None, max_grad_norm=0.0, **hp):
    """The float64 reference over the same inputs: the leaves named in ``decayed`` (default
    all) in a group with ``weight_decay``, the others without; ``lrs`` one lr per step."""
    decayed = set(p0) if decayed is None else decayed
    names = [[k for k in p0 if k in decayed], [k for k in p0 if k not in decayed]]
    wd = hp.pop("weight_decay", 0.0)
    groups = [RefGroup([p0[k] for k in ns], weight_decay=w, **hp)
              for ns, w in zip(names, (wd, 0.0), strict=True)]
    ref = ReferenceAdan(groups, max_grad_norm=max_grad_norm)
    for step, g in enumerate(grads):
        for group in groups:
            group.lr = hp.get("lr", 1e-3) if lrs is None else lrs[step]
        ref.step([[g[k] for k in ns] for ns in names])
    return {k: p for ns, group in zip(names, groups, strict=True)
            for k, p in zip(ns, group.params, strict=True)}, dict(zip(names[0] + names[1], [
                s for group in groups for s in group.states], strict=True))


def problem(shapes, steps, seed, dtype=np.float64, offset=0.5):
    """Initial params and gradient dicts, rounded to ``dtype`` and held as float64."""
    rng = np.random.default_rng(seed)

    def draw(shape, shift=0.0):
        return (rng.normal(size=shape) + shift).astype(dtype).astype(np.float64)

    p0 = {f"p{i}": draw(s) for i, s in enumerate(shapes)}
    return p0, [{k: draw(v.shape, offset) for k, v in p0.items()} for _ in range(steps)]


def assert_close(params, expected, rtol, atol):
    for k, want in expected.items():
        np.testing.assert_allclose(np.asarray(params[k], np.float64), want, rtol=rtol, atol=atol,
                                   err_msg=k)


configs = dict(
    betas=st.tuples(*[st.floats(0.0, 0.999, **finite)] * 3),
    lr=st.floats(1e-5, 0.5, **finite),
    eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
    wd=st.floats(0.0, 0.5, **finite),
    no_prox=st.booleans(),
    clip=st.sampled_from([None, 0.1, 10.0]),
    shapes=st.lists(st.lists(st.integers(1, 5), max_size=2).map(tuple), min_size=1, max_size=3),
    masked=st.lists(st.booleans(), min_size=3, max_size=3),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)


def _check_random_config(dtype, rtol, atol, betas, lr, eps, wd, no_prox, clip, shapes, masked,
                         steps, seed):
    p0, grads = problem(shapes, steps, seed, dtype)
    mask = {k: masked[i] for i, k in enumerate(p0)}
    tx = adan_optax.adan(lr, *betas, eps, weight_decay=wd, no_prox=no_prox, mask=mask,
                         max_grad_norm=clip)
    params, state = run_jax(tx, p0, grads, dtype, jit=False)
    expected, ref_states = run_reference(
        p0, grads, decayed={k for k, on in mask.items() if on}, max_grad_norm=clip or 0.0,
        lr=lr, betas=betas, eps=eps, weight_decay=wd, no_prox=no_prox)
    assert_close(params, expected, rtol, atol)
    adan_state = state[0]  # chain(scale_by_adan, ...), whether clipped or not
    assert int(adan_state.step) == steps
    for field, name in (("exp_avg", "m"), ("exp_avg_diff", "v"), ("exp_avg_sq", "n"),
                        ("prev_grad", "prev")):
        want = {k: getattr(s, name) for k, s in ref_states.items()}
        assert_close(getattr(adan_state, field), want, rtol, atol)


@settings(max_examples=8, deadline=None)
@given(**configs)
def test_random_configs_match_reference_float64(**config):
    with jax.enable_x64(True):
        _check_random_config(np.float64, 1e-10, 1e-12, **config)


@settings(max_examples=8, deadline=None)
@given(**configs)
def test_random_configs_match_reference_float32(**config):
    _check_random_config(np.float32, 1e-5, 1e-5, **config)


@pytest.mark.parametrize("no_prox,clip", [(False, None), (True, None), (False, 0.5)])
@pytest.mark.parametrize("shapes", [[(7,)], [(3, 4), (4,), ()], [(2, 3, 5), (1,)]])
def test_same_trajectory_as_torch_adan(shapes, no_prox, clip):
    p0, grads = problem(shapes, 5, seed=len(shapes), dtype=np.float32)
    hp = dict(lr=0.02, betas=(0.9, 0.95, 0.99), eps=1e-8, weight_decay=0.05)
    tparams = [torch.tensor(p, dtype=torch.float32) for p in p0.values()]
    opt = adan.Adan(tparams, **hp, no_prox=no_prox, max_grad_norm=clip or 0.0, foreach=False)
    for g in grads:
        for p, gk in zip(tparams, g.values(), strict=True):
            p.grad = torch.tensor(gk, dtype=torch.float32)
        opt.step()
    tx = adan_optax.adan(hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"],
                         no_prox=no_prox, max_grad_norm=clip)
    params, _ = run_jax(tx, p0, grads, jnp.float32)
    for k, p in zip(p0, tparams, strict=True):
        np.testing.assert_allclose(np.asarray(params[k]), p.numpy(), rtol=1e-6, atol=1e-6)


def test_schedule_with_proximal_decay_and_mask():
    p0, grads = problem([(4, 3), (3,)], 6, seed=3, dtype=np.float32)
    schedule = optax.linear_schedule(0.05, 0.01, transition_steps=5)
    mask = {"p0": True, "p1": False}  # decay the matrix, not the bias
    tx = adan_optax.adan(schedule, weight_decay=0.2, mask=mask)
    params, _ = run_jax(tx, p0, grads, jnp.float32)
    expected, _ = run_reference(p0, grads, decayed={"p0"}, weight_decay=0.2,
                                lrs=[float(schedule(k)) for k in range(6)])
    assert_close(params, expected, 1e-5, 1e-6)


def test_scale_by_adan_composes_with_chain():
    p0, grads = problem([(5,), (2, 2)], 4, seed=4, dtype=np.float32)
    tx = optax.chain(adan_optax.scale_by_adan(b1=0.9, b3=0.999), optax.scale(-0.03))
    params, _ = run_jax(tx, p0, grads, jnp.float32)
    expected, _ = run_reference(p0, grads, lr=0.03, betas=(0.9, 0.92, 0.999))
    assert_close(params, expected, 1e-5, 1e-6)


def test_inject_hyperparams_changes_lr_without_recompiling():
    p0, grads = problem([(3, 2), (2,)], 6, seed=5, dtype=np.float32)
    tx = optax.inject_hyperparams(adan_optax.adan)(learning_rate=0.01, weight_decay=0.05)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()}
    state = tx.init(params)
    for k, g in enumerate(grads):
        if k == 3:
            state.hyperparams["learning_rate"] = jnp.asarray(0.03, jnp.float32)
        params, state = step(params, state, {n: jnp.asarray(v, jnp.float32)
                                             for n, v in g.items()})
    assert len(traces) == 1
    expected, _ = run_reference(p0, grads, weight_decay=0.05, lrs=[0.01] * 3 + [0.03] * 3)
    assert_close(params, expected, 1e-5, 1e-6)


def test_multisteps_averages_gradients_before_each_step():
    p0, micro = problem([(4,), (2, 3)], 6, seed=6, dtype=np.float32)
    tx = optax.MultiSteps(adan_optax.adan(0.02, weight_decay=0.1), every_k_schedule=2)
    params, state = run_jax(tx, p0, micro, jnp.float32)
    means = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(micro[::2], micro[1::2],
                                                                strict=True)]
    expected, _ = run_reference(p0, means, lr=0.02, weight_decay=0.1)
    assert_close(params, expected, 1e-5, 1e-6)
    assert int(state.inner_opt_state[0].step) == 3


@pytest.mark.parametrize("state_dtype,fp32_tol", [(None, 1e-5), ("fp32", 1e-5), ("bf16", 2e-3)])
def test_bf16_and_fp32_params_in_one_tree(state_dtype, fp32_tol):
    p0, grads = problem([(4, 3), (3,)], 4, seed=7, dtype=jnp.bfloat16)
    tx = adan_optax.adan(0.01, weight_decay=0.1, state_dtype=state_dtype)
    params = {"p0": jnp.asarray(p0["p0"], jnp.bfloat16), "p1": jnp.asarray(p0["p1"], jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update({k: jnp.asarray(v, params[k].dtype) for k, v in g.items()},
                                state, params)
        assert {k: u.dtype for k, u in updates.items()} == {k: p.dtype for k, p in params.items()}
        params = optax.apply_updates(params, updates)
    assert params["p0"].dtype == jnp.bfloat16 and params["p1"].dtype == jnp.float32
    stored = jnp.bfloat16 if state_dtype == "bf16" else jnp.float32
    for buffer in state[0][1:]:
        assert {b.dtype for b in buffer.values()} == {jnp.dtype(stored)}
    expected, _ = run_reference(p0, grads, lr=0.01, weight_decay=0.1)
    np.testing.assert_allclose(np.asarray(params["p1"]), expected["p1"], rtol=fp32_tol,
                               atol=fp32_tol)
    # bf16 parameters are rounded to 8 bits at each step: a few units of 2**-8 over 4 steps.
    np.testing.assert_allclose(np.asarray(params["p0"], np.float64), expected["p0"], rtol=2e-2,
                               atol=2e-2)


def test_non_finite_gradient_skips_the_step():
    p0, grads = problem([(3,), (2, 2)], 3, seed=8, dtype=np.float32)
    tx = adan_optax.adan(0.02, weight_decay=0.1, max_grad_norm=1.0)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    update = jax.jit(tx.update)
    updates, state = update({k: jnp.asarray(v) for k, v in grads[0].items()}, tx.init(params),
                            params)
    params = optax.apply_updates(params, updates)
    bad = {"p0": jnp.asarray([1.0, np.inf, 0.0]), "p1": jnp.asarray(grads[1]["p1"])}
    skipped, after = update(bad, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(skipped))
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    updates, _ = update({k: jnp.asarray(v) for k, v in grads[2].items()}, after, params)
    params = optax.apply_updates(params, updates)
    expected, _ = run_reference(p0, [grads[0], grads[2]], lr=0.02, weight_decay=0.1,
                                max_grad_norm=1.0)
    assert_close(params, expected, 1e-5, 1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "Invalid b1: 1.0 .allowed: a decay rate in \\[0, 1\\)"),
    (dict(b2=-0.1), "Invalid b2"),
    (dict(b3=float("nan")), "Invalid b3"),
    (dict(eps=-1e-8), "Invalid eps"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(learning_rate=-1.0), "Invalid learning_rate"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm: 0.0 .allowed: a finite number > 0; None"),
    (dict(state_dtype="int8"), "Invalid state_dtype: 'int8' .allowed: None, 'fp32', 'bf16'"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adan_optax.adan(**{"learning_rate": 1e-3, **kwargs})


def test_weight_decay_without_params_is_named():
    tx = adan_optax.adan(1e-3, weight_decay=0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        tx.update(params, tx.init(params))
    plain = adan_optax.adan(1e-3)
    plain.update(params, plain.init(params))  # no decay: no params needed


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from adan.optax import adan
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows, full = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    host = {"w": rng.normal(size=(8, 3)), "b": rng.normal(size=(3,))}
    put = lambda tree: {k: jax.device_put(jnp.asarray(v, jnp.float32),
                                          rows if k == "w" else full) for k, v in tree.items()}
    tx = adan(0.01, weight_decay=0.1, max_grad_norm=5.0)
    step = jax.jit(tx.update)
    grads = [{n: rng.normal(size=v.shape) + k for n, v in host.items()} for k in range(3)]
    results = []
    for params in (put(host), {k: jnp.asarray(v, jnp.float32) for k, v in host.items()}):
        state = tx.init(params)
        for g in grads:
            updates, state = step(put(g), state, params)
            params = optax.apply_updates(params, updates)
        results.append((params, state))
    (params, state), (plain, _) = results
    for buffer in state[0][1:]:
        for k in params:
            assert buffer[k].sharding.is_equivalent_to(params[k].sharding, buffer[k].ndim), (
                k, buffer[k].sharding, params[k].sharding)
    assert params["w"].sharding == rows
    for k in params:
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(plain[k]), rtol=1e-6)
    print("ok")
""")


def test_state_follows_sharded_params():
    result = _python(SHARDED, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                     JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def _updates(tx, grads):
    """The successive updates of one scalar parameter at 0 under ``tx`` (lr 1, float32)."""
    p = jnp.zeros(1)
    state, out = tx.init(p), []
    for g in grads:
        u, state = tx.update(jnp.asarray([g], jnp.float32), state, p)
        out.append(float(u[0]))
    return out


def _reference_updates(grads, lr=1.0):
    ref = ReferenceAdan([RefGroup([np.zeros(1)], lr=lr)])
    out = []
    for g in grads:
        before = ref.groups[0].params[0].copy()
        ref.step([[np.array([g])]])
        out.append(float((ref.groups[0].params[0] - before)[0]))
    return out


def _trajectory(tx, grads):
    """The parameters after ``grads`` (one row a step), from zeros, in one jitted scan."""
    def step(carry, g):
        p, state = carry
        u, state = tx.update(g, state, p)
        return (p + u, state), None

    p = jnp.zeros(grads.shape[1])
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), jnp.asarray(grads, jnp.float32))
    return np.asarray(p, np.float64)


def test_optax_adan_weights_the_nesterov_terms_by_1_minus_b2():
    """optax.adan (0.2.x) weights g_k - g_{k-1} by 1 - b2 = 0.08 in n and in the update, where
    the reference takes b2 = 0.92 (google-deepmind/optax#1715, open)."""
    grads = [1.0, 2.0]  # step 2: d = 1
    ref, ours = _reference_updates(grads), _updates(adan_optax.adan(1.0), grads)
    theirs = _updates(optax.adan(1.0, eps_root=0.0), grads)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if np.allclose(theirs, ref, rtol=1e-5):
        pytest.skip("optax.adan now weights the Nesterov terms as the reference does")
    assert ref[1] == pytest.approx(-0.90736, abs=1e-5)
    assert theirs[1] == pytest.approx(-0.94630, abs=1e-5)
    # 100 steps of random gradients of scale 1e-3 over 100 parameters, lr 1e-2:
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(100, 100)) * 1e-3
    ref_adan = ReferenceAdan([RefGroup([np.zeros(100)], lr=1e-2)])
    for g in steps:
        ref_adan.step([[g]])
    want = ref_adan.groups[0].params[0]

    def distance(tx):
        return np.linalg.norm(_trajectory(tx, steps) - want) / np.linalg.norm(want)

    assert distance(adan_optax.adan(1e-2)) < 1e-5
    assert distance(optax.adan(1e-2, eps_root=0.0)) == pytest.approx(0.86, abs=0.01)


def test_optax_adan_default_eps_root_shrinks_small_gradients():
    """optax.adan's eps_root=1e-8 goes inside the square root: a gradient of 1e-4 (n = 1e-8)
    takes a first step of 0.707 lr instead of the reference's 0.9999 lr."""
    grads = [1e-4, 1e-4]
    ref, ours, theirs = (_reference_updates(grads), _updates(adan_optax.adan(1.0), grads),
                         _updates(optax.adan(1.0), grads))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if np.allclose(theirs, ref, rtol=1e-5):
        pytest.skip("optax.adan's default no longer adds eps_root inside the square root")
    assert ref[0] == pytest.approx(-0.99990, abs=1e-5)
    assert theirs[0] == pytest.approx(-0.70706, abs=1e-5)


def test_jax_step_benchmark_runs(capsys):
    from benchmarks import jax_step

    assert jax_step.main(["--scale", "0.02", "--layers", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "[3/3] compiling optax.adan" in out and "round 1/1" in out and "vs optax.adamw" in out
