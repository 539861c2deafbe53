"""forward_mode: exact against unroll; the clipped recursion against numpy.

(Against bilevel.testing's exact T-step closed forms on drawn problems: in
tests/test_properties.py, in the same compiled program as unroll's check.)

Most of the time here is compilation, so the hypothesis properties run each example's method
in one `eqx.filter_jit` program that takes the drawn problem (its arrays) and the step size as
arguments, and the closed forms they are compared with in another, instead of compiling each
loop and operation eagerly; the other tests jit what they used to run eagerly.
"""

import unittest.mock

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst
from bilevel.testing import _check as _check_module

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")


def _call(exact, method):
    hg = bl.hypergrad(exact.problem, method)
    return hg(exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)


def _rel(a, b, floor=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), floor)


# ---- clip=None is exactly unroll's derivative -------------------------------------------------
# On drawn problems, forward_mode(unroll(optax.sgd(exact.lr), exact.steps)) equals bilevel.testing's
# exact T-step hypergradient and iterate (and clip_fraction is 0): checked in
# tests/test_properties.py::test_unrolled_methods_equal_the_exact_unrolled_hypergradient, in one
# compiled program per drawn problem with unroll, checkpointing and truncate. Below: equal to
# unroll for other optimizers, per-step data, jvp and hyper-Hessian.


def _ridge(seed=0, n=30, d=4, m=20):
    rng = np.random.default_rng(seed)
    train = (jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=n)))
    val = (jnp.asarray(rng.normal(size=(m, d))), jnp.asarray(rng.normal(size=m)))
    return train, val


def _inner(w, h, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(h["l2"]) * w**2)


def _outer(w, h, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.01 * jnp.sum(h["l2"] ** 2)  # a direct term


PROBLEM = bl.Problem(_inner, _outer)
TRAIN, VAL = _ridge()
HP = {"l2": jnp.array([0.1, -0.2, 0.3, 0.0])}
HP_LR = dict(HP, lr=jnp.asarray(0.05))
OPTIMIZERS = {
    "sgd": (optax.sgd(0.1), HP),
    "momentum": (optax.sgd(0.1, momentum=0.9), HP),
    "nesterov": (optax.sgd(0.05, momentum=0.9, nesterov=True), HP),
    "adam": (optax.adam(0.05), HP),
    # the learning rate is a hyperparameter, and lives in the optimizer state (its tangent
    # starts non-zero: d init/dλ)
    "adam_lr_in_state": (lambda h: optax.inject_hyperparams(optax.adam)(learning_rate=h["lr"]), HP_LR),
    "momentum_lr": (lambda h: optax.sgd(h["lr"], momentum=0.5), HP_LR),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_forward_mode_equals_unroll_for_any_optimizer(name):
    opt, hp = OPTIMIZERS[name]
    unroll = bl.unroll(opt, steps=40)
    want = jax.jit(bl.hypergrad(PROBLEM, unroll))(hp, jnp.zeros(4), TRAIN, VAL)
    got = jax.jit(bl.hypergrad(PROBLEM, bl.forward_mode(unroll)))(hp, jnp.zeros(4), TRAIN, VAL)
    for key in hp:
        assert _rel(got.grad[key], want.grad[key], floor=1e-12) < 1e-9, key
    np.testing.assert_allclose(got.value, want.value, rtol=1e-12)
    np.testing.assert_allclose(got.params, want.params, rtol=1e-12)


def test_forward_mode_per_step_data_equals_unroll():
    steps = 12
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(steps, 10, 4)))
    ys = jnp.asarray(rng.normal(size=(steps, 10)))
    data = bl.per_step((xs, ys))
    unroll = bl.unroll(optax.sgd(0.2, momentum=0.5), steps)
    want = jax.jit(bl.hypergrad(PROBLEM, unroll))(HP, jnp.zeros(4), data, VAL)
    got = jax.jit(bl.hypergrad(PROBLEM, bl.forward_mode(unroll)))(HP, jnp.zeros(4), data, VAL)
    assert _rel(got.grad["l2"], want.grad["l2"]) < 1e-9


def test_forward_mode_jvp_and_hyper_hessian_equal_unroll():
    unroll = bl.unroll(optax.sgd(0.1, momentum=0.5), steps=30)
    fwd = bl.forward_mode(unroll)
    direction = {"l2": jnp.array([1.0, -2.0, 0.5, 3.0])}

    def tangent(method):
        respond = bl.response(PROBLEM, method)
        return jax.jit(lambda hp: jax.jvp(lambda h: respond(h, jnp.zeros(4), TRAIN), (hp,), (direction,))[1])(HP)

    assert _rel(tangent(fwd), tangent(unroll)) < 1e-10

    def hessian(method):
        hg = bl.hypergrad(PROBLEM, method)
        return jax.jit(jax.hessian(lambda h: hg(h, jnp.zeros(4), TRAIN, VAL).value))(HP)["l2"]["l2"]

    assert _rel(hessian(fwd), hessian(unroll)) < 1e-9


# ---- the projection ---------------------------------------------------------------------------


def _numpy_clipped(exact, lam, lr, steps, radius):
    """Seed 004 eq. 9 on its quadratic, written out in numpy float64 (independent of bilevel)."""
    tb, tt, h = (np.asarray(x, np.float64) for x in (exact.theta_bar, exact.theta_tilde, exact.h))
    theta, y, clipped = np.zeros_like(tb), np.zeros_like(tb), 0
    for _ in range(steps):
        # ∂g_T/∂θ = (1 + λ)H, ∂g_T/∂λ = Hθ, g_T = H(θ − θ̄) + λHθ, all at θ_t
        y_new = y - lr * ((1 + lam) * h * y + h * theta)
        theta = theta - lr * (h * (theta - tb) + lam * h * theta)
        norm = np.linalg.norm(y_new)
        if norm > radius:
            y_new, clipped = radius / norm * y_new, clipped + 1
        y = y_new
    g_v = h * (theta - tt)
    return g_v @ y, clipped / steps, np.linalg.norm(y)


@eqx.filter_jit
def _clipped_forward_mode(exact, lr, steps, radius):
    """forward_mode(unroll(optax.sgd(lr), steps), clip=radius); lr traced, steps and radius static."""
    return _call(exact, bl.forward_mode(bl.unroll(optax.sgd(lr), steps), clip=radius))


@given(
    bst.quadratic004_problems(max_dim=6),
    st.floats(0.05, 4.0),
    st.integers(1, 60),
    st.floats(0.02, 0.3),
)
def test_clipped_recursion_matches_numpy(exact, radius, steps, lr_frac):
    lr = lr_frac / float(np.max(np.asarray(exact.h)) * (1 + float(exact.hparams)))
    out = _clipped_forward_mode(exact, np.asarray(lr), steps, radius)
    grad, frac, norm = _numpy_clipped(exact, float(exact.hparams), lr, steps, radius)
    assert abs(float(out.grad) - grad) <= 1e-9 * max(abs(grad), 1e-8)
    assert float(out.stats["clip_fraction"]) == pytest.approx(frac, abs=1e-12)
    assert float(out.stats["jacobian_norm"]) == pytest.approx(norm, rel=1e-9)
    assert float(out.stats["jacobian_norm"]) <= radius * (1 + 1e-12)


def test_clipping_shrinks_the_response_derivative_and_is_reported():
    exact = blt.Quadratic004.sample(0, dim=20)
    unroll = bl.unroll(optax.sgd(0.05), steps=400)
    free, tight, loose = eqx.filter_jit(lambda e: [_call(e, bl.forward_mode(unroll, clip=c)) for c in (None, 1.0, 1e6)])(exact)
    assert float(free.stats["jacobian_norm"]) > 2.0  # ‖dθ*/dλ‖ is in [3, 5] near λ†
    assert float(tight.stats["jacobian_norm"]) == pytest.approx(1.0, rel=1e-12)
    assert 0.5 < float(tight.stats["clip_fraction"]) <= 1.0
    assert float(loose.stats["clip_fraction"]) == 0.0
    np.testing.assert_array_equal(loose.grad, free.grad)


# ---- cost and memory structure ----------------------------------------------------------------


def _temp_bytes(method, d=1000):
    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    compiled = jax.jit(bl.hypergrad(problem, method)).lower(jnp.asarray(0.1), jnp.zeros(d), None, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.usefixtures("full_optimization")   # the default compiler pipeline
def test_memory_does_not_grow_with_steps():
    fwd = [_temp_bytes(bl.forward_mode(bl.unroll(optax.sgd(0.01), t))) for t in (1_000, 100_000)]
    rev = [_temp_bytes(bl.unroll(optax.sgd(0.01), t)) for t in (1_000, 100_000)]
    assert fwd[1] <= 1.5 * fwd[0]
    assert rev[1] >= 50 * rev[0]  # the control: reverse mode stores the trajectory
    assert fwd[0] < rev[0] / 10


def _jaxpr_size(n_hparams, steps=10):
    def inner(w, lam, _):
        return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.sum(jnp.exp(lam)) * w @ w

    problem = bl.Problem(inner, lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2))
    hg = bl.hypergrad(problem, bl.forward_mode(bl.unroll(optax.sgd(0.1), steps)))
    jaxpr = jax.make_jaxpr(hg)(jnp.zeros(n_hparams), jnp.zeros(3), None, None)
    return len(str(jaxpr).splitlines())


def test_program_size_does_not_grow_with_hparams_or_steps():
    """Tangents are batched (vmap), steps scanned: no Python loop over either."""
    assert _jaxpr_size(1) == _jaxpr_size(64) == _jaxpr_size(1, steps=10_000)


def test_jit_does_not_retrace_for_new_hparams():
    traces = []

    def inner(w, lam, _):
        traces.append(1)
        return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w

    problem = bl.Problem(inner, lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2))
    hg = jax.jit(bl.hypergrad(problem, bl.forward_mode(bl.unroll(optax.sgd(0.1), 20), clip=1.0)))
    hg(jnp.asarray(0.1), jnp.zeros(3), None, None)
    count = len(traces)
    for lam in (0.2, 0.5, 1.5):
        hg(jnp.asarray(lam), jnp.zeros(3), None, None)
    assert len(traces) == count


def test_vmap_over_hparams_equals_stacked_calls():
    hg = jax.jit(bl.hypergrad(PROBLEM, bl.forward_mode(bl.unroll(optax.adam(0.05), 30), clip=0.3)))
    hs = {"l2": jnp.stack([HP["l2"] + s for s in (-0.5, 0.0, 0.7)])}
    batched = jax.vmap(hg, in_axes=(0, None, None, None))(hs, jnp.zeros(4), TRAIN, VAL)
    for i in range(3):
        one = hg({"l2": hs["l2"][i]}, jnp.zeros(4), TRAIN, VAL)
        np.testing.assert_allclose(batched.grad["l2"][i], one.grad["l2"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(batched.stats["clip_fraction"][i], one.stats["clip_fraction"])


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, -1.0, True, "5", float("nan")])
def test_bad_clip_radius(clip):
    with pytest.raises(ValueError, match="radius r > 0"):
        bl.forward_mode(bl.unroll(optax.sgd(0.1), 10), clip=clip)


def test_forward_mode_requires_an_unroll():
    u = bl.unroll(optax.sgd(0.1), 10)
    for method in (bl.truncate(u, last=3), bl.implicit(u, bl.cg()), bl.forward_mode(u), "unroll"):
        with pytest.raises(TypeError, match=r"requires an unrolled method.*bilevel.forward_mode\(bilevel.unroll"):
            bl.forward_mode(method)


def test_other_transforms_reject_forward_mode():
    fwd = bl.forward_mode(bl.unroll(optax.sgd(0.1), 10))
    with pytest.raises(TypeError, match="truncate"):
        bl.truncate(fwd, last=3)
    with pytest.raises(TypeError, match="implicit"):
        bl.implicit(fwd, bl.cg())


def test_derivative_with_respect_to_params0_raises():
    respond = bl.response(PROBLEM, bl.forward_mode(bl.unroll(optax.sgd(0.1), 10)))
    with pytest.raises(ValueError, match="cannot differentiate with respect to params0"):
        jax.grad(lambda w0: jnp.sum(respond(HP, w0, TRAIN)))(jnp.zeros(4))


def test_per_step_data_of_the_wrong_length():
    data = bl.per_step((jnp.zeros((5, 10, 4)), jnp.zeros((5, 10))))
    hg = bl.hypergrad(PROBLEM, bl.forward_mode(bl.unroll(optax.sgd(0.1), 10)))
    with pytest.raises(ValueError, match="leading axis == steps=10"):
        hg(HP, jnp.zeros(4), data, VAL)


def test_assert_hypergrad_close_targets_the_unrolled_value_for_forward_mode():
    exact = blt.UnrolledQuadratic.sample(0, dim=4, steps=7)
    method = bl.forward_mode(bl.unroll(optax.sgd(float(exact.lr)), steps=7))
    # The helper's `hypergrad_error` runs compiled (the same function under eqx.filter_jit, one
    # program per method instead of ~50 eager operations); the helper's own logic runs as is.
    with unittest.mock.patch.object(_check_module, "hypergrad_error", eqx.filter_jit(_check_module.hypergrad_error)):
        blt.assert_hypergrad_close(method, exact, rtol=1e-9)  # auto target: the 7-step value
        with pytest.raises(AssertionError):  # a clipped one is compared with the IFT value instead
            blt.assert_hypergrad_close(bl.forward_mode(method.method, clip=1e-3), exact, rtol=1e-6)
