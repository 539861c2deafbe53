"""Tests for the exact problems of bilevel.testing defined by optimality conditions.

Every closed form is checked against an independent float64 computation, never against
itself: scikit-learn's coordinate-descent Lasso and ElasticNet, scipy's BVLS (`lsq_linear`),
`nnls` and SLSQP solvers, a null-space solve, plain fixed-point iteration, the optimality
conditions evaluated with NumPy or `jax.grad` of the losses, and central finite differences
of fresh independent solves.
"""

import inspect
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.optimize
from hypothesis import given, settings
from sklearn.linear_model import ElasticNet as SkElasticNet, Lasso as SkLasso

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

SPARSE = [blt.Lasso, blt.ElasticNet]
CONSTRAINED = [blt.BoxQP, blt.NonnegativeLeastSquares, blt.SimplexLeastSquares, blt.EqualityQP,
               blt.InequalityQP]
CLASSES = SPARSE + CONSTRAINED + [blt.Contraction]
SEEDS = (0, 1, 2)
DIM = 6  # one size everywhere, so each closed form compiles once per class and dtype


def f64(x):
    return np.asarray(x, dtype=np.float64)


def primal(params):
    """The primal part of the response (the first entry of a KKT triple)."""
    return params[0] if isinstance(params, tuple) else params


def fd_points(h, eps):
    """`[h + eps e_i, h − eps e_i]` for every coordinate `i` of a scalar or vector `h`."""
    h = f64(h)
    steps = eps * np.eye(h.size).reshape((h.size,) + h.shape)
    return np.concatenate([h + steps, h - steps])


def central_fd(fn, h, eps):
    """Central finite differences of a scalar function of a scalar or vector `h`."""
    values = np.array([fn(p) for p in fd_points(h, eps)])
    half = len(values) // 2
    return ((values[:half] - values[half:]) / (2 * eps)).reshape(np.shape(h))


BATCH = 4  # every call below evaluates 4 hyperparameter values: one compilation per class and dtype


@eqx.filter_jit
def batched(exact, hs):
    """`(response, hypergrad, value, is_valid)` at each row of `hs`: jit of vmap."""
    return jax.vmap(lambda h: (exact.response(h), exact.hypergrad(h), exact.value(h),
                               exact.is_valid(h)))(hs)


def closed_forms_at(exact, hs):
    """`batched` at up to BATCH hyperparameter values (padded with the first)."""
    hs = jnp.asarray(np.asarray(hs), exact.dtype)
    padded = jnp.concatenate([hs, jnp.repeat(hs[:1], BATCH - len(hs), axis=0)])
    return jax.tree.map(lambda x: x[: len(hs)], batched(exact, padded))


def closed_forms(exact, h):
    """`(response, hypergrad, value, is_valid)` at one hyperparameter value."""
    return jax.tree.map(lambda x: x[0], closed_forms_at(exact, np.asarray(h)[None]))


def fd_of_value(exact, h, eps):
    """Central finite differences of the closed-form `value`, in one batched call."""
    values = f64(closed_forms_at(exact, fd_points(h, eps))[2])
    half = len(values) // 2
    return ((values[:half] - values[half:]) / (2 * eps)).reshape(np.shape(h))


# ----------------------------------------------------------------------------------------------
# Independent solvers.
# ----------------------------------------------------------------------------------------------


def sk_sparse(exact, hparams):
    """scikit-learn's solution (same 1/(2n) scaling, no intercept) at `hparams`."""
    X, y = f64(exact.X), f64(exact.y)
    lam = np.exp(f64(hparams))
    if isinstance(exact, blt.Lasso):
        model = SkLasso(alpha=float(lam), fit_intercept=False, tol=1e-15, max_iter=1_000_000)
    else:  # alpha·ratio‖w‖₁ + ½alpha(1 − ratio)‖w‖² = l1‖w‖₁ + ½l2‖w‖²
        l1, l2 = lam
        model = SkElasticNet(alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), fit_intercept=False,
                             tol=1e-15, max_iter=1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duality-gap tolerance 1e-15 is below what it reports
        return model.fit(X, y).coef_


def lsq_value(X, y, w):
    return 0.5 * np.mean((X @ w - y) ** 2)


def qp_solve(exact, hparams):
    """An independent solution `w` of the constrained problems at `hparams`."""
    lam = f64(hparams)
    if isinstance(exact, blt.BoxQP):  # ½wᵀQw − qᵀw = ½‖Rw − R⁻ᵀq‖² + const, Q = RᵀR
        Q, c, B = map(f64, exact.inner_batch)
        R = scipy.linalg.cholesky(Q)
        t = scipy.linalg.solve_triangular(R, c + B @ lam, trans="T")
        return scipy.optimize.lsq_linear(R, t, bounds=(f64(exact.lower), f64(exact.upper)),
                                         method="bvls", tol=1e-15).x
    if isinstance(exact, blt.NonnegativeLeastSquares):  # stack the ridge term
        X, y = f64(exact.X), f64(exact.y)
        n, d = X.shape
        M = np.vstack([X / np.sqrt(n), np.sqrt(np.exp(lam)) * np.eye(d)])
        return scipy.optimize.nnls(M, np.concatenate([y / np.sqrt(n), np.zeros(d)]))[0]
    if isinstance(exact, blt.EqualityQP):  # null-space method
        Q, c, B, A, b = map(f64, exact.inner_batch)
        q = c + B @ lam
        w0 = np.linalg.lstsq(A, b, rcond=None)[0]
        Z = scipy.linalg.null_space(A)
        z = np.linalg.solve(Z.T @ Q @ Z, Z.T @ (q - Q @ w0))
        return w0 + Z @ z
    if isinstance(exact, blt.SimplexLeastSquares):
        A, b, C = map(f64, exact.inner_batch)
        r, d = b + C @ lam, A.shape[1]
        fun, jac = (lambda w: 0.5 * np.sum((A @ w - r) ** 2)), (lambda w: A.T @ (A @ w - r))
        cons = [{"type": "eq", "fun": lambda w: np.sum(w) - 1, "jac": lambda w: np.ones((1, d))}]
        bounds = [(0, None)] * d
        x0 = np.full(d, 1 / d)
    else:  # InequalityQP
        Q, c, B, G, h = map(f64, exact.inner_batch)
        q, d = c + B @ lam, Q.shape[0]
        fun, jac = (lambda w: 0.5 * w @ Q @ w - q @ w), (lambda w: Q @ w - q)
        cons = [{"type": "ineq", "fun": lambda w: h - G @ w, "jac": lambda w: -G}]
        bounds, x0 = None, np.zeros(d)
    res = scipy.optimize.minimize(fun, x0, jac=jac, method="SLSQP", bounds=bounds,
                                  constraints=cons, options=dict(ftol=1e-16, maxiter=2000))
    return res.x


def outer_value(exact, w, hparams):
    """The validation loss at an independent solution, evaluated with NumPy."""
    if isinstance(exact, blt.NonnegativeLeastSquares):
        return lsq_value(f64(exact.Xv), f64(exact.yv), w)
    return 0.5 * np.sum((w - f64(exact.outer_batch)) ** 2)


def iterate_contraction(exact, hparams, steps=500):
    A, B, c = map(f64, exact.inner_batch)
    w = np.zeros(A.shape[0])
    for _ in range(steps):
        w = A @ w + B @ f64(hparams) + c
    return w


# ----------------------------------------------------------------------------------------------
# Lasso and elastic net.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SPARSE)
@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_response_matches_sklearn_and_kkt(cls, seed):
    exact = cls.sample(seed, dim=DIM, log_lam=-0.5 if cls is blt.Lasso else (-0.5, -1.0))
    h = exact.hparams
    w, _, _, valid = closed_forms(exact, h)
    assert bool(valid)
    np.testing.assert_allclose(f64(w), sk_sparse(exact, h), atol=1e-9)
    # KKT with NumPy: ∇f + l1 s + l2 w = 0 on the support, |∇f| <= l1 off it.
    X, y, w = f64(exact.X), f64(exact.y), f64(w)
    l1, l2 = (np.exp(f64(h)), 0.0) if cls is blt.Lasso else np.exp(f64(h))
    grad = X.T @ (X @ w - y) / X.shape[0]
    S = w != 0
    np.testing.assert_allclose(grad[S] + l1 * np.sign(w[S]) + l2 * w[S], 0.0, atol=1e-12)
    assert np.all(np.abs(grad[~S]) <= l1 * (1 + 1e-12))
    np.testing.assert_array_equal(f64(exact.support(h)), S)


@pytest.mark.parametrize("cls", SPARSE)
@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_hypergrad_matches_finite_differences(cls, seed):
    exact = cls.sample(seed, dim=DIM)
    h = exact.hparams
    g = f64(closed_forms(exact, h)[1])
    fd_closed = fd_of_value(exact, h, 1e-5)
    np.testing.assert_allclose(g, fd_closed, rtol=1e-7, atol=1e-9)
    Xv, yv = f64(exact.Xv), f64(exact.yv)
    fd_sklearn = central_fd(lambda t: lsq_value(Xv, yv, sk_sparse(exact, t)), h, 1e-4)
    np.testing.assert_allclose(g, fd_sklearn, rtol=1e-5, atol=1e-7)


def test_lasso_prox_gradient_fixed_point_and_penalty():
    exact = blt.Lasso.sample(4, dim=DIM)
    h = exact.hparams
    w = closed_forms(exact, h)[0]
    X, y = exact.inner_batch
    grad = jax.grad(exact.problem.inner)(w, h, exact.inner_batch)  # autodiff of the smooth part
    eta = 1.0 / exact.lipschitz
    np.testing.assert_allclose(exact.prox(w - eta * grad, h, eta), w, atol=1e-12)
    X = f64(X)
    np.testing.assert_allclose(exact.lipschitz, np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    np.testing.assert_allclose(exact.strength(h), np.exp(f64(h)))
    np.testing.assert_allclose(exact.penalty(w, h), np.exp(f64(h)) * np.abs(f64(w)).sum())
    np.testing.assert_allclose(exact.prox(jnp.array([2.0, -0.5, 0.1]), jnp.log(0.4), 1.0),
                               [1.6, -0.1, 0.0], atol=1e-15)


def test_elastic_net_prox_and_strengths():
    exact = blt.ElasticNet.sample(5, dim=DIM, log_lam=(-0.5, 0.5))
    h = exact.hparams
    w = closed_forms(exact, h)[0]
    grad = jax.grad(exact.problem.inner)(w, h, exact.inner_batch)
    eta = 0.5 / exact.lipschitz
    np.testing.assert_allclose(exact.prox(w - eta * grad, h, eta), w, atol=1e-12)
    l1, l2 = exact.strengths(h)
    np.testing.assert_allclose([l1, l2], np.exp([-0.5, 0.5]))
    # prox of η(l1|x| + ½l2x²) minimises ½(z − x)² + η(l1|z| + ½l2z²): check on a grid.
    x, grid = 1.7, np.linspace(-3, 3, 600001)
    objective = 0.5 * (grid - x) ** 2 + 0.3 * (float(l1) * np.abs(grid) + 0.5 * float(l2) * grid**2)
    np.testing.assert_allclose(exact.prox(jnp.array([x]), h, 0.3)[0], grid[np.argmin(objective)],
                               atol=1e-5)


@pytest.mark.parametrize("cls", SPARSE)
def test_sparse_constructor_finds_the_support_sklearn_finds(cls):
    for seed in SEEDS:
        exact = cls.sample(seed, dim=9)
        rebuilt = cls(exact.X, exact.y, exact.Xv, exact.yv, exact.log_lam)  # coordinate descent
        np.testing.assert_array_equal(f64(rebuilt.signs), np.sign(sk_sparse(exact, exact.hparams)))
        np.testing.assert_array_equal(f64(rebuilt.signs), f64(exact.signs))


def test_lasso_from_unplanted_data_matches_sklearn():
    rng = np.random.default_rng(0)
    X, Xv = rng.standard_normal((2 * DIM, DIM)), rng.standard_normal((2 * DIM, DIM))
    y = X @ np.array([2.0, -1.5, 0, 0, 1.0, 0]) + 0.3 * rng.standard_normal(2 * DIM)
    exact = blt.Lasso(X, y, Xv, Xv @ np.ones(DIM), log_lam=np.log(0.2))
    w = f64(closed_forms(exact, exact.hparams)[0])
    np.testing.assert_allclose(w, sk_sparse(exact, exact.hparams), atol=1e-9)
    assert 0 < np.count_nonzero(w) < DIM


def test_lasso_outside_the_valid_interval_is_nan_and_inside_matches_sklearn():
    exact = blt.Lasso.sample(0, dim=DIM)
    h0 = float(exact.hparams)
    for h in (h0 - 0.02, h0 + 0.02):  # still the same support: exact there
        w, _, _, valid = closed_forms(exact, jnp.asarray(h))
        assert bool(valid)
        np.testing.assert_allclose(f64(w), sk_sparse(exact, h), atol=1e-9)
    for h in (h0 + 5.0, h0 - 8.0):   # everything zero / a bigger support: not this piece
        assert np.count_nonzero(sk_sparse(exact, h)) != np.count_nonzero(f64(exact.signs))
        w, g, v, valid = closed_forms(exact, jnp.asarray(h))
        assert not bool(valid)
        assert np.isnan(f64(w)).all() and np.isnan(float(g)) and np.isnan(float(v))


def test_lasso_sample_support_is_nontrivial_and_nondegenerate():
    for seed in range(6):
        exact = blt.Lasso.sample(seed, dim=10, log_lam=0.3)
        w = sk_sparse(exact, exact.hparams)  # independent solution
        S = w != 0
        assert 3 <= S.sum() <= 7
        X, y = f64(exact.X), f64(exact.y)
        grad = X.T @ (X @ w - y) / X.shape[0]
        assert np.abs(w[S]).min() >= 0.5 - 1e-8
        assert np.abs(grad[~S]).max() <= 0.9 * np.exp(0.3) + 1e-8
    assert int(blt.Lasso.sample(0, dim=DIM, nonzeros=0).support(0.0).sum()) == 0
    assert int(blt.ElasticNet.sample(0, dim=DIM, nonzeros=DIM).support(jnp.zeros(2)).sum()) == DIM


# ----------------------------------------------------------------------------------------------
# Constrained problems.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CONSTRAINED)
@pytest.mark.parametrize("seed", SEEDS)
def test_constrained_response_matches_scipy(cls, seed):
    exact = cls.sample(seed, dim=DIM)
    h = exact.hparams
    w, _, _, valid = closed_forms(exact, h)
    assert bool(valid)
    atol = 1e-8 if cls in (blt.SimplexLeastSquares, blt.InequalityQP) else 1e-10  # SLSQP
    np.testing.assert_allclose(f64(primal(w)), qp_solve(exact, h), atol=atol)


@pytest.mark.parametrize("cls", CONSTRAINED)
@pytest.mark.parametrize("seed", SEEDS)
def test_constrained_hypergrad_matches_finite_differences(cls, seed):
    exact = cls.sample(seed, dim=DIM)
    h = exact.hparams
    g = f64(closed_forms(exact, h)[1])
    fd_closed = fd_of_value(exact, h, 1e-5)
    np.testing.assert_allclose(g, fd_closed, rtol=1e-7, atol=1e-9)
    # On one active set the response is affine in λ (exp(λ) for NNLS), so a larger step is
    # exact up to O(eps²) and keeps the SLSQP error (~1e-10) small after dividing by eps.
    eps = 1e-4 if cls is blt.NonnegativeLeastSquares else 1e-2
    fd_scipy = central_fd(lambda t: outer_value(exact, qp_solve(exact, t), t), h, eps)
    np.testing.assert_allclose(g, fd_scipy, rtol=1e-5, atol=1e-7)


def test_box_qp_projected_gradient_fixed_point_and_margins():
    for seed in SEEDS:
        exact = blt.BoxQP.sample(seed, dim=DIM)
        h = exact.hparams
        w = closed_forms(exact, h)[0]
        grad = jax.grad(exact.problem.inner)(w, h, exact.inner_batch)
        eta = 1.0 / exact.lipschitz
        np.testing.assert_allclose(exact.project(w - eta * grad), w, atol=1e-12)
        lo, up, w, grad = f64(exact.lower), f64(exact.upper), qp_solve(exact, h), f64(grad)
        free = (w > lo + 1e-9) & (w < up - 1e-9)
        assert 0 < free.sum() < DIM
        np.testing.assert_array_equal(free, f64(exact.active) == 0)
        width = up - lo
        assert np.all(np.minimum(w - lo, up - w)[free] >= 0.1 * width[free] - 1e-9)
        assert np.all(np.abs(grad[~free]) >= 0.5 - 1e-9)  # multipliers at the bounds


def test_box_qp_with_infinite_bounds_matches_scipy():
    exact = blt.BoxQP.sample(3, dim=DIM)
    lower, upper = np.array(exact.lower), np.array(exact.upper)
    lower[0], upper[1] = -np.inf, np.inf
    inf_box = blt.BoxQP(exact.Q, exact.c, exact.B, lower, upper, exact.w_target, exact.lam)
    w, g, _, valid = closed_forms(inf_box, inf_box.hparams)
    assert bool(valid) and np.isfinite(f64(g)).all()
    np.testing.assert_allclose(f64(w), qp_solve(inf_box, inf_box.hparams), atol=1e-10)


def test_nonnegative_least_squares_margins_and_projection():
    for seed in SEEDS:
        exact = blt.NonnegativeLeastSquares.sample(seed, dim=DIM, log_lam=-0.5)
        h = exact.hparams
        w = qp_solve(exact, h)
        grad = f64(jax.grad(exact.problem.inner)(jnp.asarray(w), h, exact.inner_batch))
        zero = w == 0
        assert 0 < zero.sum() < DIM
        np.testing.assert_array_equal(zero, f64(exact.active) == 1)
        assert w[~zero].min() >= 0.5 - 1e-9 and grad[zero].min() >= 0.5 - 1e-9
        eta = 1.0 / exact.lipschitz
        np.testing.assert_allclose(exact.project(w - eta * grad), w, atol=1e-12)


def test_simplex_projection_and_kkt_and_margins():
    for seed in SEEDS:
        exact = blt.SimplexLeastSquares.sample(seed, dim=DIM)
        h = exact.hparams
        x = jnp.asarray(np.random.default_rng(seed).standard_normal(DIM))
        np.testing.assert_allclose(exact.project(x), optax.projections.projection_simplex(x),
                                   atol=1e-14)
        w = closed_forms(exact, h)[0]
        grad = f64(jax.grad(exact.problem.inner)(w, h, exact.inner_batch))
        np.testing.assert_allclose(exact.project(w - grad / exact.lipschitz), w, atol=1e-12)
        S = f64(w) > 0
        assert 0 < S.sum() < DIM
        nu = -grad[S].mean()   # ∇f + ν1 = 0 on the support
        np.testing.assert_allclose(grad[S] + nu, 0.0, atol=1e-12)
        assert (grad[~S] + nu).min() >= 0.5 / S.sum() - 1e-9        # μ off the support
        assert f64(w)[S].min() >= 1 / (3 * S.sum()) - 1e-12


def test_equality_qp_kkt_triple_sign_convention():
    exact = blt.EqualityQP.sample(0, dim=DIM, num_constraints=2)
    h = exact.hparams
    params = closed_forms(exact, h)[0]
    w, nu, none = params
    assert none is None and nu.shape == (2,)
    batch = exact.inner_batch
    lagrangian = lambda p: exact.problem.inner(p, h, batch) + p[1] @ exact.eq(p[0], h, batch)
    np.testing.assert_allclose(jax.grad(lagrangian)(params)[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(exact.eq(w, h, exact.inner_batch), 0.0, atol=1e-12)
    # ν by least squares from stationarity with NumPy: Aᵀν = c + Bλ − Qw.
    Q, c, B, A, _ = map(f64, exact.inner_batch)
    np.testing.assert_allclose(nu, np.linalg.lstsq(A.T, c + B @ f64(h) - Q @ f64(w), rcond=None)[0],
                               atol=1e-12)
    assert jax.tree.structure(exact.params0) == jax.tree.structure(params)
    assert bool(closed_forms(exact, h + 100.0)[3])


def test_inequality_qp_kkt_triple_and_complementarity():
    for seed in SEEDS:
        exact = blt.InequalityQP.sample(seed, dim=DIM)
        h = exact.hparams
        params = closed_forms(exact, h)[0]
        w, none, mu = params
        assert none is None
        batch = exact.inner_batch
        lagrangian = lambda p: exact.problem.inner(p, h, batch) + p[2] @ exact.ineq(p[0], h, batch)
        np.testing.assert_allclose(jax.grad(lagrangian)(params)[0], 0.0, atol=1e-12)
        slack = f64(exact.ineq(w, h, batch))
        active = f64(exact.active) == 1
        assert active.any() and not active.all()
        np.testing.assert_allclose(slack[active], 0.0, atol=1e-12)
        assert slack[~active].max() <= -0.5 + 1e-9 and f64(mu)[active].min() >= 0.5 - 1e-9
        np.testing.assert_array_equal(f64(mu)[~active], 0.0)
        # the active set agrees with SLSQP's solution
        scipy_slack = f64(batch[3]) @ qp_solve(exact, h) - f64(batch[4])
        np.testing.assert_array_equal(np.abs(scipy_slack) < 1e-6, active)


@pytest.mark.parametrize("cls", [blt.BoxQP, blt.NonnegativeLeastSquares, blt.SimplexLeastSquares,
                                 blt.InequalityQP])
def test_constrained_constructor_finds_the_active_set(cls):
    for seed in SEEDS:
        exact = cls.sample(seed, dim=7)
        fields = {blt.BoxQP: ("Q", "c", "B", "lower", "upper", "w_target", "lam"),
                  blt.NonnegativeLeastSquares: ("X", "y", "Xv", "yv", "log_lam"),
                  blt.SimplexLeastSquares: ("A", "b", "C", "w_target", "lam"),
                  blt.InequalityQP: ("Q", "c", "B", "G", "h", "w_target", "lam")}[cls]
        rebuilt = cls(*(getattr(exact, f) for f in fields))  # dual projected gradient
        np.testing.assert_array_equal(f64(rebuilt.active), f64(exact.active))


def test_constrained_outside_the_valid_region_is_nan():
    exact = blt.BoxQP.sample(0, dim=DIM)
    w, g, _, valid = closed_forms(exact, exact.hparams + 50.0)
    assert not bool(valid) and np.isnan(f64(w)).all() and np.isnan(f64(g)).all()
    ineq = blt.InequalityQP.sample(0, dim=DIM)
    (w, _, mu), _, v, _ = closed_forms(ineq, ineq.hparams + 50.0)
    assert np.isnan(f64(w)).all() and np.isnan(f64(mu)).all() and np.isnan(float(v))


# ----------------------------------------------------------------------------------------------
# Fixed point.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_contraction_matches_iteration_and_finite_differences(seed):
    exact = blt.Contraction.sample(seed, dim=DIM)
    h = exact.hparams + 0.3
    w, g, _, _ = closed_forms(exact, h)
    np.testing.assert_allclose(f64(w), iterate_contraction(exact, h), atol=1e-12)
    target = f64(exact.target)
    fd = central_fd(lambda t: 0.5 * np.sum((iterate_contraction(exact, t) - target) ** 2), h, 1e-4)
    np.testing.assert_allclose(f64(g), fd, rtol=1e-7, atol=1e-9)
    A = f64(exact.A)
    assert np.linalg.norm(A, 2) <= 0.9 + 1e-12 and not np.allclose(A, A.T)
    np.testing.assert_allclose(exact.T(w, h, exact.inner_batch), w, atol=1e-12)
    assert float(exact.problem.inner(w, h, exact.inner_batch)) < 1e-25


# ----------------------------------------------------------------------------------------------
# Shared behaviour: sampling, arguments, dtypes, transformations, documentation.
# ----------------------------------------------------------------------------------------------


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("cls", CLASSES)
def test_sample_is_deterministic_and_takes_a_key(cls):
    assert leaves_equal(cls.sample(7, dim=DIM), cls.sample(7, dim=DIM))
    assert not leaves_equal(cls.sample(7, dim=DIM), cls.sample(8, dim=DIM))
    key = jax.random.key(3)
    assert leaves_equal(cls.sample(key, dim=DIM), cls.sample(jax.random.key(3), dim=DIM))
    exact = cls.sample(key, dim=DIM)
    assert bool(closed_forms(exact, exact.hparams)[3])


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_arguments_raise_clear_errors(cls):
    with pytest.raises(ValueError, match=r"dim >= 1; got dim=0"):
        cls.sample(0, dim=0)
    exact = cls.sample(0, dim=3)
    wrong = jnp.zeros(exact.hparams.shape + (2,))
    with pytest.raises(ValueError, match=r"requires hparams of shape .* got shape"):
        exact.response(wrong)
    with pytest.raises(TypeError, match="seed or a single PRNG key"):
        cls.sample("zero", dim=3)


def test_bad_arguments_specific_messages():
    with pytest.raises(ValueError, match=r"n_train >= 3; got n_train=0"):
        blt.Lasso.sample(0, dim=3, n_train=0)
    with pytest.raises(ValueError, match=r"finite float or a finite array of shape \(2,\)"):
        blt.ElasticNet.sample(0, log_lam=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="nonzeros <= dim"):
        blt.Lasso.sample(0, dim=3, nonzeros=4)
    exact = blt.Lasso.sample(0, dim=DIM)
    with pytest.raises(ValueError, match="not those of the solution"):
        blt.Lasso(exact.X, exact.y, exact.Xv, exact.yv, exact.log_lam, signs=-exact.signs)
    with pytest.raises(ValueError, match=r"signs to be an array of shape \(6,\)"):
        blt.Lasso(exact.X, exact.y, exact.Xv, exact.yv, signs=[1, 0])
    box = blt.BoxQP.sample(0, dim=4)
    with pytest.raises(ValueError, match="not that of the solution"):
        blt.BoxQP(box.Q, box.c, box.B, box.lower, box.upper, box.w_target, active=jnp.zeros(4, int))
    with pytest.raises(ValueError, match="lower < upper"):
        blt.BoxQP(box.Q, box.c, box.B, box.upper, box.lower, box.w_target)
    with pytest.raises(ValueError, match="symmetric positive definite"):
        blt.BoxQP(-box.Q, box.c, box.B, box.lower, box.upper, box.w_target)
    with pytest.raises(ValueError, match="spectral norm < 1"):
        blt.Contraction(2 * jnp.eye(3), jnp.ones((3, 1)), jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="contraction < 1"):
        blt.Contraction.sample(0, contraction=1.0)
    with pytest.raises(ValueError, match="num_constraints <= dim"):
        blt.EqualityQP.sample(0, dim=3, num_constraints=4)
    with pytest.raises(ValueError, match="full row rank"):
        eq = blt.EqualityQP.sample(0, dim=3, num_constraints=2)
        blt.EqualityQP(eq.Q, eq.c, eq.B, jnp.ones((2, 3)), eq.b, eq.w_target)
    with pytest.raises(ValueError, match=r"X of shape \(n, d\)"):
        blt.Lasso(jnp.ones((4, 2)), jnp.ones(3), jnp.ones((2, 2)), jnp.ones(2))
    with pytest.raises(TypeError, match="needs concrete arrays"):
        jax.jit(lambda X: blt.Lasso(X, exact.y, exact.Xv, exact.yv).X)(exact.X)


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_outputs_are_float32(cls):
    e32 = cls.sample(1, dim=DIM, dtype=jnp.float32)
    out = jax.eval_shape(batched, e32, jnp.zeros((BATCH,) + e32.hparams.shape, jnp.float32))
    assert {x.dtype for x in jax.tree.leaves(out[:3])} == {np.dtype(np.float32)}


@pytest.mark.parametrize("cls", [blt.Lasso, blt.InequalityQP])
def test_float32_matches_float64(cls):
    e32, e64 = cls.sample(1, dim=DIM, dtype=jnp.float32), cls.sample(1, dim=DIM)
    w32, g32, v32, ok = closed_forms(e32, e32.hparams)
    w64, g64, v64, _ = closed_forms(e64, e64.hparams)
    assert bool(ok)
    for a, b in zip(jax.tree.leaves((w32, g32, v32)), jax.tree.leaves((w64, g64, v64))):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(f64(a), f64(b), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cls", CLASSES)
def test_jit_and_vmap_over_hparams(cls):
    """Rows of one jit(vmap) call do not depend on the other rows, and are mutually consistent."""
    exact = cls.sample(2, dim=DIM)
    h = f64(exact.hparams)
    d = 1e-4 * np.ones_like(h)
    w, g, v, ok = closed_forms_at(exact, [h - d, h, h + d, h])
    w1, g1, v1, _ = closed_forms_at(exact, [h, h, h, h])
    assert np.all(ok)
    for a, b in zip(jax.tree.leaves((w, g, v)), jax.tree.leaves((w1, g1, v1))):
        np.testing.assert_array_equal(f64(a[1]), f64(b[1]))
        np.testing.assert_array_equal(f64(a[3]), f64(b[0]))
    # the value changes along d as the hypergradient says (a directional central difference)
    np.testing.assert_allclose((v[2] - v[0]) / 2, np.sum(f64(g[1]) * d), rtol=1e-6, atol=1e-12)


def test_vmap_over_stacked_instances_with_different_supports():
    problems = [blt.Lasso.sample(s, dim=DIM) for s in range(3)]
    assert len({tuple(f64(p.signs)) for p in problems}) > 1
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
    grads = jax.jit(jax.vmap(lambda e: e.hypergrad(e.hparams)))(stacked)
    np.testing.assert_allclose(grads, [closed_forms(p, p.hparams)[1] for p in problems], rtol=1e-12)


@settings(max_examples=5, deadline=None)
@given(bst.lasso_problems(min_dim=DIM, max_dim=DIM))
def test_strategy_lasso(exact):
    S = f64(exact.signs) != 0
    w, _, _, valid = closed_forms(exact, exact.hparams)
    assert bool(valid) and 0 < S.sum() and (S.sum() < S.size)
    np.testing.assert_allclose(f64(w), sk_sparse(exact, exact.hparams), atol=1e-9)


@settings(max_examples=5, deadline=None)
@given(bst.elastic_net_problems(min_dim=DIM, max_dim=DIM))
def test_strategy_elastic_net(exact):
    w = closed_forms(exact, exact.hparams)[0]
    np.testing.assert_allclose(f64(w), sk_sparse(exact, exact.hparams), atol=1e-9)


@settings(max_examples=5, deadline=None)
@given(bst.box_qp_problems(min_dim=DIM, max_dim=DIM, min_hparams=2, max_hparams=2))
def test_strategy_box_qp(exact):
    w = closed_forms(exact, exact.hparams)[0]
    np.testing.assert_allclose(f64(w), qp_solve(exact, exact.hparams), atol=1e-10)


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="min_dim <= max_dim"):
        bst.lasso_problems(min_dim=5, max_dim=2)
    with pytest.raises(ValueError, match="min_hparams <= max_hparams"):
        bst.box_qp_problems(min_hparams=3, max_hparams=1)


def test_problems_are_bilevel_problems():
    for cls in CLASSES:
        exact = cls.sample(0, dim=DIM)
        assert isinstance(exact.problem, bl.Problem)
        assert isinstance(exact, blt.AbstractConditionProblem)
        loss = exact.problem.inner(exact.params0, exact.hparams, exact.inner_batch)
        assert jnp.shape(loss) == () and loss.dtype == exact.dtype
        response = closed_forms(exact, exact.hparams)[0]
        assert jax.tree.structure(response) == jax.tree.structure(exact.params0)


STRATEGIES = [bst.lasso_problems, bst.elastic_net_problems, bst.box_qp_problems]


def _docstring_examples():
    objects = [blt.AbstractConditionProblem, *CLASSES, *(c.sample for c in CLASSES), *STRATEGIES]
    for obj in objects:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", inspect.getdoc(obj), re.S)):
            yield pytest.param(block, id=f"{obj.__qualname__}-{i}")


@pytest.mark.parametrize("code", list(_docstring_examples()))
def test_docstring_examples_run(code):
    exec(compile(code, "<docstring>", "exec"), {})


def test_every_public_name_is_documented():
    for cls in CLASSES:
        doc = inspect.getdoc(cls)
        assert "**Arguments:**" in doc and "**Example:**" in doc, cls
        sample = inspect.getdoc(cls.sample)
        assert all(s in sample for s in ("**Arguments:**", "**Returns:**", "**Example:**")), cls
        for name in ("response", "hypergrad", "value", "is_valid"):
            assert inspect.getdoc(getattr(cls, name)), (cls, name)
    for name in ("response", "hypergrad", "value", "is_valid"):
        assert "**Arguments:**" in inspect.getdoc(getattr(blt.AbstractConditionProblem, name))
    for fn in STRATEGIES:
        doc = inspect.getdoc(fn)
        assert all(s in doc for s in ("**Arguments:**", "**Returns:**", "**Example:**"))
    for name in ("AbstractConditionProblem", *(cls.__name__ for cls in CLASSES)):
        assert f"bilevel.testing.{name}" in blt.__doc__, name
