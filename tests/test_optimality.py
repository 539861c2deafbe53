"""Optimality conditions under implicit: against closed forms, dense solves, jaxopt and autodiff.

Every expected value comes from a computation that does not go through `bilevel.implicit`:
the closed form of the solution on its support or active set, solved densely with NumPy, or
jaxopt's implicit differentiation of the same condition.

The tests are compile-bound (small problems, many distinct programs), so they compile with
`jax_disable_most_optimizations`, as tests/test_docs_pages.py does: the same programs with
fewer backend optimisations, far below the float64 tolerances asserted here. The references
(jaxopt's implicit differentiation, the closed forms of bilevel.testing) run jitted too: one
compilation each instead of one per eager operation.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import jaxopt

@pytest.fixture(autouse=True, scope="module")
def _quick_compilation():
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, True)
    yield
    jax.config.update(name, previous)


_JITTED = {}


def _hypergrad(problem, method):
    """`bl.hypergrad`, jitted: one compile per program instead of one per eager operation.

    One jit per distinct (problem, method) for the module, so equal methods built by different
    tests (e.g. the closed-form test of a condition and its jvp test) share their compilations;
    settings holding arrays (or tracers) get a jit of their own."""
    key = (problem, method)
    if any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree_util.tree_leaves(key)):
        return jax.jit(bl.hypergrad(problem, method))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(bl.hypergrad(problem, method))
    return _JITTED[key]


# --- a Lasso with a known support -------------------------------------------------------------

rng = np.random.default_rng(0)
N, D, M = 40, 8, 30
X = rng.normal(size=(N, D))
W_TRUE = np.array([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5])
Y = X @ W_TRUE + 0.3 * rng.normal(size=N)
XV = rng.normal(size=(M, D))
YV = XV @ W_TRUE + 0.3 * rng.normal(size=M)
LOG_LAM = np.log(0.15)
STEP = 1.0 / np.linalg.eigvalsh(X.T @ X / N).max()


def _lsq(w, lam, batch):
    A, b = batch
    return 0.5 * jnp.mean((A @ w - b) ** 2)


LASSO = bl.Problem(inner=_lsq, outer=_lsq)
TRAIN, VAL = (jnp.asarray(X), jnp.asarray(Y)), (jnp.asarray(XV), jnp.asarray(YV))


def _lasso_exact(log_lam, l2=0.0):
    """Solution and hypergradient from the closed form on the support (NumPy, no autodiff).

    The support and signs come from a long ISTA run; on the support
    (X_SᵀX_S/n + l2 I) w_S = X_Sᵀy/n − e^λ s, so dw_S/dλ = −e^λ (X_SᵀX_S/n + l2 I)⁻¹ s.
    """
    lam = np.exp(log_lam)
    w = np.zeros(D)
    for _ in range(20000):
        v = w - STEP * X.T @ (X @ w - Y) / N
        w = np.sign(v) * np.maximum(np.abs(v) - STEP * lam, 0) / (1 + STEP * l2)
    S = w != 0
    s = np.sign(w[S])
    G = X[:, S].T @ X[:, S] / N + l2 * np.eye(S.sum())
    w_exact = np.zeros(D)
    w_exact[S] = np.linalg.solve(G, X[:, S].T @ Y / N - lam * s)
    # KKT of the polished solution: the support is right.
    grad = X.T @ (X @ w_exact - Y) / N + l2 * w_exact
    assert np.all(np.abs(grad[~S]) < lam * (1 - 1e-3)) and np.all(np.sign(w_exact[S]) == s)
    dw = np.zeros(D)
    dw[S] = -lam * np.linalg.solve(G, s)
    gv = XV.T @ (XV @ w_exact - YV) / M
    return w_exact, gv @ dw, S


W_STAR, LASSO_GRAD, SUPPORT = _lasso_exact(LOG_LAM)


def _fista(steps=3000):
    return bl.proximal_gradient(bl.prox_l1(strength=jnp.exp), stepsize=STEP, steps=steps)


SOLVERS = {
    "cg": bl.cg(maxiter=100, tol=1e-12),
    "gmres": bl.gmres(maxiter=20, tol=1e-12),
    "bicgstab": bl.bicgstab(maxiter=200, tol=1e-12),
    "normal_cg": bl.normal_cg(maxiter=200, tol=1e-14),
    "exact": bl.exact(),
}


def test_the_lasso_support_is_nontrivial():
    assert 2 <= SUPPORT.sum() <= D - 2


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_lasso_hypergradient_is_the_closed_form_on_the_support(name):
    method = bl.implicit(_fista(), SOLVERS[name])
    out = _hypergrad(LASSO, method)(jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    np.testing.assert_allclose(out.params, W_STAR, atol=1e-10)
    np.testing.assert_allclose(out.grad, LASSO_GRAD, rtol=1e-8)
    assert int(out.stats["support_size"]) == SUPPORT.sum()
    assert float(out.stats["optimality_residual"]) < 1e-10 and float(out.stats["solve_residual"]) < 1e-8


def test_lasso_matches_jaxopt_custom_fixed_point():
    # jaxopt differentiates the same prox-gradient fixed point with its own linear solve.
    def fixed_point(w, log_lam):
        v = w - STEP * jax.grad(_lsq)(w, log_lam, TRAIN)
        return jaxopt.prox.prox_lasso(v, jnp.exp(log_lam), STEP)

    @jaxopt.implicit_diff.custom_fixed_point(
        lambda w, log_lam: fixed_point(w, log_lam),
        solve=lambda mv, b: jaxopt.linear_solve.solve_gmres(mv, b, tol=1e-13))
    def solve(init, log_lam):
        return bl.response(LASSO, _fista())(log_lam, init, TRAIN)

    ref = jax.jit(jax.grad(lambda h: _lsq(solve(jnp.zeros(D), h), h, VAL)))(jnp.asarray(LOG_LAM))
    ours = _hypergrad(LASSO, bl.implicit(_fista(), SOLVERS["cg"]))(
        jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL).grad
    np.testing.assert_allclose(ours, ref, rtol=1e-7)
    np.testing.assert_allclose(ours, LASSO_GRAD, rtol=1e-7)


def test_stationarity_of_the_penalised_loss_is_not_the_lasso_hypergradient():
    # The failure the prox condition fixes: stationarity of the nonsmooth loss solves the full
    # system H dw = −e^λ sign(w) instead of the one on the support. With n > d (here) the
    # number is near the right one but wrong; with n < d, H is singular and it blows up.
    penalised = bl.Problem(inner=lambda w, h, b: _lsq(w, h, b) + jnp.exp(h) * jnp.sum(jnp.abs(w)),
                           outer=_lsq)
    wrong = _hypergrad(penalised, bl.implicit(bl.solver(lambda h, w0, b: jnp.asarray(W_STAR)),
                                                bl.exact(), condition=bl.stationary()))(
        jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    assert abs(wrong.grad - LASSO_GRAD) > 1e-3 * abs(LASSO_GRAD)
    assert float(wrong.stats["inner_grad_norm"]) > 1e-3   # and stationarity is visibly violated


def test_a_solution_from_another_solver_with_tiny_nonzeros_keeps_the_support():
    # e.g. a coordinate-descent or interior-point Lasso solver that leaves 1e-13 where the
    # prox gives exact zeros: the support is read off the prox, so CG's system stays symmetric.
    noisy = jnp.asarray(np.where(SUPPORT, W_STAR, 1e-13))
    condition = bl.prox_fixed_point(bl.prox_l1(jnp.exp), stepsize=STEP)
    method = bl.implicit(bl.solver(lambda h, w0, b: noisy), bl.cg(tol=1e-12), condition=condition)
    out = _hypergrad(LASSO, method)(jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    assert int(out.stats["support_size"]) == SUPPORT.sum()
    np.testing.assert_allclose(out.grad, LASSO_GRAD, rtol=1e-8)


def test_lasso_unrolled_fista_converges_to_the_implicit_hypergradient():
    # Autodiff through the prox-gradient steps is an independent derivative of the same map.
    out = _hypergrad(LASSO, _fista(steps=3000))(jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    np.testing.assert_allclose(out.grad, LASSO_GRAD, rtol=1e-6)


def test_lasso_jvp_equals_grad_and_finite_differences():
    respond = bl.response(LASSO, bl.implicit(_fista(), bl.cg(tol=1e-12)))
    f = lambda h: _lsq(respond(h, jnp.zeros(D), TRAIN), h, VAL)  # noqa: E731
    _, tangent = jax.jit(lambda h, v: jax.jvp(f, (h,), (v,)))(jnp.asarray(LOG_LAM), jnp.asarray(1.0))
    np.testing.assert_allclose(tangent, LASSO_GRAD, rtol=1e-8)
    eps = 1e-5   # the support is stable within ±eps (checked by _lasso_exact's KKT margin)
    fd = (_lsq(_lasso_exact(LOG_LAM + eps)[0], 0, (XV, YV)) - _lsq(_lasso_exact(LOG_LAM - eps)[0], 0, (XV, YV))) / (2 * eps)
    np.testing.assert_allclose(LASSO_GRAD, fd, rtol=1e-6)


def test_elastic_net_hypergradient_is_the_closed_form():
    l2 = 0.3
    w_star, expected, _ = _lasso_exact(LOG_LAM, l2=l2)
    prox = bl.prox_elastic_net(l1=lambda h: jnp.exp(h), l2=lambda h: l2)
    method = bl.implicit(bl.proximal_gradient(prox, stepsize=STEP, steps=3000), bl.cg(tol=1e-12))
    out = _hypergrad(LASSO, method)(jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    np.testing.assert_allclose(out.params, w_star, atol=1e-10)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-8)


def test_per_coordinate_lasso_penalties():
    lam = np.full(D, np.exp(LOG_LAM))
    method = bl.implicit(_fista(), bl.cg(tol=1e-12))
    out = _hypergrad(LASSO, method)(jnp.log(lam), jnp.zeros(D), TRAIN, VAL)
    # d/dλ_i only moves w_S; the sum over coordinates is the scalar hypergradient.
    np.testing.assert_allclose(out.grad.sum(), LASSO_GRAD, rtol=1e-8)
    np.testing.assert_allclose(out.grad[~SUPPORT], 0.0, atol=1e-14)


def test_group_lasso_needs_and_works_with_a_nonsymmetric_solver():
    groups = jnp.asarray(np.reshape(np.arange(D), (4, 2)))   # rows are groups of 2 coordinates
    problem = bl.Problem(inner=lambda W, h, b: _lsq(W.reshape(-1), h, b),
                         outer=lambda W, h, b: _lsq(W.reshape(-1), h, b))
    fista = bl.proximal_gradient(bl.prox_group_l1(strength=jnp.exp), stepsize=STEP, steps=4000)
    with pytest.raises(ValueError, match="CG is only valid for symmetric systems.*gmres"):
        bl.implicit(fista, bl.cg())
    hg = _hypergrad(problem, bl.implicit(fista, bl.gmres(tol=1e-12)))
    out = hg(jnp.asarray(LOG_LAM), jnp.zeros((4, 2)), TRAIN, VAL)
    assert 0 < int(out.stats["support_size"]) < D
    del groups

    def value(h):   # finite differences of a long independent ISTA run
        W = np.zeros((4, 2))
        for _ in range(20000):
            V = W - STEP * (X.T @ (X @ W.reshape(-1) - Y) / N).reshape(4, 2)
            norms = np.linalg.norm(V, axis=1, keepdims=True)
            W = V * np.maximum(1 - STEP * np.exp(h) / np.maximum(norms, 1e-300), 0)
        return 0.5 * np.mean((XV @ W.reshape(-1) - YV) ** 2)

    eps = 1e-4
    np.testing.assert_allclose(out.grad, (value(LOG_LAM + eps) - value(LOG_LAM - eps)) / (2 * eps), rtol=1e-5)


# --- constrained problems ---------------------------------------------------------------------

Q_RNG = np.random.default_rng(1)
DQ = 6
_A = Q_RNG.normal(size=(DQ, DQ))
Q = _A @ _A.T / DQ + 0.5 * np.eye(DQ)
C = Q_RNG.normal(size=DQ) * 2
B = Q_RNG.normal(size=(DQ, 2))
TARGET = Q_RNG.normal(size=DQ)
LQ = np.linalg.eigvalsh(Q).max()


def _qp_inner(w, lam, batch):
    return 0.5 * w @ jnp.asarray(Q) @ w - (jnp.asarray(C) + jnp.asarray(B) @ lam) @ w


def _to_target(w, lam, batch):
    return 0.5 * jnp.sum((w - jnp.asarray(TARGET)) ** 2)


QP = bl.Problem(_qp_inner, _to_target)
LAM_Q = np.array([0.3, -0.2])


def _active_set_exact(w, free, lam):
    """Hypergradient of a QP whose coordinates outside `free` sit at a constant bound."""
    dw = np.zeros((DQ, 2))
    F = free
    dw[F] = np.linalg.solve(Q[np.ix_(F, F)], B[F])
    return (w - TARGET) @ dw


def _solve_box(lam, lo, hi, iters=20000):
    return _solve_box_cached(tuple(lam), lo, hi, iters).copy()


@functools.cache   # the same 20000-step NumPy solve serves the three solvers and the KKT test
def _solve_box_cached(lam, lo, hi, iters):
    lam = np.asarray(lam)
    w = np.zeros(DQ)
    for _ in range(iters):
        w = np.clip(w - (Q @ w - C - B @ lam) / LQ, lo, hi)
    return w


@pytest.mark.parametrize("name", ["cg", "gmres", "exact"])
def test_box_constrained_qp_hypergradient_is_the_active_set_closed_form(name):
    lo, hi = -2.0, 2.0
    w = _solve_box(LAM_Q, lo, hi)
    free = (w > lo + 1e-6) & (w < hi - 1e-6)
    assert 0 < free.sum() < DQ
    method = bl.implicit(bl.projected_gradient(bl.projection_box(lo, hi), stepsize=1 / LQ, steps=3000),
                         SOLVERS[name])
    out = _hypergrad(QP, method)(jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None)
    np.testing.assert_allclose(out.params, w, atol=1e-9)
    np.testing.assert_allclose(out.grad, _active_set_exact(w, free, LAM_Q), rtol=1e-7, atol=1e-12)


def test_nonnegative_qp_hypergradient_is_the_active_set_closed_form():
    w = _solve_box(LAM_Q, 0.0, np.inf)
    free = w > 1e-6
    assert 0 < free.sum() < DQ
    method = bl.implicit(bl.projected_gradient(bl.projection_nonneg(), stepsize=1 / LQ, steps=3000),
                         bl.cg(tol=1e-12))
    out = _hypergrad(QP, method)(jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None)
    np.testing.assert_allclose(out.grad, _active_set_exact(w, free, LAM_Q), rtol=1e-7, atol=1e-12)


def _project_simplex(v):
    """Euclidean projection onto the probability simplex (sort-based, NumPy)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.nonzero(u - cumulative / np.arange(1, v.size + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[k] / (k + 1), 0.0)


@functools.cache
def _simplex_exact_cached(lam):
    return _simplex_exact(np.asarray(lam))


def _simplex_exact(lam):
    """Solution on the simplex and its derivative from the KKT system on the support."""
    w = np.full(DQ, 1.0 / DQ)
    for _ in range(20000):
        w = _project_simplex(w - (Q @ w - C - B @ lam) / LQ)
    S = w > 1e-9
    k = S.sum()
    K = np.block([[Q[np.ix_(S, S)], np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
    sol = np.linalg.solve(K, np.vstack([B[S], np.zeros((1, 2))]))
    dw = np.zeros((DQ, 2))
    dw[S] = sol[:k]
    return w, (w - TARGET) @ dw, S


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "normal_cg", "exact"])
def test_simplex_constrained_hypergradient_is_the_kkt_closed_form(name):
    w, expected, S = _simplex_exact_cached(tuple(LAM_Q))
    assert 1 < S.sum() < DQ
    method = bl.implicit(bl.projected_gradient(bl.projection_simplex(), stepsize=1 / LQ, steps=3000),
                         SOLVERS[name])
    out = _hypergrad(QP, method)(jnp.asarray(LAM_Q), jnp.full(DQ, 1.0 / DQ), None, None)
    np.testing.assert_allclose(out.params, w, atol=1e-9)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-6, atol=1e-10)


def test_simplex_refuses_cg():
    with pytest.raises(ValueError, match="not symmetric.*simplex"):
        bl.implicit(bl.projected_gradient(bl.projection_simplex(), stepsize=0.1, steps=10), bl.cg())


# --- KKT ----------------------------------------------------------------------------------------

A_EQ = Q_RNG.normal(size=(2, DQ))
B_EQ = Q_RNG.normal(size=2)


def _kkt_dense(lam):
    """Equality-constrained QP: [[Q, Aᵀ], [A, 0]] [w; ν] = [c + Bλ; b] and its derivative."""
    K = np.block([[Q, A_EQ.T], [A_EQ, np.zeros((2, 2))]])
    sol = np.linalg.solve(K, np.concatenate([C + B @ lam, B_EQ]))
    dsol = np.linalg.solve(K, np.vstack([B, np.zeros((2, 2))]))
    w = sol[:DQ]
    return w, sol[DQ:], (w - TARGET) @ dsol[:DQ]


def _kkt_solver(lam, params0, batch):
    K = jnp.block([[jnp.asarray(Q), jnp.asarray(A_EQ).T], [jnp.asarray(A_EQ), jnp.zeros((2, 2))]])
    sol = jnp.linalg.solve(jax.lax.stop_gradient(K), jnp.concatenate([jnp.asarray(C) + jnp.asarray(B) @ lam,
                                                                     jnp.asarray(B_EQ)]))
    return (sol[:DQ], sol[DQ:], None)


KKT_QP = bl.Problem(inner=lambda p, lam, b: _qp_inner(p[0], lam, b), outer=lambda p, lam, b: _to_target(p[0], lam, b))
EQ = bl.kkt(eq=lambda w, lam, b: jnp.asarray(A_EQ) @ w - jnp.asarray(B_EQ))


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "normal_cg", "exact"])
def test_equality_constrained_qp_through_kkt(name):
    w, nu, expected = _kkt_dense(LAM_Q)
    method = bl.implicit(bl.solver(lambda *a: jax.lax.stop_gradient(_kkt_solver(*a))), SOLVERS[name],
                         condition=EQ)
    out = _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), jnp.zeros(2), None), None, None)
    np.testing.assert_allclose(out.params[0], w, atol=1e-10)
    np.testing.assert_allclose(out.params[1], nu, atol=1e-10)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-7, atol=1e-12)
    assert float(out.stats["optimality_residual"]) < 1e-9


def test_inequality_constrained_qp_through_kkt_matches_the_box_active_set():
    # The box QP again, as KKT with w − hi ≤ 0 and lo − w ≤ 0 and multipliers from the solve.
    lo, hi = -2.0, 2.0
    w = _solve_box(LAM_Q, lo, hi)
    free = (w > lo + 1e-6) & (w < hi - 1e-6)
    g = Q @ w - C - B @ LAM_Q
    mu = np.concatenate([np.maximum(-g, 0) * (w >= hi - 1e-6), np.maximum(g, 0) * (w <= lo + 1e-6)])

    def solve(lam, params0, batch):
        return (jnp.asarray(w), None, jnp.asarray(mu))

    ineq = bl.kkt(ineq=lambda w_, lam, b: jnp.concatenate([w_ - hi, lo - w_]))
    method = bl.implicit(bl.solver(solve), bl.gmres(tol=1e-12), condition=ineq)
    out = _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), None, jnp.zeros(2 * DQ)), None, None)
    assert float(out.stats["optimality_residual"]) < 1e-8
    np.testing.assert_allclose(out.grad, _active_set_exact(w, free, LAM_Q), rtol=1e-6, atol=1e-10)


def test_kkt_matches_jaxopt_custom_root():
    w, nu, _ = _kkt_dense(LAM_Q)

    def optimality(params, lam):
        w_, nu_ = params
        grad = jax.grad(lambda v: _qp_inner(v, lam, None) + nu_ @ (jnp.asarray(A_EQ) @ v - jnp.asarray(B_EQ)))(w_)
        return grad, jnp.asarray(A_EQ) @ w_ - jnp.asarray(B_EQ)

    @jaxopt.implicit_diff.custom_root(
        optimality, solve=lambda mv, b: jaxopt.linear_solve.solve_gmres(mv, b, tol=1e-13))
    def solve(init, lam):
        return _kkt_solver(lam, None, None)[:2]

    ref = jax.jit(jax.grad(lambda lam: _to_target(solve(None, lam)[0], lam, None)))(jnp.asarray(LAM_Q))
    method = bl.implicit(bl.solver(_kkt_solver), bl.exact(), condition=EQ)
    ours = _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), jnp.zeros(2), None), None, None)
    np.testing.assert_allclose(ours.grad, ref, rtol=1e-9)


# --- user fixed-point maps --------------------------------------------------------------------

_T = Q_RNG.normal(size=(DQ, DQ))
A_FP = 0.8 * _T / np.linalg.norm(_T, 2)     # a non-symmetric contraction, ‖A‖ = 0.8


def _map(w, lam, batch):
    return jnp.asarray(A_FP) @ w + jnp.asarray(B) @ lam + jnp.asarray(C)


def _iterate(lam, w0, batch):
    return jax.lax.fori_loop(0, 300, lambda _, w: _map(w, lam, batch), w0)


FP_PROBLEM = bl.Problem(inner=lambda w, lam, b: 0.0 * jnp.sum(w), outer=_to_target)


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "normal_cg", "exact"])
def test_fixed_point_hypergradient_is_the_closed_form(name):
    inv = np.linalg.inv(np.eye(DQ) - A_FP)
    w = inv @ (B @ LAM_Q + C)
    expected = (w - TARGET) @ inv @ B
    method = bl.implicit(bl.solver(_iterate), SOLVERS[name], condition=bl.fixed_point(_map))
    out = _hypergrad(FP_PROBLEM, method)(jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None)
    np.testing.assert_allclose(out.params, w, atol=1e-10)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-8)


def test_fixed_point_with_neumann_is_the_tangent_fixed_point_iteration():
    inv = np.linalg.inv(np.eye(DQ) - A_FP)
    w = inv @ (B @ LAM_Q + C)
    method = bl.implicit(bl.solver(_iterate), bl.neumann(terms=200, alpha=1.0), condition=bl.fixed_point(_map))
    out = _hypergrad(FP_PROBLEM, method)(jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None)
    np.testing.assert_allclose(out.grad, (w - TARGET) @ inv @ B, rtol=1e-8)


def test_fixed_point_refuses_cg():
    with pytest.raises(ValueError, match="only valid for symmetric.*fixed-point"):
        bl.implicit(bl.solver(_iterate), bl.cg(), condition=bl.fixed_point(_map))


# --- every condition: jvp = grad·v, vmap, no retrace ---------------------------------------------

# The same methods (settings included) as the closed-form tests above use, so their hypergrad
# programs are compiled once for both (see `_hypergrad`).
CASES = {
    "lasso": (LASSO, bl.implicit(_fista(), SOLVERS["cg"]), jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL),
    "box": (QP, bl.implicit(bl.projected_gradient(bl.projection_box(-2.0, 2.0), stepsize=1 / LQ, steps=3000),
                            SOLVERS["cg"]),
            jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None),
    "simplex": (QP, bl.implicit(bl.projected_gradient(bl.projection_simplex(), stepsize=1 / LQ, steps=3000),
                                SOLVERS["gmres"]),
                jnp.asarray(LAM_Q), jnp.full(DQ, 1.0 / DQ), None, None),
    "kkt": (KKT_QP, bl.implicit(bl.solver(_kkt_solver), bl.exact(), condition=EQ), jnp.asarray(LAM_Q),
            (jnp.zeros(DQ), jnp.zeros(2), None), None, None),
    "fixed_point": (FP_PROBLEM, bl.implicit(bl.solver(_iterate), SOLVERS["gmres"], condition=bl.fixed_point(_map)),
                    jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_jvp_equals_grad_dot_v_for_every_condition(case):
    problem, method, h, p0, tr, va = CASES[case]
    hg = _hypergrad(problem, method)
    grad = hg(h, p0, tr, va).grad
    v = jnp.linspace(0.5, -1.0, jnp.size(h)).reshape(jnp.shape(h))
    _, tangent = jax.jvp(lambda x: hg(x, p0, tr, va).value, (h,), (v,))
    np.testing.assert_allclose(tangent, jnp.vdot(grad, v), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["lasso", "simplex"])
def test_vmap_and_no_retrace_for_new_hyperparameter_values(case):
    problem, method, h, p0, tr, va = CASES[case]
    traces = []

    def count(x):
        traces.append(1)
        return _hypergrad(problem, method)(x, p0, tr, va).grad

    f = jax.jit(count)
    one, two = f(h), f(h + 0.01)
    assert len(traces) == 1
    both = jax.jit(jax.vmap(count))(jnp.stack([h, h + 0.01]))
    np.testing.assert_allclose(both, jnp.stack([one, two]), rtol=1e-9, atol=1e-12)


def test_lasso_hyper_hessian_matches_finite_differences_of_the_closed_form():
    hg = _hypergrad(LASSO, bl.implicit(_fista(), bl.cg(tol=1e-13)))
    second = jax.grad(lambda h: hg(h, jnp.zeros(D), TRAIN, VAL).grad)(jnp.asarray(LOG_LAM))
    eps = 1e-4
    fd = (_lasso_exact(LOG_LAM + eps)[1] - _lasso_exact(LOG_LAM - eps)[1]) / (2 * eps)
    np.testing.assert_allclose(second, fd, rtol=1e-5)


# --- nonconvex inner problems -----------------------------------------------------------------


def test_a_saddle_point_is_flagged_by_cg_and_solved_by_gmres():
    # A two-layer net w = (a, b) with loss ½(ab − λ)² + ε(a² − b²)/2 has a saddle at 0 when
    # λ = 0 is reached from a = b = 0: the Hessian [[ε, −λ],[−λ, −ε]]-like block is indefinite.
    eps = 0.1

    def inner(w, lam, _):
        a, b = w[0], w[1]
        return 0.5 * (a * b - lam) ** 2 + 0.5 * eps * (a**2 - b**2) + 0.5 * jnp.sum(w[2:] ** 2)

    problem = bl.Problem(inner, lambda w, lam, _: jnp.sum(w * jnp.arange(1.0, 4.0)))
    reached = bl.solver(lambda lam, w0, b: jnp.zeros(3))          # the saddle: ∇ = 0 at λ = 0
    H = jax.jit(jax.hessian(inner))(jnp.zeros(3), 0.0, None)
    assert np.linalg.eigvalsh(H).min() < 0 < np.linalg.eigvalsh(H).max()
    cross = jax.jit(jax.jacfwd(jax.grad(inner), argnums=1))(jnp.zeros(3), 0.0, None)
    expected = -jnp.arange(1.0, 4.0) @ np.linalg.solve(H, cross)
    out_cg = jax.jit(bl.hypergrad(problem, bl.implicit(reached, bl.cg(maxiter=10))))(0.0, jnp.zeros(3), None, None)
    assert bool(out_cg.stats["solve_negative_curvature"])
    out_gmres = jax.jit(bl.hypergrad(problem, bl.implicit(reached, bl.gmres(tol=1e-12))))(
        0.0, jnp.zeros(3), None, None)
    np.testing.assert_allclose(out_gmres.grad, expected, atol=1e-10)
    assert not bool(out_cg.stats["solve_negative_curvature"]) or float(out_gmres.stats["solve_residual"]) < 1e-10


def test_a_small_mlp_far_from_a_minimum_has_negative_curvature_reported():
    rng_ = np.random.default_rng(3)
    Xs, ys = jnp.asarray(rng_.normal(size=(20, 3))), jnp.asarray(rng_.normal(size=20))

    def inner(p, log_lam, _):
        hidden = jnp.tanh(Xs @ p["W"] + p["b"])
        return 0.5 * jnp.mean((hidden @ p["v"] - ys) ** 2) + 0.5 * jnp.exp(log_lam) * (
            jnp.sum(p["W"] ** 2) + jnp.sum(p["v"] ** 2))

    problem = bl.Problem(inner, lambda p, h, _: jnp.sum(p["v"] ** 2))
    p0 = {"W": jnp.asarray(rng_.normal(size=(3, 4))), "b": jnp.zeros(4), "v": jnp.asarray(rng_.normal(size=4))}
    out = jax.jit(bl.hypergrad(problem, bl.implicit(bl.unroll(optax.sgd(0.05), steps=3), bl.cg(maxiter=50))))(
        jnp.asarray(-4.0), p0, None, None)
    flat, unravel = jax.flatten_util.ravel_pytree(out.params)
    H = jax.jit(jax.hessian(lambda f: inner(unravel(f), -4.0, None)))(flat)
    assert np.linalg.eigvalsh(H).min() < 0      # the reached point is not a minimum
    assert bool(out.stats["solve_negative_curvature"])


# --- bad input --------------------------------------------------------------------------------


def test_a_prox_with_the_wrong_output_shape_is_a_clear_error():
    bad = bl.prox(lambda v, h, step: v[:-1])
    method = bl.implicit(bl.proximal_gradient(bad, stepsize=0.1, steps=3), bl.gmres())
    with pytest.raises(ValueError, match="prox or projection must return.*structure and shapes"):
        _hypergrad(LASSO, method)(jnp.asarray(0.0), jnp.zeros(D), TRAIN, VAL)


def test_a_fixed_point_map_with_the_wrong_output_is_a_clear_error():
    method = bl.implicit(bl.solver(_iterate), bl.gmres(), condition=bl.fixed_point(lambda w, h, b: w.sum()))
    with pytest.raises(ValueError, match=r"fixed_point\(fn\).*must return"):
        _hypergrad(FP_PROBLEM, method)(jnp.asarray(LAM_Q), jnp.zeros(DQ), None, None)


def test_kkt_with_inconsistent_multipliers_is_a_clear_error():
    method = bl.implicit(bl.solver(lambda lam, p0, b: p0), bl.exact(), condition=EQ)
    with pytest.raises(ValueError, match=r"`eq\(w, hparams, batch\)` returned.*multipliers"):
        _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), jnp.zeros(3), None), None, None)
    with pytest.raises(ValueError, match="triple"):
        _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), jnp.zeros(2)), None, None)
    with pytest.raises(ValueError, match="ineq multipliers.*`ineq` is None"):
        _hypergrad(KKT_QP, method)(jnp.asarray(LAM_Q), (jnp.zeros(DQ), jnp.zeros(2), jnp.zeros(1)), None, None)


@pytest.mark.parametrize("build, match", [
    (lambda: bl.prox_l1(strength=0.1), "callable hparams -> penalty"),
    (lambda: bl.prox_elastic_net(None, l2=0.1), "`l2` to be a callable"),
    (lambda: bl.prox(3.0), "callable"),
    (lambda: bl.projection_box(1.0, -1.0), "lower < upper"),
    (lambda: bl.projection_simplex(-1.0), "radius"),
    (lambda: bl.projection_l2_ball("big"), "radius"),
    (lambda: bl.prox_fixed_point(lambda v, h, s: v), "prox built by"),
    (lambda: bl.prox_fixed_point(bl.prox_l1(), stepsize=0.0), "stepsize"),
    (lambda: bl.proximal_gradient(bl.prox_l1(), stepsize=0.1, steps=0), "steps"),
    (lambda: bl.proximal_gradient(bl.prox_l1(), stepsize=float("nan"), steps=3), "finite"),
    (lambda: bl.kkt(), "at least one"),
    (lambda: bl.kkt(eq=3), "callable"),
    (lambda: bl.fixed_point(None), "callable"),
    (lambda: bl.implicit(_fista(), bl.cg(), condition="prox"), "condition built by"),
    (lambda: bl.bicgstab(maxiter=0), "maxiter"),
    (lambda: bl.normal_cg(tol=float("inf")), "finite"),
])
def test_bad_settings_are_refused_when_built(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_proximal_gradient_refuses_per_step_data():
    stacked = bl.per_step((jnp.stack([TRAIN[0]] * 3), jnp.stack([TRAIN[1]] * 3)))
    with pytest.raises(ValueError, match="per_step"):
        bl.response(LASSO, _fista(steps=3))(jnp.asarray(0.0), jnp.zeros(D), stacked)


# --- the exact problems of bilevel.testing ------------------------------------------------------
# Their closed forms are checked against sklearn, scipy and finite differences of independent
# solves in tests/test_testing_conditions.py; here they check the conditions end to end.

import equinox as eqx  # noqa: E402

import bilevel.testing as blt  # noqa: E402
import bilevel.testing.strategies as bst  # noqa: E402
from hypothesis import given  # noqa: E402


def _fista_for(exact, prox, steps=600):
    return bl.proximal_gradient(prox, stepsize=1.0 / float(exact.lipschitz), steps=steps)


def _closed_form_solver(exact):
    return bl.solver(lambda h, p0, b: exact.response(h))


CONDITION_PROBLEMS = {
    "lasso": (lambda: blt.Lasso.sample(0, dim=6), lambda e: bl.implicit(_fista_for(e, bl.prox_l1(jnp.exp)), bl.cg(tol=1e-12))),
    "elastic_net": (lambda: blt.ElasticNet.sample(1, dim=6), lambda e: bl.implicit(
        _fista_for(e, bl.prox_elastic_net(lambda h: jnp.exp(h[0]), lambda h: jnp.exp(h[1]))), bl.cg(tol=1e-12))),
    "box_qp": (lambda: blt.BoxQP.sample(2, dim=6), lambda e: bl.implicit(
        _fista_for(e, bl.projection_box(e.lower, e.upper)), bl.cg(tol=1e-12))),
    "nnls": (lambda: blt.NonnegativeLeastSquares.sample(3, dim=6), lambda e: bl.implicit(
        _fista_for(e, bl.projection_nonneg()), bl.cg(tol=1e-12))),
    "simplex": (lambda: blt.SimplexLeastSquares.sample(4, dim=6), lambda e: bl.implicit(
        _fista_for(e, bl.projection_simplex(), steps=2000), bl.gmres(tol=1e-12))),
    "equality_qp": (lambda: blt.EqualityQP.sample(5, dim=6), lambda e: bl.implicit(
        _closed_form_solver(e), bl.gmres(tol=1e-12), condition=bl.kkt(eq=e.eq))),
    "inequality_qp": (lambda: blt.InequalityQP.sample(6, dim=6), lambda e: bl.implicit(
        _closed_form_solver(e), bl.exact(), condition=bl.kkt(ineq=e.ineq))),
    "contraction": (lambda: blt.Contraction.sample(7, dim=6), lambda e: bl.implicit(
        _closed_form_solver(e), bl.bicgstab(tol=1e-12), condition=bl.fixed_point(e.T))),
}


def _jaxopt_fixed_point_builders():
    """The same conditions written with jaxopt's own proxes and projections."""
    def gradient_step(exact, eta):
        return lambda w, h: w - eta * jax.grad(exact.problem.inner)(w, h, exact.inner_batch)

    def elastic_net(e, eta):
        step = gradient_step(e, eta)
        return lambda w, h: jaxopt.prox.prox_elastic_net(
            step(w, h), (jnp.exp(h[0]), jnp.exp(h[1]) / jnp.exp(h[0])), eta)

    def box(e, eta):
        return lambda w, h: jaxopt.projection.projection_box(gradient_step(e, eta)(w, h), (e.lower, e.upper))

    def nonneg(e, eta):
        return lambda w, h: jaxopt.projection.projection_non_negative(gradient_step(e, eta)(w, h))

    def simplex(e, eta):
        return lambda w, h: jaxopt.projection.projection_simplex(gradient_step(e, eta)(w, h))

    return {"elastic_net": elastic_net, "box_qp": box, "nnls": nonneg, "simplex": simplex,
            "contraction": lambda e, eta: lambda w, h: e.T(w, h, e.inner_batch)}


JAXOPT_FIXED_POINTS = _jaxopt_fixed_point_builders()


def _jaxopt_hypergrad(exact, build):
    fixed_point = build(exact, 1.0 / float(getattr(exact, "lipschitz", 1.0)))

    @jaxopt.implicit_diff.custom_fixed_point(
        fixed_point, solve=lambda mv, b: jaxopt.linear_solve.solve_gmres(mv, b, tol=1e-13))
    def solve(init, h):
        return exact.response(jax.lax.stop_gradient(h))

    return jax.jit(jax.grad(lambda h: exact.problem.outer(solve(exact.params0, h), h, exact.outer_batch)))(
        exact.hparams)


@pytest.mark.parametrize("name", sorted(CONDITION_PROBLEMS))
def test_every_exact_condition_problem_and_jaxopt(name):
    make, method_for = CONDITION_PROBLEMS[name]
    exact = make()
    out = jax.jit(bl.hypergrad(exact.problem, method_for(exact)))(
        exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    assert bool(exact.is_valid(exact.hparams))
    np.testing.assert_allclose(out.grad, EXACT_HYPERGRAD(exact, exact.hparams), rtol=1e-7, atol=1e-10)
    assert float(out.stats["optimality_residual"]) < 1e-8
    if name in JAXOPT_FIXED_POINTS:   # the same condition through jaxopt's custom_fixed_point
        np.testing.assert_allclose(out.grad, _jaxopt_hypergrad(exact, JAXOPT_FIXED_POINTS[name]),
                                   rtol=1e-7, atol=1e-10)


# One method (and one compile per size) for every drawn problem: η = 1/10 is valid for all,
# since the strategies bound the Hessian's eigenvalues to [1, max_condition = 10].
DRAWN_STEP = 0.1
DRAWN_LASSO = jax.jit(bl.hypergrad(blt.Lasso.sample(0, dim=2).problem, bl.implicit(
    bl.proximal_gradient(bl.prox_l1(jnp.exp), stepsize=DRAWN_STEP, steps=800), bl.cg(tol=1e-12))))


EXACT_HYPERGRAD = eqx.filter_jit(lambda exact, h: exact.hypergrad(h))   # compiled: faster than eager ops


@given(bst.lasso_problems(max_dim=7, max_condition=1 / DRAWN_STEP))
def test_lasso_hypergradient_on_drawn_sizes_and_supports(exact):
    assert float(exact.lipschitz) <= 1 / DRAWN_STEP
    out = DRAWN_LASSO(exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    np.testing.assert_allclose(out.grad, EXACT_HYPERGRAD(exact, exact.hparams), rtol=1e-6, atol=1e-10)
    assert int(out.stats["support_size"]) == int((exact.signs != 0).sum())


BOX_PROBLEM = blt.BoxQP.sample(0, dim=2).problem


def _box_hypergrad(hparams, inner_batch, outer_batch, lower, upper):
    method = bl.implicit(bl.projected_gradient(bl.projection_box(lower, upper), stepsize=DRAWN_STEP, steps=800),
                         bl.cg(tol=1e-12))
    return _hypergrad(BOX_PROBLEM, method)(hparams, jnp.zeros_like(lower), inner_batch, outer_batch)


DRAWN_BOX = jax.jit(_box_hypergrad)


@given(bst.box_qp_problems(max_dim=6, max_hparams=2, max_condition=1 / DRAWN_STEP))
def test_box_qp_hypergradient_on_drawn_sizes_and_active_sets(exact):
    assert float(exact.lipschitz) <= 1 / DRAWN_STEP
    out = DRAWN_BOX(exact.hparams, exact.inner_batch, exact.outer_batch, exact.lower, exact.upper)
    np.testing.assert_allclose(out.grad, EXACT_HYPERGRAD(exact, exact.hparams), rtol=1e-6, atol=1e-10)


def test_stationarity_with_a_prox_method_reports_the_stationarity_residual():
    # Pairing proximal_gradient with condition=stationary() differentiates ∇f = 0, which the
    # Lasso solution does not satisfy: the stats must say so rather than show the prox residual.
    out = _hypergrad(LASSO, bl.implicit(_fista(), bl.cg(), condition=bl.stationary()))(
        jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    assert "optimality_residual" not in out.stats and float(out.stats["inner_grad_norm"]) > 1e-2


def test_concrete_jax_scalars_are_accepted_as_settings():
    L = jnp.linalg.eigvalsh(jnp.asarray(X.T @ X / N)).max()
    method = bl.proximal_gradient(bl.prox_l1(jnp.exp), stepsize=1 / L, steps=jnp.asarray(3000))
    assert isinstance(method.stepsize, float) and method.steps == 3000
    out = _hypergrad(LASSO, bl.implicit(method, bl.cg(tol=1e-12)))(jnp.asarray(LOG_LAM), jnp.zeros(D), TRAIN, VAL)
    np.testing.assert_allclose(out.grad, LASSO_GRAD, rtol=1e-8)


