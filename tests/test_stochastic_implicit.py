"""Implicit differentiation with minibatch (per-step) training data, and warm-started
backward solves carried between outer steps.

References are dense NumPy float64 computations of the same formulas: the IFT with the
Hessian of the mean (or of one minibatch's) loss, and the truncated Neumann series.
The problems are tiny, so compiling dominates: the module runs with
`jax_disable_most_optimizations` (as tests/test_optimality.py does).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl

N, D = 48, 3


pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py


def _inner(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w


def _outer(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


PROBLEM = bl.Problem(inner=_inner, outer=_outer)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, D)) * np.array([1.0, 0.7, 0.4])
Y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * RNG.normal(size=N)
XV = RNG.normal(size=(20, D))
YV = XV @ np.array([1.0, -2.0, 0.5])
LOG_LAM = np.log(0.3)


def _hessian(Xb):
    return Xb.T @ Xb / len(Xb) + np.exp(LOG_LAM) * np.eye(D)


def _w_star():
    return np.linalg.solve(_hessian(X), X.T @ Y / N)


def _pieces(w):
    """(∂L_V/∂w, cross = ∂²L_T/∂λ∂w) at w; the outer loss does not depend on λ directly."""
    g = XV.T @ (XV @ w - YV) / len(XV)
    return g, np.exp(LOG_LAM) * w


def _ift(w, H):
    g, cross = _pieces(w)
    return -cross @ np.linalg.solve(H, g)


def _series(w, H, terms, alpha):
    g, cross = _pieces(w)
    M = np.eye(D) - alpha * H
    total = sum(np.linalg.matrix_power(M, j) for j in range(terms + 1))
    return -cross @ (alpha * total @ g)


def _frozen(steps):
    """A forward pass that stays at params0 (sgd with rate 0), so w is the same for every draw."""
    return bl.unroll(optax.sgd(0.0), steps=steps)


def _blocks(T):
    """The rows split into T equal consecutive minibatches (their mean loss is the full loss)."""
    return bl.per_step((jnp.asarray(X.reshape(T, N // T, D)), jnp.asarray(Y.reshape(T, N // T))))


def test_mean_and_given_curvature_give_the_full_batch_ift():
    w = _w_star()
    T = 6
    want = _ift(w, _hessian(X))
    for curvature, data in (("mean", _blocks(T)),
                            ("given", bl.per_step(_blocks(T).batches, curvature=(X, Y)))):
        method = bl.implicit(_frozen(T), bl.cg(maxiter=50, tol=1e-13), curvature=curvature)
        out = jax.jit(bl.hypergrad(PROBLEM, method))(jnp.asarray(LOG_LAM), jnp.asarray(w), data, (XV, YV))
        np.testing.assert_allclose(out.grad, want, rtol=1e-10, err_msg=curvature)
        assert out.stats["inner_grad_norm"] < 1e-12      # w* is stationary for the mean loss
        assert out.stats["solve_residual"] < 1e-12


def test_last_curvature_uses_the_last_minibatch():
    w = _w_star()
    data = _blocks(6)
    method = bl.implicit(_frozen(6), bl.exact(), curvature="last")
    out = jax.jit(bl.hypergrad(PROBLEM, method))(jnp.asarray(LOG_LAM), jnp.asarray(w), data, (XV, YV))
    np.testing.assert_allclose(out.grad, _ift(w, _hessian(X[-N // 6:])), rtol=1e-10)
    assert abs(_ift(w, _hessian(X[-N // 6:])) - _ift(w, _hessian(X))) > 1e-3   # they differ
    # stationarity is reported for the data the IFT uses: w* is not stationary on one block
    g_last = _hessian(X[-8:]) @ w - X[-8:].T @ Y[-8:] / 8
    np.testing.assert_allclose(out.stats["inner_grad_norm"], np.linalg.norm(g_last), rtol=1e-10)


def test_per_term_neumann_is_unbiased_for_the_full_batch_series():
    """The stochastic Neumann estimate (a fresh minibatch per term) averages to the
    deterministic truncated series with the full-batch Hessian; one minibatch for every term
    does not. Bounds: 5 standard errors of the mean over 4000 independent draws."""
    w, T, B, terms, alpha = _w_star(), 12, 2, 8, 0.5
    truth = _series(w, _hessian(X), terms, alpha)

    def estimates(curvature, draws):
        method = bl.implicit(_frozen(T), bl.neumann(terms=terms, alpha=alpha), curvature=curvature)
        hg = bl.hypergrad(PROBLEM, method)

        def one(key):
            idx = jax.random.randint(key, (T, B), 0, N)   # rows drawn with replacement
            return hg(jnp.asarray(LOG_LAM), jnp.asarray(w), bl.per_step((jnp.asarray(X)[idx], jnp.asarray(Y)[idx])), (XV, YV)).grad

        return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), draws)))

    per_term = estimates("per_term", 4000)
    sem = per_term.std() / np.sqrt(len(per_term))
    assert abs(per_term.mean() - truth) < 5 * sem, (per_term.mean(), truth, sem)
    last = estimates("last", 4000)
    sem_last = last.std() / np.sqrt(len(last))
    assert abs(last.mean() - truth) > 5 * sem_last, (last.mean(), truth, sem_last)   # biased


def test_per_term_cg_uses_one_minibatch_per_iteration():
    """With identical minibatches, per-term CG is CG on that batch; with different ones its
    result differs from CG on the last batch (each iteration saw another Hessian)."""
    w, T = _w_star(), 6
    same = bl.per_step((jnp.asarray(np.stack([X[:8]] * T)), jnp.asarray(np.stack([Y[:8]] * T))))
    method = bl.implicit(_frozen(T), bl.cg(maxiter=20, tol=1e-13), curvature="per_term")
    hg = jax.jit(bl.hypergrad(PROBLEM, method))
    out = hg(jnp.asarray(LOG_LAM), jnp.asarray(w), same, (XV, YV))
    np.testing.assert_allclose(out.grad, _ift(w, _hessian(X[:8])), rtol=1e-9)
    other = hg(jnp.asarray(LOG_LAM), jnp.asarray(w), _blocks(T), (XV, YV))
    assert abs(other.grad - _ift(w, _hessian(X[-8:]))) > 1e-4


def test_adjoint_is_the_backward_solution_and_warm_starts_the_next_solve():
    w = _w_star()
    H = _hessian(X)
    g, _ = _pieces(w)
    args = (jnp.asarray(LOG_LAM), jnp.asarray(w), (X, Y), (XV, YV))
    for solver in (bl.cg(maxiter=50, tol=1e-12), bl.gmres(maxiter=5, tol=1e-12),
                   bl.bicgstab(tol=1e-12), bl.normal_cg(tol=1e-14), bl.exact()):
        hg = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(_frozen(1), solver)))
        cold = hg(*args)
        np.testing.assert_allclose(cold.adjoint, np.linalg.solve(H, g), rtol=1e-9, err_msg=repr(solver))
        warm = hg(*args, adjoint0=cold.adjoint)
        np.testing.assert_allclose(warm.grad, cold.grad, rtol=1e-10, err_msg=repr(solver))
    cg = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(_frozen(1), bl.cg(maxiter=50, tol=1e-10))))
    assert cg(*args).stats["solve_iterations"] == D               # CG from zero: D iterations
    assert cg(*args, adjoint0=jnp.asarray(np.linalg.solve(H, g))).stats["solve_iterations"] == 0


def test_neumann_from_a_warm_start_continues_the_series():
    """From x0, `neumann(k)` returns x0 + α Σ_{j≤k} (I − αH)^j (b − H x0): the Richardson
    iteration continued, which reaches the exact solution as warm starts are chained."""
    w = _w_star()
    H = _hessian(X)
    g, cross = _pieces(w)
    alpha, terms = 0.5, 3
    x0 = np.array([0.3, -0.2, 0.1])
    M = np.eye(D) - alpha * H
    want_x = x0 + alpha * sum(np.linalg.matrix_power(M, j) for j in range(terms + 1)) @ (g - H @ x0)
    hg = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(_frozen(1), bl.neumann(terms=terms, alpha=alpha))))
    args = (jnp.asarray(LOG_LAM), jnp.asarray(w), (X, Y), (XV, YV))
    out = hg(*args, adjoint0=jnp.asarray(x0))
    np.testing.assert_allclose(out.adjoint, want_x, rtol=1e-10)
    np.testing.assert_allclose(out.grad, -cross @ want_x, rtol=1e-10)
    adjoint = None
    for _ in range(30):
        adjoint = hg(*args, adjoint0=adjoint).adjoint
    np.testing.assert_allclose(adjoint, np.linalg.solve(H, g), rtol=1e-8)


def test_hyperopt_carries_the_adjoint_and_needs_fewer_iterations():
    """40 outer steps on a 40-feature ridge with a spread spectrum (condition number ~1e3),
    where a cold CG solve needs ~20 iterations to a relative residual of 1e-4."""
    rng = np.random.default_rng(3)
    d = 40
    Xb = rng.normal(size=(400, d)) * np.geomspace(1.0, 0.03, d)
    yb = Xb @ rng.normal(size=d) + 0.1 * rng.normal(size=400)
    train, val = (Xb[:300], yb[:300]), (Xb[300:], yb[300:])
    method = bl.implicit(bl.solver(lambda h, w0, b: jnp.linalg.solve(
        b[0].T @ b[0] / len(b[1]) + jnp.exp(h) * jnp.eye(d), b[0].T @ b[1] / len(b[1]))),
        bl.cg(maxiter=200, tol=1e-4))
    runs = {}
    for warm in (False, True):
        driver = bl.hyperopt(PROBLEM, method, optax.adam(0.05), warm_start_solve=warm)
        state = driver.init(jnp.asarray(-3.0), jnp.zeros(d))
        assert (state.adjoint is None) != warm
        step = jax.jit(lambda s: driver.step(s, train, val))
        iterations, values = [], []
        for _ in range(40):
            state, info = step(state)
            iterations.append(int(info.stats["solve_iterations"]))
            values.append(float(info.value))
        assert info.stats["solve_residual"] < 1e-4
        runs[warm] = (np.asarray(iterations), np.asarray(values))
    # the same run up to the solve tolerance
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-4)
    # CG's iterations grow with log(‖r0‖/(tol‖b‖)); a warm start shrinks ‖r0‖ by the small
    # change of the system between outer steps. Measured: 577 vs 779 iterations (0.74); the
    # bound leaves room for counts shifting by one per step on another machine.
    assert runs[True][0].sum() <= 0.85 * runs[False][0].sum(), (runs[True][0], runs[False][0])


def test_bad_warm_starts_are_refused():
    args = (jnp.asarray(LOG_LAM), jnp.zeros(D), (X, Y), (XV, YV))
    hg = bl.hypergrad(PROBLEM, bl.implicit(_frozen(1), bl.cg()))
    with pytest.raises(ValueError, match="adjoint0=v\\) requires v to have the tree"):
        hg(*args, adjoint0=jnp.zeros(D + 1))
    with pytest.raises(ValueError, match="adjoint0"):
        hg(*args, adjoint0={"w": jnp.zeros(D)})
    with pytest.raises(TypeError, match="has no linear solve"):
        bl.hypergrad(PROBLEM, _frozen(1))(*args, adjoint0=jnp.zeros(D))
    with pytest.raises(ValueError, match="warm_start_solve=True"):
        bl.hyperopt(PROBLEM, _frozen(1), optax.sgd(0.1), warm_start_solve=True)
    with pytest.raises(TypeError, match="warm_start_solve"):
        bl.hyperopt(PROBLEM, bl.implicit(_frozen(1), bl.cg()), optax.sgd(0.1), warm_start_solve=1)
