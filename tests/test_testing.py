"""Tests for bilevel.testing: every closed form against an independent float64 computation.

References used here, none of which shares code with the closed forms under test:
NumPy least squares / dense solves and explicit loops, scipy optimisers, central finite
differences, and `jax` autodiff of the loss functions.
"""

import dataclasses
import inspect
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, strategies as st

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

CLASSES = [blt.Ridge, blt.RidgePerCoordinate, blt.Quadratic004, blt.UnrolledQuadratic]
FD_STEP = 1e-6


def f64(x):
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, rtol, atol=0.0):
    np.testing.assert_allclose(f64(actual), f64(expected), rtol=rtol, atol=atol)


METHODS = ("response", "value", "hypergrad", "identity_hypergrad", "hessian")
UNROLLED_METHODS = ("unrolled_response", "unrolled_value", "unrolled_hypergrad")


@eqx.filter_jit
def closed_forms(exact, hparams):
    """Every IFT closed form at `hparams`, compiled once per class and shape for all tests."""
    return {m: getattr(exact, m)(hparams) for m in METHODS}


def without_steps(exact):
    """The IFT quantities do not depend on the static `steps`: drop it to share compilations."""
    if isinstance(exact, blt.UnrolledQuadratic):
        return dataclasses.replace(exact, steps=1)
    return exact


def call(exact, method, hparams):
    """`exact.<method>(hparams)`: jitted for the IFT methods, eager for the unrolled ones."""
    if method in UNROLLED_METHODS:  # eager: jit would recompile for every `steps`
        return getattr(exact, method)(jnp.asarray(hparams))
    return closed_forms(without_steps(exact), jnp.asarray(hparams))[method]


def any_problem(**kwargs):
    kwargs.setdefault("max_dim", 6)  # fewer shapes to compile; the strategies go to 8
    return st.one_of(
        bst.ridge_problems(**kwargs),
        bst.ridge_per_coordinate_problems(**kwargs),
        bst.quadratic004_problems(**kwargs),
        bst.unrolled_quadratic_problems(**kwargs),
    )


def central_fd(f, x, step=FD_STEP):
    """Central finite differences of a scalar function of a scalar or vector, in float64."""
    x = f64(x)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = step
        grad[i] = (f(x + e) - f(x - e)) / (2 * step)
    return grad


def fd_tolerance(f, x, step=FD_STEP):
    """Absolute error budget of `central_fd`: rounding of f's values divided by the step."""
    return 1e-14 * (1.0 + abs(float(f(f64(x))))) / step


# ---------------------------------------------------------------- independent NumPy references


def np_ridge_response(exact, log_lam):
    """argmin 1/(2n)‖Xw − y‖² + ½Σρ_i w_i² as a stacked least-squares problem (SVD-based)."""
    X, y = f64(exact.X), f64(exact.y)
    n, d = X.shape
    rho = np.broadcast_to(np.exp(f64(log_lam)), (d,))
    aug = np.vstack([X / np.sqrt(n), np.diag(np.sqrt(rho))])
    rhs = np.concatenate([y / np.sqrt(n), np.zeros(d)])
    return np.linalg.lstsq(aug, rhs, rcond=None)[0]


def np_ridge_value(exact, log_lam):
    w = np_ridge_response(exact, log_lam)
    r = f64(exact.Xv) @ w - f64(exact.yv)
    return 0.5 * np.mean(r**2)


def np_quadratic_response(exact, lam):
    h, tb = f64(exact.h), f64(exact.theta_bar)
    return np.linalg.solve(np.diag((1 + float(lam)) * h), h * tb)


def np_quadratic_value(exact, lam):
    r = np_quadratic_response(exact, lam) - f64(exact.theta_tilde)
    return 0.5 * r @ (f64(exact.h) * r)


def np_A(exact):
    Q, a = f64(exact.Q), f64(exact.a)
    return Q @ np.diag(a) @ Q.T


def np_unrolled_response_ift(exact, log_lam):
    A = np_A(exact)
    return np.linalg.solve(A + np.exp(float(log_lam)) * np.eye(len(A)), f64(exact.b))


def np_gd(exact, log_lam, steps=None):
    """An explicit loop of plain gradient descent on the inner loss."""
    A, b, w = np_A(exact), f64(exact.b), f64(exact.w0).copy()
    rho, lr = np.exp(float(log_lam)), float(exact.lr)
    for _ in range(exact.steps if steps is None else steps):
        w = w - lr * (A @ w - b + rho * w)
    return w


def np_unrolled_outer(exact, w):
    r = f64(exact.C) @ w - f64(exact.e)
    return 0.5 * r @ r


def np_value(exact, hparams):
    """L_V(w*(λ)) computed without the class's closed forms."""
    if isinstance(exact, (blt.Ridge, blt.RidgePerCoordinate)):
        return np_ridge_value(exact, hparams)
    if isinstance(exact, blt.Quadratic004):
        return np_quadratic_value(exact, hparams)
    return np_unrolled_outer(exact, np_unrolled_response_ift(exact, hparams))


def np_response(exact, hparams):
    if isinstance(exact, (blt.Ridge, blt.RidgePerCoordinate)):
        return np_ridge_response(exact, hparams)
    if isinstance(exact, blt.Quadratic004):
        return np_quadratic_response(exact, hparams)
    return np_unrolled_response_ift(exact, hparams)


def autodiff_ift_parts(exact, lam):
    return _autodiff_ift_parts(without_steps(exact), lam)


@eqx.filter_jit
def _autodiff_ift_parts(exact, lam):
    """By jax autodiff of the losses at w = exact.response(λ):

    (∂²L_T/∂w², ∂L_V/∂w, ∂L_V/∂λ, rows (∂²L_T/∂λ∂w)ᵀe_i, ∇_w L_T at w, ∇_w L_T at 0).
    """
    p, w = exact.problem, exact.response(lam)
    grad_inner = jax.grad(p.inner)
    H = jax.hessian(p.inner)(w, lam, exact.inner_batch)
    g_w = jax.grad(p.outer)(w, lam, exact.outer_batch)
    g_lam = jax.grad(p.outer, argnums=1)(w, lam, exact.outer_batch)
    _, cross = jax.vjp(lambda l: grad_inner(w, l, exact.inner_batch), lam)
    rows = jax.vmap(lambda v: cross(v)[0])(jnp.eye(w.size, dtype=w.dtype))
    at_zero = grad_inner(jnp.zeros_like(w), lam, exact.inner_batch)
    return H, g_w, g_lam, rows, grad_inner(w, lam, exact.inner_batch), at_zero


# ---------------------------------------------------------------- responses and values


@given(any_problem())
def test_response_matches_numpy(exact):
    lam = exact.hparams
    assert_close(call(exact, "response", lam), np_response(exact, lam), rtol=1e-8, atol=1e-12)


@given(any_problem())
def test_response_is_stationary_point_of_inner_loss(exact):
    at_response, at_zero = autodiff_ift_parts(exact, exact.hparams)[4:]
    scale = np.linalg.norm(f64(at_zero))
    assert np.linalg.norm(f64(at_response)) <= 1e-12 * (1.0 + scale)


@pytest.mark.parametrize("cls", CLASSES)
def test_response_matches_scipy_minimize(cls):
    exact = cls.sample(11, dim=4)
    lam = exact.hparams
    inner = jax.jit(lambda w: exact.problem.inner(w, lam, exact.inner_batch))
    jac = jax.jit(jax.grad(lambda w: exact.problem.inner(w, lam, exact.inner_batch)))
    res = scipy.optimize.minimize(
        lambda w: float(inner(w)), np.zeros(4), jac=lambda w: np.asarray(jac(w)),
        method="BFGS", options={"gtol": 1e-12},
    )
    assert_close(exact.response(lam), res.x, rtol=1e-6, atol=1e-8)


@given(any_problem())
def test_value_matches_numpy(exact):
    lam = exact.hparams
    assert_close(call(exact, "value", lam), np_value(exact, lam), rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------- hypergradients


@given(any_problem())
def test_hypergrad_matches_finite_differences_of_independent_value(exact):
    lam = exact.hparams
    f = lambda x: np_value(exact, x)  # noqa: E731
    fd = central_fd(f, lam)
    assert_close(call(exact, "hypergrad", lam), fd, rtol=1e-6, atol=fd_tolerance(f, lam))


@given(any_problem())
def test_hypergrad_matches_finite_differences_of_value(exact):
    lam = exact.hparams
    f = lambda x: float(call(exact, "value", jnp.asarray(x)))  # noqa: E731
    fd = central_fd(f, lam)
    assert_close(call(exact, "hypergrad", lam), fd, rtol=1e-6, atol=fd_tolerance(f, lam))




@given(any_problem())
def test_hypergrad_matches_autodiff_ift(exact):
    lam = exact.hparams
    H, g_w, g_lam, cross, _, _ = (f64(x) for x in autodiff_ift_parts(exact, lam))
    expected = g_lam - np.linalg.solve(H, g_w) @ cross  # cross[i] = (∂²L_T/∂λ∂w)ᵀ e_i
    assert_close(call(exact, "hypergrad", lam), expected, rtol=1e-8, atol=1e-12)


@given(any_problem())
def test_identity_hypergrad_matches_its_definition_by_autodiff(exact):
    lam = exact.hparams
    _, g_w, g_lam, cross, _, _ = (f64(x) for x in autodiff_ift_parts(exact, lam))
    expected = g_lam - g_w @ cross
    assert_close(call(exact, "identity_hypergrad", lam), expected, rtol=1e-9, atol=1e-13)


def test_identity_hypergrad_differs_from_hypergrad():
    """`identity_hypergrad` is the H⁻¹ ≈ I approximation, not a copy of the exact one."""
    for cls in CLASSES:
        exact = cls.sample(3, dim=4)
        a, b = f64(exact.identity_hypergrad(exact.hparams)), f64(exact.hypergrad(exact.hparams))
        assert np.max(np.abs(a - b)) > 1e-6 * np.max(np.abs(b)), cls


@given(any_problem())
def test_hessian_matches_jax_hessian(exact):
    lam = exact.hparams
    expected = autodiff_ift_parts(exact, lam)[0]
    H = call(exact, "hessian", lam)
    d = exact.params0.size
    assert H.shape == (d, d)
    assert_close(H, expected, rtol=1e-10, atol=1e-12)


@given(st.floats(1.0, 100.0), st.integers(0, 2**32 - 1), st.sampled_from(CLASSES),
       st.integers(1, 8), st.floats(-3.0, 3.0))
def test_condition_number_bound(max_condition, seed, cls, dim, log_lam):
    kwargs = {"lam": max(log_lam, -0.9)} if cls is blt.Quadratic004 else {"log_lam": log_lam}
    exact = cls.sample(seed, dim=dim, max_condition=max_condition, **kwargs)
    eig = np.linalg.eigvalsh(f64(call(exact, "hessian", exact.hparams)))
    assert eig.min() > 0
    assert eig.max() / eig.min() <= max_condition * (1 + 1e-9)


def test_condition_bound_is_reached_for_large_dimension():
    """The spectrum spreads over the allowed range (the bound is not vacuous)."""
    exact = blt.Ridge.sample(0, dim=200, max_condition=50.0, log_lam=-30.0)
    eig = np.linalg.eigvalsh(f64(exact.hessian(exact.hparams)))
    assert 40.0 < eig.max() / eig.min() <= 50.0 * (1 + 1e-9)


# ---------------------------------------------------------------- seed 004 optimum


@given(bst.quadratic004_problems(lam_range=(0.2, 0.4)))
def test_quadratic004_optimum_minimises_value(exact):
    lam_star = float(exact.optimal_hparams())
    value = lambda l: float(call(exact, "value", jnp.asarray(l)))  # noqa: E731
    assert 0.2 - 1e-12 <= lam_star <= 0.4 + 1e-12
    res = scipy.optimize.minimize_scalar(
        lambda l: np_quadratic_value(exact, l), bounds=(-0.5, 3.0), method="bounded",
        options={"xatol": 1e-12},
    )
    assert abs(res.x - lam_star) < 1e-5
    hypergrad = float(call(exact, "hypergrad", jnp.asarray(lam_star)))
    assert abs(hypergrad) < 1e-10 * (1 + value(lam_star))
    assert np_quadratic_value(exact, lam_star) <= res.fun * (1 + 1e-13)  # up to rounding


@pytest.mark.parametrize("lam_range", [(0.2, 0.4), (-0.5, -0.3), (1.0, 3.0), (0.3, 0.3)])
def test_quadratic004_sample_hits_lam_range(lam_range):
    lams = np.array([float(blt.Quadratic004.sample(s, lam_range=lam_range).optimal_hparams())
                     for s in range(40)])
    lo, hi = lam_range
    assert np.all((lams >= lo - 1e-12) & (lams <= hi + 1e-12))
    if hi > lo:  # drawn uniformly over the range, not stuck at a point
        assert lams.max() - lams.min() > 0.5 * (hi - lo)


def test_quadratic004_dim_one():
    exact = blt.Quadratic004.sample(0, dim=1, lam_range=(0.3, 0.3))
    assert_close(exact.optimal_hparams(), 0.3, rtol=1e-12)


@pytest.mark.parametrize("nu_range", [(3.0, 5.0), (0.5, 0.5)])
def test_quadratic004_response_derivative_at_optimum_in_range(nu_range):
    """The seed reports ‖dθ*/dλ‖ in [3, 5] at λ†; `sample` draws it uniformly in a range."""
    norms = []
    for s in range(20):
        exact = blt.Quadratic004.sample(s, dim=1 + s % 7, response_grad_range=nu_range)
        lam = float(exact.optimal_hparams())
        dtheta = [central_fd(lambda x: np_quadratic_response(exact, x)[i], lam)
                  for i in range(exact.theta_bar.size)]
        norms.append(np.linalg.norm(dtheta))
    lo, hi = nu_range
    assert np.all((np.array(norms) >= lo * (1 - 1e-7)) & (np.array(norms) <= hi * (1 + 1e-7)))
    assert max(norms) - min(norms) >= 0.5 * (hi - lo)


# ---------------------------------------------------------------- unrolled gradient descent


@given(bst.unrolled_quadratic_problems(max_steps=40))
def test_unrolled_response_matches_numpy_loop(exact):
    lam = exact.hparams
    expected = np_gd(exact, lam)
    assert_close(call(exact, "unrolled_response", lam), expected, rtol=1e-9, atol=1e-11)
    assert_close(call(exact, "unrolled_value", lam), np_unrolled_outer(exact, expected),
                 rtol=1e-9, atol=1e-13)


@given(bst.unrolled_quadratic_problems(max_steps=40))
def test_unrolled_hypergrad_matches_finite_differences_of_numpy_loop(exact):
    lam = exact.hparams
    f = lambda x: np_unrolled_outer(exact, np_gd(exact, x))  # noqa: E731
    fd = central_fd(f, lam)
    assert_close(call(exact, "unrolled_hypergrad", lam), fd, rtol=1e-6,
                 atol=fd_tolerance(f, lam))


def autodiff_unrolled(exact, lam):
    return _autodiff_unrolled(without_steps(exact), lam, jnp.asarray(exact.steps))


@eqx.filter_jit
def _autodiff_unrolled(exact, lam, steps, max_steps=40):
    """Value and λ-gradient of L_V after `steps` (traced) GD steps, reverse mode through a scan."""
    p = exact.problem

    def unrolled_value(lam):
        def step(w, t):
            new = w - exact.lr * jax.grad(p.inner)(w, lam, exact.inner_batch)
            return jnp.where(t < steps, new, w), None

        w, _ = jax.lax.scan(step, exact.w0, jnp.arange(max_steps))
        return p.outer(w, lam, exact.outer_batch)

    return jax.value_and_grad(unrolled_value)(lam)


@given(bst.unrolled_quadratic_problems(max_steps=40))
def test_unrolled_hypergrad_matches_autodiff_through_the_loop(exact):
    lam = exact.hparams
    value, grad = autodiff_unrolled(exact, lam)
    assert_close(call(exact, "unrolled_value", lam), value, rtol=1e-9, atol=1e-13)
    assert_close(call(exact, "unrolled_hypergrad", lam), grad, rtol=1e-8, atol=1e-12)


@given(bst.unrolled_quadratic_problems(max_steps=5, lr_range=(0.2, 1.8)))
def test_unrolled_converges_to_ift_for_many_steps(exact):
    lam = exact.hparams
    short = dataclasses.replace(exact, steps=1)
    long = dataclasses.replace(exact, steps=20_000)
    ift = {m: call(exact, m, lam) for m in ("response", "value", "hypergrad")}
    assert_close(call(long, "unrolled_response", lam), ift["response"], rtol=1e-9, atol=1e-12)
    assert_close(call(long, "unrolled_value", lam), ift["value"], rtol=1e-9, atol=1e-13)
    assert_close(call(long, "unrolled_hypergrad", lam), ift["hypergrad"], rtol=1e-8, atol=1e-12)
    err = [abs(float(call(e, "unrolled_hypergrad", lam) - ift["hypergrad"]))
           for e in (short, long)]
    assert err[1] <= err[0]


def test_unrolled_is_exact_for_unstable_step_sizes_too():
    exact = blt.UnrolledQuadratic.sample(5, dim=3, steps=7, w0_scale=1.0)
    exact = dataclasses.replace(exact, lr=jnp.asarray(3.0 / float(jnp.max(exact.a) + 1.0)))
    lam = exact.hparams
    assert_close(exact.unrolled_response(lam), np_gd(exact, lam), rtol=1e-9)
    f = lambda x: np_unrolled_outer(exact, np_gd(exact, x))  # noqa: E731
    assert_close(exact.unrolled_hypergrad(lam), central_fd(f, lam), rtol=1e-6,
                 atol=fd_tolerance(f, lam))


def test_unrolled_single_step_and_zero_w0():
    exact = blt.UnrolledQuadratic.sample(0, dim=3, steps=1)
    assert np.all(f64(exact.w0) == 0)
    lam = 0.3
    w1 = exact.lr * exact.b  # one step from zero: w1 = η b
    assert_close(exact.unrolled_response(lam), w1, rtol=1e-12)
    # d w1 / dλ = 0, so the unrolled hypergradient vanishes for one step from zero
    assert abs(float(exact.unrolled_hypergrad(lam))) < 1e-14


# ---------------------------------------------------------------- transforms, dtypes, seeds


@pytest.mark.parametrize("cls", CLASSES)
def test_vmap_over_hparams_matches_one_at_a_time(cls):
    exact = cls.sample(4, dim=3)
    lams = jnp.stack([exact.hparams + s for s in (-0.1, 0.0, 0.2)])
    batched = jax.vmap(closed_forms, in_axes=(None, 0))(without_steps(exact), lams)
    if cls is blt.UnrolledQuadratic:
        batched |= {m: jax.vmap(getattr(exact, m))(lams) for m in UNROLLED_METHODS}
    for m, out in batched.items():
        assert out.shape == (3,) + call(exact, m, lams[0]).shape
        for i in range(3):
            assert_close(out[i], call(exact, m, lams[i]), rtol=1e-12, atol=1e-15)


def test_vmap_over_stacked_instances_and_problem_datasets():
    problems = [blt.UnrolledQuadratic.sample(s, dim=3, steps=6, w0_scale=1.0) for s in range(4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
    out = jax.vmap(lambda e: e.unrolled_hypergrad(e.hparams))(stacked)
    assert_close(out, [p.unrolled_hypergrad(p.hparams) for p in problems], rtol=1e-12)
    # the one Problem works under vmap over datasets
    problem = problems[0].problem
    assert all(p.problem == problem for p in problems)
    losses = jax.vmap(lambda e: problem.inner(e.params0, e.hparams, e.inner_batch))(stacked)
    assert_close(losses, [problem.inner(p.params0, p.hparams, p.inner_batch) for p in problems],
                 rtol=1e-12)


def test_jit_does_not_recompile_for_new_hparams_or_data():
    traces = []

    @eqx.filter_jit
    def hg(exact, lam):
        traces.append(None)
        return exact.hypergrad(lam)

    a, b = blt.Ridge.sample(0, dim=3), blt.Ridge.sample(1, dim=3)
    hg(a, jnp.asarray(0.1))
    hg(a, jnp.asarray(0.5))
    hg(b, jnp.asarray(0.2))
    assert len(traces) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_instances_have_float32_outputs(cls):
    e32, e64 = cls.sample(8, dim=4, dtype=jnp.float32), cls.sample(8, dim=4, dtype=jnp.float64)
    for leaf in jax.tree_util.tree_leaves(e32):
        assert leaf.dtype == jnp.float32
    methods = ["response", "value", "hypergrad", "identity_hypergrad", "hessian"]
    if cls is blt.UnrolledQuadratic:
        methods += ["unrolled_response", "unrolled_value", "unrolled_hypergrad"]
    for lam in (e32.hparams, f64(e64.hparams), 0 * f64(e64.hparams) + 0.25):
        for m in methods:
            out32, out64 = getattr(e32, m)(lam), getattr(e64, m)(f64(lam))
            assert out32.dtype == jnp.float32, m
            assert_close(out32, out64, rtol=1e-3, atol=1e-4 * (1 + np.max(np.abs(f64(out64)))))
    assert e32.params0.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in e32.inner_batch + e32.outer_batch)
    assert e32.problem.inner(e32.params0, e32.hparams, e32.inner_batch).dtype == jnp.float32


def test_default_dtype_is_float64_under_x64():
    for cls in CLASSES:
        assert cls.sample(0, dim=2).dtype == jnp.float64


@pytest.mark.parametrize("cls", CLASSES)
def test_seeds_and_keys(cls):
    a, b, c = cls.sample(5, dim=3), cls.sample(5, dim=3), cls.sample(6, dim=3)
    assert eqx.tree_equal(a, b)
    assert not eqx.tree_equal(a, c)
    k1, k2 = cls.sample(jax.random.key(5), dim=3), cls.sample(jax.random.PRNGKey(5), dim=3)
    assert eqx.tree_equal(k1, k2)
    assert not eqx.tree_equal(k1, cls.sample(jax.random.key(6), dim=3))
    assert cls.sample(np.int64(5), dim=3).params0.shape == (3,)


def test_direct_construction_and_properties():
    X = np.arange(6.0).reshape(3, 2) + np.eye(3, 2)
    exact = blt.Ridge(X, [1, 2, 3], X[:2], [1.0, 0.0], log_lam=-1.0)
    assert exact.dtype == jnp.float64 and exact.hparams == -1.0
    assert exact.params0.shape == (2,) and np.all(f64(exact.params0) == 0)
    assert exact.problem is blt.RidgePerCoordinate.sample(0).problem
    per = blt.RidgePerCoordinate(X, [1, 2, 3], X[:2], [1.0, 0.0], log_lam=-1.0)
    assert per.hparams.shape == (2,)
    # one shared penalty: the scalar hypergradient is the sum of the per-coordinate ones
    assert_close(exact.hypergrad(-1.0), jnp.sum(per.hypergrad(per.hparams)), rtol=1e-12)
    assert_close(exact.response(-1.0), per.response(per.hparams), rtol=1e-12)
    q = blt.Quadratic004([1.0, 2.0], [0.5, 1.0], [1.0, 3.0])
    assert_close(q.optimal_hparams(), 1.0, rtol=1e-12)  # θ̃ = θ̄/2 -> 1 + λ† = 2
    assert q.inner_batch[0] is q.theta_bar and q.outer_batch[0] is q.theta_tilde
    u = blt.UnrolledQuadratic(np.eye(2), [1.0, 2.0], [1.0, 1.0], np.eye(2), [0.0, 0.0],
                              lr=0.1, steps=3)
    assert np.all(f64(u.w0) == 0) and u.params0 is u.w0
    assert_close(u.inner_batch[0], np.diag([1.0, 2.0]), rtol=0)


def test_abstract_base_cannot_be_instantiated():
    with pytest.raises(TypeError, match="abstract"):
        blt.AbstractExactProblem()
    for cls in CLASSES:
        assert issubclass(cls, blt.AbstractExactProblem)


# ---------------------------------------------------------------- argument errors

X3 = np.ones((4, 3)) + np.eye(4, 3)
Q2 = np.eye(2)

BAD_CALLS = [
    (lambda: blt.Ridge.sample(0, dim=0), ValueError, r"dim >= 1; got dim=0"),
    (lambda: blt.Ridge.sample(0, dim=2.5), TypeError, r"integer dim >= 1; got float"),
    (lambda: blt.Ridge.sample(0, max_condition=0.5), ValueError, r"max_condition >= 1.0; got"),
    (lambda: blt.Ridge.sample(0, dim=4, n_train=2), ValueError, r"n_train >= 4"),
    (lambda: blt.Ridge.sample(0, noise=-1.0), ValueError, r"noise >= 0.0"),
    (lambda: blt.Ridge.sample(-1), ValueError, r"seed >= 0; got -1"),
    (lambda: blt.Ridge.sample(1.5), TypeError, r"seed or a single PRNG key; got float"),
    (lambda: blt.Ridge.sample(True), TypeError, r"seed or a single PRNG key"),
    (lambda: blt.Ridge.sample(jax.random.split(jax.random.key(0))), TypeError, "single"),
    (lambda: jax.jit(lambda k: blt.Ridge.sample(k))(jax.random.key(0)), TypeError,
     r"concrete seed or key; got a traced value"),
    (lambda: blt.Ridge.sample(0, dtype=jnp.int32), TypeError, r"real floating dtype"),
    (lambda: blt.Ridge.sample(0, dtype=jnp.complex64), TypeError, r"real floating dtype"),
    (lambda: blt.Ridge(X3, np.ones(3), X3, np.ones(4)), ValueError,
     r"y of shape \(n,\).*got X \(4, 3\), y \(3,\)"),
    (lambda: blt.Ridge(X3, np.ones(4), X3, np.ones(4), log_lam=[0.0, 1.0]), ValueError,
     r"scalar log_lam"),
    (lambda: blt.Ridge.sample(0, dim=3).hypergrad(jnp.zeros(3)), ValueError,
     r"hparams of shape \(\) \(a scalar log-penalty log λ\); got shape \(3,\)"),
    (lambda: blt.RidgePerCoordinate.sample(0, dim=3).response(0.0), ValueError,
     r"hparams of shape \(3,\).*got shape \(\)"),
    (lambda: blt.RidgePerCoordinate.sample(0, dim=3, log_lam=[0.0, 1.0]), ValueError,
     r"log_lam to be a finite float or a finite array of shape \(3,\)"),
    (lambda: blt.Quadratic004.sample(0, dim=0), ValueError, r"dim >= 1"),
    (lambda: blt.Quadratic004.sample(0, lam_range=(0.4, 0.2)), ValueError,
     r"-1.0 < low <= high.*got lam_range=\(0.4, 0.2\)"),
    (lambda: blt.Quadratic004.sample(0, lam_range=(-1.5, 0.2)), ValueError, r"-1.0 < low"),
    (lambda: blt.Quadratic004.sample(0, lam_range=(0.2, np.inf)), ValueError, "both finite"),
    (lambda: blt.Quadratic004.sample(0, lam_range=0.3), TypeError, r"pair \(low, high\)"),
    (lambda: blt.Quadratic004.sample(0, max_condition=-2.0), ValueError, "max_condition"),
    (lambda: blt.Quadratic004.sample(0, response_grad_range=(0.0, 1.0)), ValueError,
     r"response_grad_range=\(low, high\) with 0.0 < low"),
    (lambda: blt.Quadratic004(np.ones(2), np.ones(2), [1.0, 0.0]), ValueError,
     r"every entry of h to be finite and > 0; got min h = "),
    (lambda: blt.Quadratic004(np.ones(2), np.ones(2), [1.0, -2.0]), ValueError, r"> 0"),
    (lambda: blt.Quadratic004(np.ones(2), np.ones(3), np.ones(2)), ValueError,
     r"one shape \(d,\).*theta_tilde \(3,\)"),
    (lambda: blt.UnrolledQuadratic.sample(0, steps=0), ValueError, r"steps >= 1; got steps=0"),
    (lambda: blt.UnrolledQuadratic.sample(0, steps=-3), ValueError, r"steps >= 1"),
    (lambda: blt.UnrolledQuadratic.sample(0, steps=2.0), TypeError, r"integer steps"),
    (lambda: blt.UnrolledQuadratic.sample(0, lr=0.0), ValueError, r"lr > 0.0; got lr=0.0"),
    (lambda: blt.UnrolledQuadratic.sample(0, lr=-0.1), ValueError, r"lr > 0.0"),
    (lambda: blt.UnrolledQuadratic.sample(0, max_condition=0.0), ValueError, "max_condition"),
    (lambda: blt.UnrolledQuadratic.sample(0, w0_scale=-1.0), ValueError, "w0_scale"),
    (lambda: blt.UnrolledQuadratic(Q2, [1.0, 2.0], [1, 1], Q2, [0, 0], lr=-0.1, steps=3),
     ValueError, r"lr to be finite and > 0"),
    (lambda: blt.UnrolledQuadratic(Q2, [1.0, 0.0], [1, 1], Q2, [0, 0], lr=0.1, steps=3),
     ValueError, r"every entry of a"),
    (lambda: blt.UnrolledQuadratic(2 * Q2, [1.0, 2.0], [1, 1], Q2, [0, 0], lr=0.1, steps=3),
     ValueError, r"Q to be orthogonal.*numpy.linalg.eigh"),
    (lambda: blt.UnrolledQuadratic(Q2, [1.0, 2.0], [1, 1], Q2, [0, 0], lr=0.1, steps=0),
     ValueError, r"steps >= 1"),
    (lambda: blt.UnrolledQuadratic(Q2, [1.0, 2.0], [1, 1, 1], Q2, [0, 0], lr=0.1, steps=2),
     ValueError, r"Q \(d, d\).*got Q \(2, 2\), a \(2,\), b \(3,\)"),
    (lambda: bst.ridge_problems(min_dim=5, max_dim=3), ValueError, r"min_dim <= max_dim"),
    (lambda: bst.ridge_problems(max_condition=0.1), ValueError, r"max_condition >= 1.0"),
    (lambda: bst.quadratic004_problems(lam_range=(1.0, 0.0)), ValueError, r"lam_range"),
    (lambda: bst.unrolled_quadratic_problems(max_steps=0), ValueError, r"max_steps >= 1"),
    (lambda: bst.unrolled_quadratic_problems(lr_range=(0.0, 1.0)), ValueError, r"lr_range"),
    (lambda: bst.ridge_per_coordinate_problems(dtype="int8"), TypeError, "floating dtype"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_arguments_raise_helpful_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float64_without_x64_is_refused():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"needs 64-bit mode.*dtype=jnp.float32"):
            blt.Ridge.sample(0, dtype=jnp.float64)
        assert blt.Ridge.sample(0, dim=2).dtype == jnp.float32


def test_value_checks_are_skipped_while_tracing():
    """Instances can be built from traced arrays (inside jit/vmap) without concrete checks."""
    q = blt.Quadratic004.sample(0, dim=3)
    out = jax.jit(lambda h: blt.Quadratic004(q.theta_bar, q.theta_tilde, h).value(0.1))(q.h)
    assert_close(out, q.value(0.1), rtol=1e-12)


# ---------------------------------------------------------------- strategies and docs


@given(any_problem(min_dim=3, max_dim=3, max_condition=2.0))
def test_strategies_respect_their_settings(exact):
    assert exact.params0.shape == (3,)
    eig = np.linalg.eigvalsh(f64(call(exact, "hessian", exact.hparams)))
    assert eig.max() / eig.min() <= 2.0 * (1 + 1e-9)
    if isinstance(exact, blt.UnrolledQuadratic):  # stable step size
        assert float(exact.lr) * eig.max() < 2.0


@given(bst.ridge_problems(dtype=jnp.float32))
def test_strategy_dtype(exact):
    assert exact.dtype == jnp.float32


STRATEGIES = [bst.ridge_problems, bst.ridge_per_coordinate_problems, bst.quadratic004_problems,
              bst.unrolled_quadratic_problems]


def _docstring_examples():
    objects = [blt, bst, *CLASSES, blt.AbstractExactProblem, *STRATEGIES]
    objects += [cls.sample for cls in CLASSES] + [blt.Quadratic004.optimal_hparams]
    for obj in objects:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", inspect.getdoc(obj), re.S)):
            yield pytest.param(block, id=f"{getattr(obj, '__qualname__', obj.__name__)}-{i}")


@pytest.mark.parametrize("code", list(_docstring_examples()))
def test_docstring_examples_run(code):
    exec(compile(code, "<docstring>", "exec"), {})


def test_every_public_name_is_documented():
    for obj in [*CLASSES, blt.AbstractExactProblem]:
        assert "**Example:**" in inspect.getdoc(obj), obj
    for obj in [cls.sample for cls in CLASSES] + STRATEGIES + [blt.Quadratic004.optimal_hparams]:
        doc = inspect.getdoc(obj)
        assert "**Returns:**" in doc and "**Example:**" in doc, obj
    for name in ("response", "hessian", "hypergrad", "identity_hypergrad", "value"):
        assert "**Arguments:**" in inspect.getdoc(getattr(blt.AbstractExactProblem, name))
        for cls in CLASSES:  # each override says its formula
            assert inspect.getdoc(getattr(cls, name)), (cls, name)
    for name in UNROLLED_METHODS:
        assert "**Arguments:**" in inspect.getdoc(getattr(blt.UnrolledQuadratic, name))


def test_testing_package_does_not_import_hypothesis():
    import subprocess
    import sys

    code = ("import sys; import bilevel.testing; "
            "assert 'hypothesis' not in sys.modules, 'hypothesis was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert isinstance(blt.Ridge.sample(0).problem, bl.Problem)
