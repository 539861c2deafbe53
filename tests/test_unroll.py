"""unroll and truncate: against hand-written scans, finite differences and each other.

The hypergradients and the hand-written references are jitted (eagerly, each scan and
operation compiled on its own, they were most of this file's time).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")


def _ridge_data(seed=0, n=30, d=4, m=20):
    rng = np.random.default_rng(seed)
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    y, yv = rng.normal(size=n), rng.normal(size=m)
    return (jnp.asarray(X), jnp.asarray(y)), (jnp.asarray(Xv), jnp.asarray(yv))


def _inner(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w


def _outer(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


PROBLEM = bl.Problem(_inner, _outer)


def _hand_unroll(log_lam, w0, batch, lr, steps, keep_last=None):
    """Plain GD written directly with lax.scan (independent of bilevel)."""

    def step(w, _):
        return w - lr * jax.grad(_inner)(w, log_lam, batch), None

    if keep_last is None:
        return jax.lax.scan(step, w0, None, length=steps)[0]
    w = jax.lax.scan(step, w0, None, length=steps - keep_last)[0]
    w = jax.lax.stop_gradient(w)
    return jax.lax.scan(step, w, None, length=keep_last)[0]


def test_unroll_matches_hand_written_scan():
    tr, va = _ridge_data()
    w0 = jnp.full(4, 0.3)
    lam = jnp.asarray(-0.7)
    out = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), steps=37)))(lam, w0, tr, va)
    ref = lambda h: _outer(_hand_unroll(h, w0, tr, 0.1, 37), h, va)  # noqa: E731
    value, grad = jax.jit(jax.value_and_grad(ref))(lam)
    np.testing.assert_allclose(out.value, value, rtol=1e-12)
    np.testing.assert_allclose(out.grad, grad, rtol=1e-10)
    np.testing.assert_allclose(out.params, jax.jit(_hand_unroll, static_argnums=(3, 4))(lam, w0, tr, 0.1, 37),
                               rtol=1e-12)


def test_unroll_gradient_matches_finite_differences():
    tr, va = _ridge_data(1)
    w0 = jnp.zeros(4)
    lam = jnp.asarray(0.2)
    hg = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.adam(0.05), steps=60)))
    eps = 1e-6
    fd = (hg(lam + eps, w0, tr, va).value - hg(lam - eps, w0, tr, va).value) / (2 * eps)
    np.testing.assert_allclose(hg(lam, w0, tr, va).grad, fd, rtol=1e-6)


@pytest.mark.parametrize("steps,k", [(40, 5), (41, 5), (40, 40), (7, 1)])
def test_checkpoint_same_value_and_gradient(steps, k):
    tr, va = _ridge_data(2)
    w0 = jnp.zeros(4)
    lam = jnp.asarray(-1.0)
    plain = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.2), steps=steps)))(lam, w0, tr, va)
    ckpt = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.2), steps=steps, checkpoint=k)))(lam, w0, tr, va)
    np.testing.assert_allclose(ckpt.value, plain.value, rtol=1e-13)
    np.testing.assert_allclose(ckpt.grad, plain.grad, rtol=1e-11)


def test_checkpoint_rematerialises():
    """The checkpointed backward pass recomputes segments: the jaxpr holds a remat."""
    tr, va = _ridge_data()
    hg = bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), steps=100, checkpoint=10))
    jaxpr = str(jax.make_jaxpr(hg)(jnp.asarray(0.0), jnp.zeros(4), tr, va))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    plain = str(jax.make_jaxpr(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), steps=100)))(
        jnp.asarray(0.0), jnp.zeros(4), tr, va))
    assert "remat" not in plain and "checkpoint" not in plain


def test_truncate_last_equals_steps_is_unroll():
    tr, va = _ridge_data(3)
    w0, lam = jnp.zeros(4), jnp.asarray(-0.5)
    base = bl.unroll(optax.sgd(0.1), steps=30)
    a = jax.jit(bl.hypergrad(PROBLEM, base))(lam, w0, tr, va)
    b = jax.jit(bl.hypergrad(PROBLEM, bl.truncate(base, last=30)))(lam, w0, tr, va)
    np.testing.assert_allclose(b.grad, a.grad, rtol=1e-12)


@pytest.mark.parametrize("checkpoint", [None, 4])
def test_truncate_matches_hand_truncation(checkpoint):
    tr, va = _ridge_data(4)
    w0, lam = jnp.full(4, 0.1), jnp.asarray(-0.5)
    method = bl.truncate(bl.unroll(optax.sgd(0.1), steps=30, checkpoint=checkpoint), last=9)
    out = jax.jit(bl.hypergrad(PROBLEM, method))(lam, w0, tr, va)
    ref = jax.jit(jax.grad(lambda h: _outer(_hand_unroll(h, w0, tr, 0.1, 30, keep_last=9), h, va)))(lam)
    np.testing.assert_allclose(out.grad, ref, rtol=1e-10)
    full = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), steps=30)))(lam, w0, tr, va)
    np.testing.assert_allclose(out.value, full.value, rtol=1e-13)  # forward pass unchanged
    assert not np.allclose(out.grad, full.grad, rtol=1e-6)  # but the derivative is truncated


def test_per_step_batches_used_in_order():
    """Step t sees slice t: compare with a hand scan over the same minibatches."""
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.normal(size=(12, 8, 3)))
    ys = jnp.asarray(rng.normal(size=(12, 8)))
    va = (jnp.asarray(rng.normal(size=(10, 3))), jnp.asarray(rng.normal(size=10)))
    lam, w0 = jnp.asarray(0.1), jnp.zeros(3)

    def hand(h):
        def step(w, b):
            return w - 0.3 * jax.grad(_inner)(w, h, b), None

        return _outer(jax.lax.scan(step, w0, (xs, ys))[0], h, va)

    hand_value_and_grad = jax.jit(jax.value_and_grad(hand))
    hand_value, hand_grad = hand_value_and_grad(lam)
    for ckpt in (None, 5):
        out = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.3), 12, checkpoint=ckpt)))(
            lam, w0, bl.per_step((xs, ys)), va)
        np.testing.assert_allclose(out.value, hand_value, rtol=1e-12)
        np.testing.assert_allclose(out.grad, hand_grad, rtol=1e-10)
    # Reversed order gives a different answer: the order really is used.
    rev = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.3), 12)))(
        lam, w0, bl.per_step((xs[::-1], ys[::-1])), va)
    assert not np.allclose(rev.value, hand_value, rtol=1e-8)


def test_per_step_truncate_uses_last_batches():
    rng = np.random.default_rng(6)
    xs = jnp.asarray(rng.normal(size=(10, 6, 3)))
    ys = jnp.asarray(rng.normal(size=(10, 6)))
    va = (xs[0], ys[0])
    lam, w0 = jnp.asarray(0.1), jnp.zeros(3)

    def hand(h):
        def step(w, b):
            return w - 0.3 * jax.grad(_inner)(w, h, b), None

        w = jax.lax.stop_gradient(jax.lax.scan(step, w0, (xs[:6], ys[:6]))[0])
        return _outer(jax.lax.scan(step, w, (xs[6:], ys[6:]))[0], h, va)

    method = bl.truncate(bl.unroll(optax.sgd(0.3), 10), last=4)
    out = jax.jit(bl.hypergrad(PROBLEM, method))(lam, w0, bl.per_step((xs, ys)), va)
    np.testing.assert_allclose(out.grad, jax.jit(jax.grad(hand))(lam), rtol=1e-10)


def test_learning_rate_as_hyperparameter():
    """optimizer=fn(hparams): the learning rate is differentiated (finite differences)."""
    tr, va = _ridge_data(7)

    def inner(w, h, b):
        return _inner(w, h["log_lam"], b)

    def outer(w, h, b):
        return _outer(w, h["log_lam"], b)

    problem = bl.Problem(inner, outer)
    method = bl.unroll(lambda h: optax.sgd(h["lr"]), steps=25)
    hg = jax.jit(bl.hypergrad(problem, method))
    h = {"lr": jnp.asarray(0.15), "log_lam": jnp.asarray(-1.0)}
    out = hg(h, jnp.zeros(4), tr, va)
    eps = 1e-6
    fd = (hg({**h, "lr": h["lr"] + eps}, jnp.zeros(4), tr, va).value
          - hg({**h, "lr": h["lr"] - eps}, jnp.zeros(4), tr, va).value) / (2 * eps)
    np.testing.assert_allclose(out.grad["lr"], fd, rtol=1e-6)
    assert abs(float(out.grad["lr"])) > 1e-6


def test_no_retrace_when_hparams_change():
    tr, va = _ridge_data()
    count = {"n": 0}

    def inner(w, h, b):
        count["n"] += 1
        return _inner(w, h, b)

    hg = jax.jit(bl.hypergrad(bl.Problem(inner, _outer), bl.unroll(optax.sgd(0.1), 50)))
    hg(jnp.asarray(0.1), jnp.zeros(4), tr, va)
    after_first = count["n"]
    for v in (0.2, -3.0, 1.5):
        hg(jnp.asarray(v), jnp.zeros(4), tr, va)
    assert count["n"] == after_first > 0


def test_compiled_size_does_not_grow_with_steps():
    """lax.scan: the program for 10 steps and 10,000 steps has the same number of equations."""
    tr, va = _ridge_data()

    def size(steps):
        hg = bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), steps))
        return len(jax.make_jaxpr(hg)(jnp.asarray(0.1), jnp.zeros(4), tr, va).jaxpr.eqns)

    assert size(10) == size(10_000)


def test_grad_norm_stat_is_stationarity():
    tr, va = _ridge_data()
    short = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), 3)))(jnp.asarray(0.0), jnp.zeros(4), tr, va)
    long = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.5), 3000)))(jnp.asarray(0.0), jnp.zeros(4), tr, va)
    expected = jnp.linalg.norm(jax.grad(_inner)(short.params, 0.0, tr))
    np.testing.assert_allclose(short.stats["inner_grad_norm"], expected, rtol=1e-12)
    assert long.stats["inner_grad_norm"] < 1e-10 < short.stats["inner_grad_norm"]


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=r"steps.*>= 1.*got steps="):
        bl.unroll(optax.sgd(0.1), steps=steps)


def test_bad_steps_type():
    with pytest.raises(TypeError, match="steps.*Python int"):
        bl.unroll(optax.sgd(0.1), steps=10.0)


def test_bad_optimizer():
    with pytest.raises(TypeError, match="GradientTransformation"):
        bl.unroll("sgd", steps=10)


def test_bad_checkpoint():
    with pytest.raises(ValueError, match="checkpoint <= steps"):
        bl.unroll(optax.sgd(0.1), steps=10, checkpoint=11)
    with pytest.raises(ValueError, match="checkpoint"):
        bl.unroll(optax.sgd(0.1), steps=10, checkpoint=0)


def test_truncate_last_greater_than_steps():
    with pytest.raises(ValueError, match=r"K <= the unroll's steps; got last=11 with steps=10"):
        bl.truncate(bl.unroll(optax.sgd(0.1), 10), last=11)
    with pytest.raises(ValueError, match="last"):
        bl.truncate(bl.unroll(optax.sgd(0.1), 10), last=0)


def test_truncate_of_implicit_rejected():
    m = bl.implicit(bl.unroll(optax.sgd(0.1), 10), bl.cg())
    with pytest.raises(TypeError, match=r"truncate\(bilevel.unroll"):
        bl.truncate(m, last=5)


def test_per_step_wrong_length():
    tr, va = _ridge_data()
    xs = jnp.zeros((9, 30, 4))
    ys = jnp.zeros((9, 30))
    hg = bl.hypergrad(PROBLEM, bl.unroll(optax.sgd(0.1), 10))
    with pytest.raises(ValueError, match=r"leading axis == steps=10.*leading axis 9"):
        hg(jnp.asarray(0.0), jnp.zeros(4), bl.per_step((xs, ys)), va)


def test_optimizer_fn_returning_garbage():
    tr, va = _ridge_data()
    hg = bl.hypergrad(PROBLEM, bl.unroll(lambda h: 0.1, 10))
    with pytest.raises(TypeError, match="return an optax.GradientTransformation"):
        hg(jnp.asarray(0.0), jnp.zeros(4), tr, va)
