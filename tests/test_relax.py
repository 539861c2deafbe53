"""Dropout keep probabilities by coupled finite differences, and discrete choices by the
Gumbel-softmax relaxation (bilevel/_relax.py).

Stochastic estimates are compared with closed forms through the central limit theorem: the
mean of N independent estimates is within 5 standard errors (computed from the same samples)
of its expectation except with probability about 6e-7 per comparison, so a failure means a
biased estimator, not bad luck. The keys are fixed, so each test is also deterministic.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
from bilevel._cli_check_relax import (
    check_rows,
    dropout_problem,
    exhaustive_best_group,
    feature_group_problem,
    select_feature_group,
)
from bilevel._relax import coupled_bernoulli, dropout_expectation, gumbel_softmax

pytestmark = pytest.mark.usefixtures("quick_compilation")  # many small programs

Z = 5.0  # standard errors allowed between a mean of estimates and its exact expectation


def _within_clt(samples, exact, axis=0):
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(axis)
    se = samples.std(axis, ddof=1) / math.sqrt(samples.shape[axis])
    assert np.all(np.abs(mean - exact) <= Z * se), (mean, exact, se, (mean - exact) / se)
    return mean, se


# ---------------------------------------------------------------------------- coupled_bernoulli


def test_coupled_bernoulli_marginals_inclusion_and_the_product_formula():
    n = 200_000
    low, high = 0.3, 0.75
    lo, hi = coupled_bernoulli(jax.random.key(0), low, high, (n,))
    lo, hi = np.asarray(lo), np.asarray(hi)
    assert lo.dtype == np.bool_ and lo.shape == (n,)
    assert not np.any(lo & ~hi)  # mask_low ⊆ mask_high, always
    # The joint law of B(p₂)·B(p₁/p₂) (the ICLR 2018 formula): P(both) = p₂·p₁/p₂ = p₁,
    # P(high only) = p₂(1 − p₁/p₂) = p₂ − p₁, P(neither) = 1 − p₂. Each cell's frequency is a
    # mean of n Bernoulli indicators: 5 binomial standard errors.
    for observed, prob in [(lo & hi, low), (hi & ~lo, high - low), (~hi, 1 - high)]:
        se = math.sqrt(prob * (1 - prob) / n)
        assert abs(observed.mean() - prob) <= Z * se


def test_coupled_bernoulli_per_unit_probabilities_and_equal_bounds():
    n = 50_000
    low = jnp.array([0.0, 0.2, 0.5, 0.9])
    high = jnp.array([0.1, 0.2, 0.8, 1.0])
    lo, hi = coupled_bernoulli(jax.random.key(1), low, high, (n, 4))
    lo, hi = np.asarray(lo), np.asarray(hi)
    assert not np.any(lo & ~hi)
    assert np.array_equal(lo[:, 1], hi[:, 1])  # low == high: one mask
    assert not lo[:, 0].any() and hi[:, 3].all()  # p = 0 never keeps, p = 1 always does
    for mask, p in [(lo, np.asarray(low)), (hi, np.asarray(high))]:
        se = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(mask.mean(0) - p) <= Z * se + 1e-12)


def test_coupled_bernoulli_refuses_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="low ≤ high"):
        coupled_bernoulli(key, 0.8, 0.2, (3,))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        coupled_bernoulli(key, -0.1, 0.2, (3,))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        coupled_bernoulli(key, 0.1, float("nan"), (3,))
    with pytest.raises(TypeError, match="shape"):
        coupled_bernoulli(key, 0.1, 0.2, 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        coupled_bernoulli(key, jnp.full(4, 0.1), 0.2, (3,))
    with pytest.raises(TypeError, match="one JAX random key"):
        coupled_bernoulli(0, 0.1, 0.2, (3,))


# ---------------------------------------------------------------------------- dropout_expectation


def _estimates(loss, keep, w, n, *, eps=0.05, shape=None, seed=0):
    """n independent estimates of d E[loss]/d keep (one per key)."""
    shape = w.shape if shape is None else shape
    grad = jax.grad(lambda p, k: dropout_expectation(loss, p, (w,), k, eps=eps, shape=shape))
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(jax.vmap(grad, (None, 0)))(keep, keys))


KEEPS = (0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def shared():
    """On dropout_problem, one compiled program: 4000 estimates of dE L/dp at each p in KEEPS,
    and of the mixed partial ∂²E L/∂p∂w at p = 0.6 by reverse-over-reverse and
    forward-over-reverse (eps = 0.05)."""
    loss, w, exact = dropout_problem()
    f = lambda p, w, k: dropout_expectation(loss, p, (w,), k, eps=0.05, shape=w.shape)
    keys = jax.random.split(jax.random.key(0), 4000)

    @jax.jit
    def run(keeps, keys):
        grads = jax.vmap(jax.vmap(jax.grad(f), (None, None, 0)), (0, None, None))(keeps, w, keys)
        rev = jax.vmap(jax.grad(jax.grad(f, 0), 1), (None, None, 0))(keeps[1], w, keys)
        fwd = jax.vmap(jax.jacfwd(jax.grad(f, 1), 0), (None, None, 0))(keeps[1], w, keys)
        return grads, rev, fwd

    grads, rev, fwd = (np.asarray(x) for x in run(jnp.asarray(KEEPS), keys))
    return {"loss": loss, "w": w, "exact": exact, "grads": grads, "rev": rev, "fwd": fwd, "keys": keys}


def test_value_is_one_dropout_sample():
    loss, w, _ = dropout_problem()
    key = jax.random.key(3)
    u = np.asarray(jax.random.uniform(key, w.shape, dtype=jnp.float64))
    got = dropout_expectation(loss, 0.6, (w,), key)  # shape defaults to keep's: a scalar mask
    assert got.shape == ()
    value = dropout_expectation(loss, 0.6, (w,), key, shape=w.shape)
    assert float(value) == pytest.approx(float(loss(jnp.asarray(u < 0.6, jnp.float64), w)), rel=1e-14)


def test_shared_keep_estimate_is_unbiased_for_a_quadratic_expectation(shared):
    # E L is a quadratic in p (dropout_problem's docstring), so its central difference is the
    # exact derivative: the estimates' mean must match it within the CLT bound.
    for keep, samples in zip(KEEPS, shared["grads"]):
        _within_clt(samples, shared["exact"](keep))


def test_per_unit_keep_is_unbiased_for_any_loss_even_at_the_boundary():
    # With one probability per unit, E L is affine in each p_i, so the coupled difference is
    # unbiased for any fn and any eps, also when p_i ± eps is clamped to [0, 1]. The exact
    # ∂E L/∂p_i = E[L | m_i = 1] − E[L | m_i = 0] comes from enumerating all 2⁴ masks in NumPy.
    rng = np.random.default_rng(4)
    X, w = rng.normal(size=(10, 4)), rng.normal(size=4)
    keep = np.array([0.02, 0.35, 0.7, 0.99])

    def loss(mask, w):
        return jnp.log1p(jnp.sum((jnp.asarray(X) @ (mask * w)) ** 2))

    def loss_np(mask):
        return np.log1p(np.sum((X @ (mask * w)) ** 2))

    exact = np.zeros(4)
    for bits in itertools.product([0.0, 1.0], repeat=4):
        m = np.array(bits)
        for i in range(4):
            others = np.prod([keep[j] if m[j] else 1 - keep[j] for j in range(4) if j != i])
            exact[i] += (1 if m[i] else -1) * others * loss_np(m)
    samples = _estimates(loss, jnp.asarray(keep), jnp.asarray(w), 4000, eps=0.3)
    _within_clt(samples, exact)


def test_coupled_masks_have_much_lower_variance_than_independent_ones(shared):
    # The same central difference with independent masks for p ± eps (the paper's first
    # version): both estimators have the same mean; the coupled one differs only on the units
    # in the band p − eps ≤ u < p + eps, so its variance is O(1/eps) against O(1/eps²).
    loss, w, exact = shared["loss"], shared["w"], shared["exact"]
    keep, eps, n = 0.6, 0.05, 4000
    coupled = shared["grads"][1]

    def independent(key):
        k1, k2 = jax.random.split(key)
        m_plus = jax.random.bernoulli(k1, keep + eps, w.shape).astype(w.dtype)
        m_minus = jax.random.bernoulli(k2, keep - eps, w.shape).astype(w.dtype)
        return (loss(m_plus, w) - loss(m_minus, w)) / (2 * eps)

    indep = np.asarray(jax.jit(jax.vmap(independent))(jax.random.split(jax.random.key(9), n)))
    _within_clt(indep, exact(keep))  # the comparison is between two unbiased estimators
    ratio = coupled.var() / indep.var()
    assert ratio < 0.5, ratio  # measured 0.19, about eps/(p(1 − p)) = 0.21 (docs/guide/dropout_discrete.md)


def test_mixed_partial_is_the_difference_of_gradients_and_unbiased(shared):
    # ∂²E L/∂p∂w = −2b + 4p Gw + 2(1 − 2p) diag(G) ⊙ w for dropout_problem (differentiate
    # its closed-form dE L/dp in w); reverse-over-reverse and forward-over-reverse agree.
    loss, w = shared["loss"], shared["w"]
    rng = np.random.default_rng(0)  # dropout_problem(seed=0)'s draws, in its order
    X = rng.normal(size=(30, 6))
    wn = rng.normal(size=6)
    y = X @ (wn + 0.5 * rng.normal(size=6)) + 0.1 * rng.normal(size=30)
    np.testing.assert_array_equal(wn, np.asarray(w))
    G, b = X.T @ X / 30, X.T @ y / 30
    keep = KEEPS[1]
    exact = -2 * b + 4 * keep * G @ wn + 2 * (1 - 2 * keep) * np.diag(G) * wn
    rev, fwd = shared["rev"], shared["fwd"]
    np.testing.assert_allclose(rev, fwd, rtol=1e-12, atol=1e-12)
    _within_clt(rev, exact)

    # One key by hand: the difference of the gradients at the coupled masks, over 2 eps.
    u = jax.random.uniform(shared["keys"][0], w.shape, dtype=jnp.float64)
    grad_w = jax.jit(jax.grad(loss, 1))
    by_hand = (grad_w((u < keep + 0.05).astype(float), w) - grad_w((u < keep - 0.05).astype(float), w)) / 0.1
    np.testing.assert_allclose(rev[0], by_hand, rtol=1e-12, atol=1e-12)


def test_forward_mode_equals_reverse_mode_and_the_difference_by_hand():
    loss, w, _ = dropout_problem()
    key = jax.random.key(6)  # a unit falls in the band 0.35 ≤ u < 0.45
    f = lambda p, w: dropout_expectation(loss, p, (w,), key, shape=w.shape)

    @jax.jit
    def run(p, w):
        u = jax.random.uniform(key, w.shape, dtype=jnp.float64)
        by_hand = (loss((u < p + 0.05).astype(float), w) - loss((u < p - 0.05).astype(float), w)) / 0.1
        tangent = jax.jvp(lambda p: f(p, w), (p,), (1.0,))[1]
        grad_p, grad_w = jax.grad(f, (0, 1))(p, w)
        return tangent, grad_p, by_hand, grad_w, jax.grad(loss, 1)((u < p).astype(float), w)

    tangent, grad_p, by_hand, grad_w, autodiff = run(0.4, w)
    assert float(by_hand) != 0.0
    assert float(tangent) == pytest.approx(float(grad_p), rel=1e-13)
    assert float(tangent) == pytest.approx(float(by_hand), rel=1e-13)
    np.testing.assert_allclose(grad_w, autodiff, rtol=1e-13)  # in w: autodiff at the drawn mask


def test_keep_in_the_inner_loss_works_with_implicit_unroll_and_forward_mode():
    # Inner: ridge with dropout on the inputs at one fixed draw u (the key is in the batch);
    # outer: validation MSE. Under the estimator's rule the hypergradient is
    # −∇L_Vᵀ H⁻¹ (∇_w L_T(m₊) − ∇_w L_T(m₋))/(2 eps) at w* (dense NumPy below); implicit
    # differentiation must give it to rounding, unrolled gradient descent (reverse and
    # forward mode, which must agree with each other) after enough steps.
    rng = np.random.default_rng(7)
    n, d, alpha, eps, keep = 40, 5, 0.1, 0.2, 0.5
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    beta = rng.normal(size=d)
    y, yv = X @ beta + 0.3 * rng.normal(size=n), Xv @ beta + 0.3 * rng.normal(size=n)
    key = jax.random.key(16)
    u = np.asarray(jax.random.uniform(key, (d,), dtype=jnp.float64))

    def fit(mask, w, A, b):
        return jnp.mean((b - A @ (mask * w)) ** 2) + alpha * w @ w

    def inner(w, p, batch):
        A, b, k = batch
        return dropout_expectation(fit, p, (w, A, b), k, eps=eps, shape=(d,))

    def outer(w, p, batch):
        A, b = batch
        return jnp.mean((b - A @ w) ** 2)

    def closed_form(p, w0, batch):  # the minimiser at the drawn mask
        A, b, k = batch
        m = (jax.random.uniform(k, (d,), dtype=jnp.float64) < p).astype(jnp.float64)
        Am = A * m
        return jnp.linalg.solve(Am.T @ Am / n + alpha * jnp.eye(d), Am.T @ b / n)

    def grad_fit(m, w):
        return -2 * (X * m).T @ (y - X @ (m * w)) / n + 2 * alpha * w

    m = (u < keep).astype(float)
    Xm = X * m
    H = 2 * Xm.T @ Xm / n + 2 * alpha * np.eye(d)
    w_star = np.linalg.solve(Xm.T @ Xm / n + alpha * np.eye(d), Xm.T @ y / n)
    cross = (grad_fit((u < keep + eps).astype(float), w_star) - grad_fit((u < keep - eps).astype(float), w_star)) / (2 * eps)
    grad_v = -2 * Xv.T @ (yv - Xv @ w_star) / n
    expected = -grad_v @ np.linalg.solve(H, cross)
    assert np.any(np.abs(u - keep) < eps) and abs(expected) > 1e-2  # units in the band: non-trivial

    problem = bl.Problem(inner=inner, outer=outer)
    batch, vbatch = (jnp.asarray(X), jnp.asarray(y), key), (jnp.asarray(Xv), jnp.asarray(yv))
    w0, p = jnp.zeros(d), jnp.asarray(keep)
    implicit = jax.jit(bl.hypergrad(problem, bl.implicit(bl.solver(closed_form), bl.exact())))(p, w0, batch, vbatch)
    assert float(implicit.grad) == pytest.approx(expected, rel=1e-9)

    lr = 1.0 / np.linalg.eigvalsh(H).max()
    unroll = bl.unroll(optax.sgd(lr), steps=1500)
    rev = jax.jit(bl.hypergrad(problem, unroll))(p, w0, batch, vbatch)
    fwd = jax.jit(bl.hypergrad(problem, bl.forward_mode(unroll)))(p, w0, batch, vbatch)
    assert float(fwd.grad) == pytest.approx(float(rev.grad), rel=1e-10)
    # contraction factor 1 − lr·λ_min(H) per step: after 1500 steps the unrolled derivative
    # has converged to the implicit one far below 1e-6
    assert (1 - lr * np.linalg.eigvalsh(H).min()) ** 1500 < 1e-9
    assert float(rev.grad) == pytest.approx(expected, rel=1e-6)


def test_out_of_range_keep_gives_nan_when_traced():
    loss, w, _ = dropout_problem()
    key = jax.random.key(0)
    f = jax.jit(jax.value_and_grad(
        lambda p, w: dropout_expectation(loss, p, (w,), key, shape=w.shape), argnums=(0, 1)))
    for bad in (1.2, -0.1, float("nan")):
        value, (gp, gw) = f(bad, w)
        assert np.isnan(value) and np.isnan(gp) and np.all(np.isnan(gw)), bad
    value, (gp, gw) = f(1.0, w)  # the boundary is allowed: a one-sided difference
    assert np.isfinite(value) and np.isfinite(gp) and np.all(np.isfinite(gw))


def test_changing_keep_does_not_recompile():
    loss, w, _ = dropout_problem()
    traces = []

    @jax.jit
    def f(p, key):
        traces.append(1)
        return jax.grad(lambda p: dropout_expectation(loss, p, (w,), key, shape=w.shape))(p)

    for p in (0.2, 0.5, 0.8):
        f(jnp.asarray(p), jax.random.key(0))
    assert len(traces) == 1


def test_dropout_expectation_refuses_bad_arguments():
    loss, w, _ = dropout_problem()
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="requires `fn`"):
        dropout_expectation("loss", 0.5, (w,), key)
    with pytest.raises(TypeError, match="a tuple of fn's other inputs"):
        dropout_expectation(loss, 0.5, w, key)
    with pytest.raises(TypeError, match="one JAX random key"):
        dropout_expectation(loss, 0.5, (w,), 3, shape=w.shape)
    for eps in (0.0, -0.1, 0.6, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="0 < eps ≤ 0.5"):
            dropout_expectation(loss, 0.5, (w,), key, eps=eps, shape=w.shape)
    for keep in (1.5, -0.2, float("nan"), jnp.array([0.5, 2.0])):
        with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
            dropout_expectation(loss, keep, (w,), key, shape=w.shape)
    with pytest.raises(TypeError, match="float number or array"):
        dropout_expectation(loss, True, (w,), key, shape=w.shape)
    with pytest.raises(ValueError, match="does not broadcast to the mask shape"):
        dropout_expectation(loss, jnp.full(4, 0.5), (w,), key, shape=w.shape)
    with pytest.raises(TypeError, match="tuple of non-negative ints"):
        dropout_expectation(loss, 0.5, (w,), key, shape=6)
    with pytest.raises(TypeError, match="return one float array"):
        dropout_expectation(lambda m, w: (m * w > 0), 0.5, (w,), key, shape=w.shape)


# ---------------------------------------------------------------------------- gumbel_softmax


def test_gumbel_softmax_is_on_the_simplex_along_the_axis():
    logits = jnp.log(jnp.array([[0.5, 0.3], [0.25, 0.2], [0.25, 0.5]]))
    y = jax.jit(lambda k: gumbel_softmax(k, logits, 0.7, axis=0))(jax.random.key(0))
    assert y.shape == (3, 2) and np.all(np.asarray(y) > 0)
    np.testing.assert_allclose(y.sum(0), 1.0, rtol=1e-14)
    # −inf marks an impossible option: it gets exactly 0
    y = jax.jit(lambda k: gumbel_softmax(k, jnp.array([0.0, -jnp.inf, 1.0]), 0.5))(jax.random.key(1))
    assert float(y[1]) == 0.0 and float(y.sum()) == pytest.approx(1.0, rel=1e-14)


def test_argmax_of_samples_follows_softmax_of_logits():
    # The Gumbel-max trick: argmax(logits + g) ~ Categorical(softmax(logits)), for any
    # temperature. Each option's frequency over n samples: 5 binomial standard errors.
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    keys = jax.random.split(jax.random.key(2), n)
    y = jax.jit(jax.vmap(lambda k: gumbel_softmax(k, jnp.log(jnp.asarray(probs)) + 3.0, 2.0)))(keys)
    freq = np.bincount(np.asarray(y.argmax(-1)), minlength=4) / n
    assert np.all(np.abs(freq - probs) <= Z * np.sqrt(probs * (1 - probs) / n)), freq


def test_zero_temperature_limit_is_the_one_hot_of_the_perturbed_argmax():
    logits = jnp.array([0.3, -0.2, 0.1, 0.0])
    keys = jax.random.split(jax.random.key(3), 200)
    tau = 1e-3
    y, perturbed = (np.asarray(a) for a in jax.jit(jax.vmap(lambda k: (
        gumbel_softmax(k, logits, tau), logits + jax.random.gumbel(k, (4,), dtype=jnp.float64))))(keys))
    top2 = np.sort(perturbed, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.03  # then the others' weights are ≤ 3 e^{−30}
    assert clear.mean() > 0.9
    one_hot = np.eye(4)[perturbed.argmax(1)]
    np.testing.assert_allclose(y[clear], one_hot[clear], atol=1e-12)


def test_hard_mode_is_exactly_one_hot_with_the_soft_gradient():
    logits = jnp.array([0.2, 0.5, -0.1])
    key = jax.random.key(4)

    @jax.jit
    def run(tau):
        soft = gumbel_softmax(key, logits, tau)
        hard = gumbel_softmax(key, logits, tau, hard=True)
        j_soft = jax.jacrev(lambda l: gumbel_softmax(key, l, tau))(logits)
        j_hard = jax.jacrev(lambda l: gumbel_softmax(key, l, tau, hard=True))(logits)
        return soft, hard, j_soft, j_hard

    for tau in (0.3, 1.0, 5.0):
        soft, hard, j_soft, j_hard = run(tau)
        assert np.array_equal(np.asarray(hard), np.eye(3)[int(soft.argmax())])  # exact 0s and 1s
        np.testing.assert_array_equal(j_hard, j_soft)
        assert np.abs(np.asarray(j_soft)).max() > 1e-6  # a non-trivial gradient


def test_gumbel_softmax_nan_and_traced_temperature():
    key = jax.random.key(0)
    assert np.all(np.isnan(gumbel_softmax(key, jnp.array([0.0, jnp.nan]), 1.0)))
    assert np.all(np.isnan(gumbel_softmax(key, jnp.array([0.0, jnp.nan]), 1.0, hard=True)))
    f = jax.jit(lambda t: gumbel_softmax(key, jnp.zeros(3), t))
    assert np.all(np.isnan(f(0.0))) and np.all(np.isnan(f(-1.0)))


def test_gumbel_softmax_refuses_bad_arguments():
    key = jax.random.key(0)
    for tau in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature` > 0 and finite"):
            gumbel_softmax(key, jnp.zeros(3), tau)
    with pytest.raises(ValueError, match="at least one dimension"):
        gumbel_softmax(key, 0.0, 1.0)
    with pytest.raises(ValueError, match="requires `axis`"):
        gumbel_softmax(key, jnp.zeros(3), 1.0, axis=1)
    with pytest.raises(TypeError, match="`hard` to be True or False"):
        gumbel_softmax(key, jnp.zeros(3), 1.0, hard="yes")
    with pytest.raises(TypeError, match="one JAX random key"):
        gumbel_softmax(jnp.zeros(3), jnp.zeros(3), 1.0)
    with pytest.raises(TypeError, match="real float"):
        gumbel_softmax(key, jnp.zeros(3, jnp.complex64), 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        gumbel_softmax(key, jnp.zeros(3), jnp.ones(2))


# ---------------------------------------------------------------------------- a discrete choice


def test_hypergradient_on_gumbel_logits_picks_the_exhaustive_search_winner():
    # Four problems whose best group (by ridge on each group alone, NumPy) differs: 0, 1, 2, 3.
    groups, size, alpha = 4, 3, 0.1
    problems = [feature_group_problem(seed, groups, size) for seed in range(4)]
    best = [exhaustive_best_group(*p, groups, size, alpha) for p in problems]
    assert sorted(best) == [0, 1, 2, 3]
    stacked = [np.stack(a) for a in zip(*problems)]
    logits = select_feature_group(*stacked, groups, size, alpha=alpha)
    assert list(logits.argmax(1)) == best
    # and decisively: the chosen option's probability softmax(λ) is above 0.5 in each problem
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.all(probs.max(1) > 0.5), probs


def test_check_rows():
    rows = check_rows(True)
    assert [r["exact"] for r in rows] == [False, True]
    for r in rows:
        assert set(r) == {"name", "value", "target", "rel_error", "exact", "note"}
    dropout, selection = rows
    assert dropout["rel_error"] < 0.2 and "standard error" in dropout["note"]
    assert selection["value"] == selection["target"]
