"""Outer objectives: k-fold cross-validation (kfold, stack_folds), the Laplace evidence
(laplace_evidence) and the ELBO of a diagonal Gaussian q (gaussian_elbo, gaussian_q), against
the closed forms of bilevel.testing.KFoldRidge and BayesianLinearRegression (NumPy float64, no
autodiff) and float64 finite differences of those closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import bilevel as bl
from bilevel._objectives import (
    gaussian_elbo,
    gaussian_q,
    kfold,
    laplace_evidence,
    stack_folds,
)
from bilevel.testing._bayes import BayesianLinearRegression, KFoldRidge
from bilevel.testing._ridge import _ridge_inner, _ridge_outer

pytestmark = pytest.mark.usefixtures("quick_compilation")

SEEDS = (0, 1, 2)


def _map_fit(h, w0, batch):
    """The MAP of Bayesian linear regression, (αI + βXᵀX)⁻¹βXᵀy, as a forward solver."""
    X, y = batch
    A = jnp.exp(h[0]) * jnp.eye(X.shape[1]) + jnp.exp(h[1]) * X.T @ X
    return jnp.linalg.solve(A, jnp.exp(h[1]) * X.T @ y)


def _q_fit(h, q0, batch):
    """The optimal diagonal q (mean = MAP, σ_i² = 1/A_ii) as a forward solver."""
    X, _ = batch
    A = jnp.exp(h[0]) * jnp.eye(X.shape[1]) + jnp.exp(h[1]) * X.T @ X
    return {"mean": _map_fit(h, None, batch), "log_std": -0.5 * jnp.log(jnp.diag(A))}


def _newton(loss, iterations=30):
    """A forward solver: Newton's method on the flattened parameters (lax.fori_loop)."""
    def fit(h, p0, batch):
        flat0, unravel = ravel_pytree(p0)
        f = lambda v: loss(unravel(v), h, batch)  # noqa: E731
        step = lambda _, v: v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v))  # noqa: E731
        return unravel(jax.lax.fori_loop(0, iterations, step, flat0))
    return fit


def _fd(fn, h, eps=1e-6):
    """Central float64 finite differences of a scalar NumPy function of a vector."""
    h = np.asarray(h, np.float64)
    return np.array([(fn(h + eps * e) - fn(h - eps * e)) / (2 * eps) for e in np.eye(h.size)])


# ----------------------------------------------------------------------------------------------
# k-fold cross-validation.
# ----------------------------------------------------------------------------------------------

CV_METHOD = bl.implicit(bl.unroll(optax.sgd(0.2), steps=300), bl.exact())
CV_HG = {k: jax.jit(bl.hypergrad(KFoldRidge.sample(0, k=k, n=20).problem, CV_METHOD)) for k in (2, 4, 5)}


@pytest.mark.parametrize("k", (2, 4, 5))
@pytest.mark.parametrize("seed", SEEDS)
def test_kfold_cv_hypergradient_equals_the_mean_of_per_fold_closed_forms(k, seed):
    cv = KFoldRidge.sample(seed, n=20, dim=3, k=k, log_lam=-1.0 + 0.5 * seed)
    out = CV_HG[k](cv.hparams, cv.params0, cv.batch, cv.batch)
    np.testing.assert_allclose(out.grad, cv.hypergrad(cv.hparams), rtol=1e-8)
    np.testing.assert_allclose(out.value, cv.value(cv.hparams), rtol=1e-10)
    np.testing.assert_allclose(out.params, cv.response(cv.hparams), rtol=1e-9, atol=1e-12)


def test_kfold_losses_are_the_sum_of_fold_fits_and_the_mean_of_fold_validations():
    cv = KFoldRidge.sample(3, n=12, dim=2, k=3)
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((3, 2))
    X, y = np.asarray(cv.X), np.asarray(cv.y)
    lam = float(cv.log_lam)
    folds = np.split(np.arange(12), 3)
    train = sum(0.5 * np.mean((np.delete(X, f, 0) @ w - np.delete(y, f)) ** 2) + 0.5 * math.exp(lam) * w @ w
                for w, f in zip(theta, folds))
    val = np.mean([0.5 * np.mean((X[f] @ w - y[f]) ** 2) for w, f in zip(theta, folds)])
    np.testing.assert_allclose(cv.problem.inner(jnp.asarray(theta), cv.log_lam, cv.batch), train, rtol=1e-12)
    np.testing.assert_allclose(cv.problem.outer(jnp.asarray(theta), cv.log_lam, cv.batch), val, rtol=1e-12)


def test_kfold_accepts_pytree_parameters_and_data():
    def train(p, lam, batch):
        r = batch["X"] @ p["w"] + p["b"] - batch["y"]
        return 0.5 * jnp.sum(r**2) + 0.5 * jnp.exp(lam) * p["w"] @ p["w"]

    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((9, 2)), rng.standard_normal(9)
    theta = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.standard_normal(3))}
    folds = np.split(np.arange(9), 3)
    expected = sum(0.5 * np.sum((np.delete(X, f, 0) @ w + b - np.delete(y, f)) ** 2) + 0.5 * math.exp(0.2) * w @ w
                   for w, b, f in zip(np.asarray(theta["w"]), np.asarray(theta["b"]), folds))
    value = kfold(train, train, k=3).inner(theta, jnp.asarray(0.2), {"X": jnp.asarray(X), "y": jnp.asarray(y)})
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_kfold_seed_permutes_examples_before_splitting():
    cv = KFoldRidge.sample(4, n=20, dim=3, k=4)
    perm = np.random.default_rng(7).permutation(20)
    shuffled = KFoldRidge(cv.X[perm], cv.y[perm], cv.log_lam, 4)   # contiguous folds of permuted data
    problem = kfold(_ridge_inner, _ridge_outer, k=4, seed=7)
    out = jax.jit(bl.hypergrad(problem, CV_METHOD))(cv.hparams, cv.params0, cv.batch, cv.batch)
    np.testing.assert_allclose(out.grad, shuffled.hypergrad(cv.hparams), rtol=1e-8)
    assert not np.isclose(shuffled.hypergrad(cv.hparams), cv.hypergrad(cv.hparams), rtol=1e-3)


def test_kfold_new_hyperparameters_do_not_retrace_and_nan_data_gives_nan():
    traces = []

    def train(w, lam, batch):
        traces.append(1)
        return _ridge_inner(w, lam, batch)

    cv = KFoldRidge.sample(0, n=8, dim=2, k=2)
    hg = jax.jit(bl.hypergrad(kfold(train, _ridge_outer, k=2), bl.implicit(bl.unroll(optax.sgd(0.2), 50), bl.exact())))
    hg(jnp.asarray(-1.0), cv.params0, cv.batch, cv.batch)
    count = len(traces)
    out = hg(jnp.asarray(0.5), cv.params0, cv.batch, cv.batch)
    assert len(traces) == count and np.isfinite(out.grad)
    bad = (cv.X, cv.y.at[3].set(jnp.nan))
    assert np.isnan(hg(jnp.asarray(0.5), cv.params0, bad, bad).grad)


def test_stack_folds_repeats_every_leaf():
    theta = stack_folds({"w": jnp.arange(3.0), "b": jnp.asarray(2.0)}, 4)
    np.testing.assert_array_equal(theta["w"], np.tile(np.arange(3.0), (4, 1)))
    np.testing.assert_array_equal(theta["b"], np.full(4, 2.0))


def test_kfold_bad_arguments_are_refused():
    X, y = jnp.ones((10, 2)), jnp.ones(10)
    with pytest.raises(TypeError, match="train_loss"):
        kfold(3, _ridge_outer)
    with pytest.raises(TypeError, match="val_loss"):
        kfold(_ridge_inner, None)
    with pytest.raises(ValueError, match="k >= 2"):
        kfold(_ridge_inner, _ridge_outer, k=1)
    with pytest.raises(TypeError, match="integer k"):
        kfold(_ridge_inner, _ridge_outer, k=2.0)
    with pytest.raises(ValueError, match="seed >= 0"):
        kfold(_ridge_inner, _ridge_outer, k=2, seed=-1)
    p = kfold(_ridge_inner, _ridge_outer, k=4)
    theta = stack_folds(jnp.zeros(2), 4)
    with pytest.raises(ValueError, match="divisible by k"):
        p.inner(theta, 0.0, (X, y))
    with pytest.raises(ValueError, match="at least k=4 examples"):
        p.outer(theta, 0.0, (X[:3], y[:3]))
    with pytest.raises(ValueError, match="same number of examples"):
        p.inner(theta, 0.0, (X[:8], y))
    with pytest.raises(ValueError, match="leading example axis"):
        p.inner(theta, 0.0, (X[:8], jnp.asarray(1.0)))
    with pytest.raises(ValueError, match="leading fold axis of size k=4"):
        p.inner(jnp.zeros((3, 2)), 0.0, (X[:8], y[:8]))
    with pytest.raises(ValueError, match="stack_folds"):
        bl.hypergrad(p, CV_METHOD)(jnp.asarray(0.0), jnp.zeros(2), (X[:8], y[:8]), (X[:8], y[:8]))
    with pytest.raises(TypeError, match="scalar per model"):
        kfold(lambda w, h, b: b[0] @ w, _ridge_outer, k=2).inner(jnp.zeros((2, 2)), 0.0, (X, y))
    with pytest.raises(ValueError, match="k >= 2"):
        stack_folds(jnp.zeros(2), 1)
    with pytest.raises(TypeError, match="floating-point arrays"):
        stack_folds(jnp.zeros(2, int), 3)
    with pytest.raises(ValueError, match="n divisible by k"):
        KFoldRidge.sample(0, n=10, k=4)


# ----------------------------------------------------------------------------------------------
# Bayesian linear regression: the closed forms themselves.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_closed_form_evidence_and_elbo_gradients_equal_finite_differences(seed):
    blr = BayesianLinearRegression.sample(seed, n=25, dim=4)
    h = np.array([0.3 * seed - 0.5, 1.0])
    np.testing.assert_allclose(blr.log_evidence_grad(h), _fd(blr.log_evidence, h), rtol=1e-6)
    np.testing.assert_allclose(blr.elbo_grad(h), _fd(blr.elbo, h), rtol=1e-6)
    # the bound: ELBO <= log evidence, strictly for a correlated posterior
    assert blr.elbo(h) < blr.log_evidence(h)
    # the optimal diagonal q maximises the ELBO: any perturbation of it lowers the bound
    q = blr.optimal_q(h)
    for key in ("mean", "log_std"):
        moved = dict(q, **{key: q[key] + 1e-3})
        assert blr.elbo(h, moved) < blr.elbo(h)


def test_mackay_fixed_point_zeroes_the_evidence_gradient():
    blr = BayesianLinearRegression.sample(5, n=40, dim=3)
    h = blr.mackay()
    np.testing.assert_allclose(blr.log_evidence_grad(h), 0.0, atol=1e-9)
    assert blr.log_evidence(h) > blr.log_evidence(h + np.array([0.05, -0.05]))


# ----------------------------------------------------------------------------------------------
# Laplace evidence.
# ----------------------------------------------------------------------------------------------

LAPLACE_SOLVER = jax.jit(bl.hypergrad(BayesianLinearRegression.sample(0).evidence_problem,
                                      bl.implicit(bl.solver(_map_fit), bl.exact())))
_S = BayesianLinearRegression.sample(0).neg_log_joint
LAPLACE_UNROLL = jax.jit(bl.hypergrad(
    bl.Problem(inner=lambda w, h, b: _S(w, h, b) / b[0].shape[0], outer=laplace_evidence(_S)),
    bl.implicit(bl.unroll(optax.sgd(0.1), steps=400), bl.exact())))


@pytest.mark.parametrize("seed", SEEDS)
def test_laplace_evidence_value_and_hypergradient_equal_the_exact_log_evidence(seed):
    blr = BayesianLinearRegression.sample(seed, n=30, dim=3)
    h = jnp.asarray([0.4 * seed - 0.3, 0.5])
    out = LAPLACE_SOLVER(h, blr.params0, blr.batch, blr.batch)
    np.testing.assert_allclose(out.value, -blr.log_evidence(h), rtol=1e-10)
    np.testing.assert_allclose(out.grad, -blr.log_evidence_grad(h), rtol=1e-8)
    np.testing.assert_allclose(out.params, blr.map(h), rtol=1e-10)


def test_laplace_evidence_with_an_unrolled_map_fit():
    # inner S/n (same minimiser, step size independent of n); 400 SGD steps reach it to ~1e-15
    blr = BayesianLinearRegression.sample(1, n=30, dim=3)
    out = LAPLACE_UNROLL(blr.hparams, blr.params0, blr.batch, blr.batch)
    np.testing.assert_allclose(out.value, -blr.log_evidence(blr.hparams), rtol=1e-10)
    np.testing.assert_allclose(out.grad, -blr.log_evidence_grad(blr.hparams), rtol=1e-8)


def test_laplace_evidence_flattens_pytree_parameters():
    blr = BayesianLinearRegression.sample(2, n=15, dim=3)
    S = lambda p, h, b: blr.neg_log_joint(jnp.concatenate([p["a"], p["b"]]), h, b)  # noqa: E731
    w = jnp.asarray(blr.map(blr.hparams))
    value = jax.jit(laplace_evidence(S))({"a": w[:1], "b": w[1:]}, blr.hparams, blr.batch)
    np.testing.assert_allclose(value, -blr.log_evidence(blr.hparams), rtol=1e-10)


def test_laplace_evidence_is_nan_where_the_hessian_is_not_positive_definite():
    saddle = jax.jit(laplace_evidence(lambda w, h, b: 0.5 * w[0] ** 2 - 0.5 * h * w[1] ** 2))
    flat = jax.jit(laplace_evidence(lambda w, h, b: 0.5 * w[0] ** 2 + 0.0 * h * w[1] ** 2))   # singular
    assert np.isnan(saddle(jnp.zeros(2), jnp.asarray(1.0), None))
    assert np.isnan(flat(jnp.zeros(2), jnp.asarray(1.0), None))
    assert np.isnan(jax.jit(jax.grad(saddle, argnums=1))(jnp.zeros(2), jnp.asarray(1.0), None))
    blr = BayesianLinearRegression.sample(0, n=10, dim=2)
    bad = (blr.X, blr.y.at[0].set(jnp.nan))
    assert np.isnan(LAPLACE_SOLVER(blr.hparams, blr.params0, bad, bad).grad).all()


def test_laplace_evidence_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="neg_log_joint"):
        laplace_evidence("S")
    outer = laplace_evidence(lambda w, h, b: w)
    with pytest.raises(TypeError, match="must return a scalar"):
        outer(jnp.zeros(2), 0.0, None)
    with pytest.raises(ValueError, match="parameters are empty"):
        laplace_evidence(lambda w, h, b: 0.0)({}, 0.0, None)
    with pytest.raises(ValueError, match=r"hparams = \(log α, log β\)"):
        BayesianLinearRegression.sample(0).log_evidence(np.zeros(3))
    with pytest.raises(ValueError, match="X of shape"):
        BayesianLinearRegression(jnp.ones((3, 2)), jnp.ones(4), jnp.zeros(2))


# ----------------------------------------------------------------------------------------------
# ELBO.
# ----------------------------------------------------------------------------------------------

ELBO_SOLVER = jax.jit(bl.hypergrad(BayesianLinearRegression.sample(0).elbo_problem,
                                   bl.implicit(bl.solver(_q_fit), bl.exact())))


@pytest.mark.parametrize("seed", SEEDS)
def test_elbo_value_and_hypergradient_at_the_optimal_q_equal_the_closed_form(seed):
    # the closed-form expectation makes the objective exact (no Monte Carlo noise), so the
    # implicit hypergradient at the optimal q must equal the envelope-theorem closed form
    blr = BayesianLinearRegression.sample(seed, n=20, dim=3)
    h = jnp.asarray([0.5 - 0.4 * seed, 0.8])
    q0 = gaussian_q(blr.params0, 0.0)
    out = ELBO_SOLVER(h, q0, blr.batch, blr.batch)
    np.testing.assert_allclose(out.value, -blr.elbo(h), rtol=1e-10)
    np.testing.assert_allclose(out.grad, -blr.elbo_grad(h), rtol=1e-8)
    # the closed-form q is a stationary point of the loss (the loss is the right function)
    g = jax.grad(blr.elbo_problem.inner)(out.params, h, blr.batch)
    np.testing.assert_allclose(ravel_pytree(g)[0], 0.0, atol=1e-10)


def test_monte_carlo_elbo_is_unbiased_within_five_standard_errors():
    blr = BayesianLinearRegression.sample(3, n=20, dim=3)
    h = np.array([0.0, 0.5])
    q = {"mean": jnp.asarray([0.3, -0.2, 0.5]), "log_std": jnp.asarray([-0.5, -1.0, 0.0])}
    S = 4096
    mc = jax.jit(blr.mc_elbo_problem(jax.random.key(11), samples=S).inner)(q, jnp.asarray(h), blr.batch)
    exact = -blr.elbo(h, q)
    # −log-lik per sample is (β/2)‖r − XDε‖² + const, D = diag σ, r = y − Xμ: its variance is
    # (β/2)²(4 rᵀXD²Xᵀr + 2 tr((DXᵀXD)²)) (Gaussian quadratic form), so the S-sample mean's
    # standard error is known; 5 of them bound a correct estimator's miss (p < 1e-6)
    X, y = np.asarray(blr.X), np.asarray(blr.y)
    D = np.diag(np.exp(np.asarray(q["log_std"])))
    r = y - X @ np.asarray(q["mean"])
    M = D @ X.T @ X @ D
    se = 0.5 * math.exp(h[1]) * math.sqrt((4 * r @ X @ D @ D @ X.T @ r + 2 * np.trace(M @ M)) / S)
    assert abs(float(mc) - exact) < 5 * se
    # with σ → 0 the reparameterised samples are all μ: the estimate is exact
    tiny = dict(q, log_std=jnp.full(3, -40.0))
    np.testing.assert_allclose(blr.mc_elbo_problem(jax.random.key(1), 3).inner(tiny, jnp.asarray(h), blr.batch),
                               -blr.elbo(h, tiny), rtol=1e-12)


def test_monte_carlo_elbo_hypergradient_in_log_alpha_is_the_envelope_closed_form():
    # With fixed noise (common random numbers) the MC −ELBO is a deterministic function of q;
    # log α enters only through the closed-form KL, so at the MC objective's own minimiser q̂
    # the hypergradient in log α is ∂KL/∂log α = ½ Σ (α(σ̂² + μ̂²) − 1), whatever the noise.
    blr = BayesianLinearRegression.sample(4, n=20, dim=3)
    problem = blr.mc_elbo_problem(jax.random.key(0), samples=8)
    h = jnp.asarray([0.2, 0.5])
    start = {k: jnp.asarray(v) for k, v in blr.optimal_q(h).items()}
    hg = jax.jit(bl.hypergrad(problem, bl.implicit(bl.solver(_newton(problem.inner)), bl.exact())))
    out = hg(h, start, blr.batch, blr.batch)
    assert out.stats["inner_grad_norm"] < 1e-9
    mu, var = np.asarray(out.params["mean"]), np.exp(2 * np.asarray(out.params["log_std"]))
    np.testing.assert_allclose(out.grad[0], 0.5 * np.sum(math.exp(0.2) * (var + mu**2) - 1.0), rtol=1e-8)
    # the key may come in the batch instead: the same key gives the same loss
    from_batch = gaussian_elbo(blr.log_likelihood, log_precision=blr.log_precision, samples=8)
    np.testing.assert_allclose(from_batch(out.params, h, (jax.random.key(0), blr.batch)),
                               problem.inner(out.params, h, blr.batch), rtol=1e-14)


def test_elbo_prior_precision_may_be_one_per_parameter_entry():
    loglik = lambda w, h, b: -0.5 * jnp.sum((w["a"] - 1.0) ** 2)  # noqa: E731
    ell = lambda m, s, h, b: loglik(m, h, b) - 0.5 * jnp.sum(s["a"] ** 2)  # noqa: E731
    nelbo = gaussian_elbo(expected_log_likelihood=ell)
    q = gaussian_q({"a": jnp.asarray([0.5, -1.0])}, log_std=-1.0)
    la = {"a": jnp.asarray([0.0, math.log(3.0)])}
    alpha, mu, var = np.array([1.0, 3.0]), np.array([0.5, -1.0]), math.exp(-2.0)
    kl = 0.5 * np.sum(alpha * (var + mu**2) - 1.0 - np.log(alpha) - math.log(var))
    expected = -0.5 * np.sum((mu - 1.0) ** 2) - 0.5 * 2 * var
    np.testing.assert_allclose(nelbo(q, la, None), kl - expected, rtol=1e-12)


def test_elbo_bad_arguments_are_refused():
    ll = lambda w, h, b: -jnp.sum(w**2)  # noqa: E731
    with pytest.raises(TypeError, match="exactly one of"):
        gaussian_elbo()
    with pytest.raises(TypeError, match="exactly one of"):
        gaussian_elbo(ll, expected_log_likelihood=lambda m, s, h, b: 0.0)
    with pytest.raises(ValueError, match="samples >= 1"):
        gaussian_elbo(ll, samples=0)
    with pytest.raises(TypeError, match="one PRNG key"):
        gaussian_elbo(ll, key=0)
    with pytest.raises(TypeError, match="log_precision"):
        gaussian_elbo(ll, log_precision=1.0)
    q = gaussian_q(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"pair \(key, data\)"):
        gaussian_elbo(ll)(q, jnp.asarray(0.0), jnp.ones(3))
    nelbo = gaussian_elbo(ll, key=jax.random.key(0))
    with pytest.raises(TypeError, match="gaussian_q"):
        nelbo(jnp.zeros(2), jnp.asarray(0.0), None)
    with pytest.raises(ValueError, match="tree and shapes"):
        nelbo({"mean": jnp.zeros(2), "log_std": jnp.zeros(3)}, jnp.asarray(0.0), None)
    with pytest.raises(ValueError, match="scalar or a pytree"):
        nelbo(q, jnp.zeros(3), None)
    with pytest.raises(TypeError, match="must return a scalar"):
        gaussian_elbo(lambda w, h, b: w, key=jax.random.key(0))(q, jnp.asarray(0.0), None)
    with pytest.raises(ValueError, match="finite Python number"):
        gaussian_q(jnp.zeros(2), log_std=float("nan"))
    with pytest.raises(TypeError, match="floating-point arrays"):
        gaussian_q(jnp.zeros(2, int))


# ----------------------------------------------------------------------------------------------
# The `bilevel check` rows.
# ----------------------------------------------------------------------------------------------


def test_check_rows_match_their_closed_forms_in_float64_and_float32():
    from bilevel._cli_check_objectives import check_rows

    before = jax.config.read("jax_disable_most_optimizations")
    for x64, bound in ((True, 1e-10), (False, 1e-5)):   # float32: ε = 1.2e-7 times small conditioning
        rows = check_rows(x64)
        assert len(rows) == 6
        for row in rows:
            assert set(row) == {"name", "value", "target", "rel_error", "exact", "note"}
            assert row["exact"] is True and row["rel_error"] < bound, row
    # the global settings it touches are restored
    assert jax.config.read("jax_enable_x64") and jax.config.read("jax_disable_most_optimizations") == before
    with pytest.raises(TypeError, match="bool"):
        check_rows(1)


def _np_logistic_laplace(X, y, log_alpha):
    """NumPy reference: −log evidence of Bayesian logistic regression under Laplace.

    S(w) = Σ softplus(−y_i x_iᵀw) + (α/2)‖w‖² − (d/2) log α + (d/2) log 2π; the MAP by Newton's
    method; H = XᵀDX + αI with D = diag(s(1 − s)), s = sigmoid(Xw) (H depends on w)."""
    a, d = math.exp(log_alpha), X.shape[1]
    w = np.zeros(d)
    for _ in range(50):
        s = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (s - (y + 1) / 2) + a * w
        H = X.T @ (X * (s * (1 - s))[:, None]) + a * np.eye(d)
        w = w - np.linalg.solve(H, g)
    s = 1 / (1 + np.exp(-X @ w))
    H = X.T @ (X * (s * (1 - s))[:, None]) + a * np.eye(d)
    S = np.sum(np.logaddexp(0, -y * (X @ w))) + 0.5 * a * w @ w - 0.5 * d * log_alpha + 0.5 * d * math.log(2 * math.pi)
    return S + 0.5 * np.linalg.slogdet(H)[1] - 0.5 * d * math.log(2 * math.pi)


def test_laplace_evidence_hypergradient_includes_the_hessians_dependence_on_the_map():
    # Bayesian logistic regression: the Hessian moves with ŵ(α), so the hypergradient needs the
    # third derivatives of S; compared with float64 finite differences of a NumPy reference
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 3))
    y = np.sign(X @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(30))

    def S(w, log_alpha, batch):
        Xb, yb = batch
        return (jnp.sum(jnp.logaddexp(0.0, -yb * (Xb @ w))) + 0.5 * jnp.exp(log_alpha) * w @ w
                - 1.5 * log_alpha + 1.5 * math.log(2 * math.pi))

    problem = bl.Problem(inner=S, outer=laplace_evidence(S))
    hg = jax.jit(bl.hypergrad(problem, bl.implicit(bl.solver(_newton(S)), bl.exact())))
    out = hg(jnp.asarray(0.3), jnp.zeros(3), (X, y), (X, y))
    np.testing.assert_allclose(out.value, _np_logistic_laplace(X, y, 0.3), rtol=1e-10)
    fd = _fd(lambda h: _np_logistic_laplace(X, y, float(h[0])), np.array([0.3]))[0]
    np.testing.assert_allclose(out.grad, fd, rtol=1e-6)
    # the path through ŵ(λ) matters here (∂ log det H/∂w ≠ 0): the partial derivative at fixed ŵ differs
    partial = jax.jit(jax.grad(laplace_evidence(S), argnums=1))(out.params, jnp.asarray(0.3), (X, y))
    assert not np.isclose(partial, fd, rtol=1e-3)
