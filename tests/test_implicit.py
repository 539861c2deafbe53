"""implicit and the linear solvers: against dense solves, jaxopt and finite differences.

Most hypergradients, jvps and second derivatives are jitted: run eagerly, each of their loops
and operations compiled on its own, which was most of this file's time. (Not those whose static
settings change from call to call, e.g. the Neumann term counts: there eager calls reuse
already compiled operations and a jit would compile a whole program per call.)
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jaxopt import implicit_diff


def _data(seed=0, n=40, d=5, m=25):
    rng = np.random.default_rng(seed)
    tr = (jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=n)))
    va = (jnp.asarray(rng.normal(size=(m, d))), jnp.asarray(rng.normal(size=m)))
    return tr, va


def _inner(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def _outer(w, log_lam, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


PROBLEM = bl.Problem(_inner, _outer)


def _closed_form(log_lam, w0, batch):
    X, y = batch
    n, d = X.shape
    H = X.T @ X / n + jnp.diag(jnp.broadcast_to(jnp.exp(log_lam), (d,)))
    return jnp.linalg.solve(H, X.T @ y / n)


@jax.jit
def _exact_hypergrad(log_lam, tr, va):
    """IFT by hand with a dense Hessian (independent of bilevel)."""
    X, y = tr
    n, d = X.shape
    w = _closed_form(log_lam, None, tr)
    H = X.T @ X / n + jnp.diag(jnp.broadcast_to(jnp.exp(log_lam), (d,)))
    gv = jax.grad(_outer)(w, log_lam, va)
    v = jnp.linalg.solve(H, gv)
    cross = jnp.exp(log_lam) * w  # d(∇_w L_T)/d log_lam, per coordinate
    g = -cross * v
    return g if jnp.ndim(log_lam) else jnp.sum(g)


FORWARD = bl.unroll(optax.sgd(0.5), steps=3000)
SOLVERS = {
    "exact": bl.exact(),
    "cg": bl.cg(maxiter=100, tol=1e-13),
    "gmres": bl.gmres(maxiter=5, tol=1e-13, restart=10),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("log_lam", [jnp.asarray(-1.0), jnp.linspace(-2.0, 0.5, 5)])
def test_implicit_matches_dense_ift(name, log_lam):
    tr, va = _data()
    out = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(FORWARD, SOLVERS[name])))(log_lam, jnp.zeros(5), tr, va)
    np.testing.assert_allclose(out.grad, _exact_hypergrad(log_lam, tr, va), rtol=1e-9, atol=1e-14)
    assert out.stats["solve_residual"] < 1e-10


def test_implicit_matches_jaxopt_custom_root():
    tr, va = _data(1)
    log_lam = jnp.linspace(-1.5, 0.0, 5)

    @implicit_diff.custom_root(jax.grad(_inner), solve=lambda mv, b: jnp.linalg.solve(
        jax.jacfwd(mv)(b), b))
    def jaxopt_solver(init, log_lam, batch):
        return _closed_form(log_lam, init, batch)

    ref = jax.jit(jax.grad(lambda h: _outer(jaxopt_solver(jnp.zeros(5), h, tr), h, va)))(log_lam)
    for solver in (bl.exact(), bl.cg(maxiter=50, tol=1e-13)):
        out = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.solver(_closed_form), solver)))(log_lam, jnp.zeros(5), tr, va)
        np.testing.assert_allclose(out.grad, ref, rtol=1e-9)


def test_solver_alone_differentiates_through_fn():
    """Without implicit, a closed-form solver is differentiated by autodiff: exact too."""
    tr, va = _data(2)
    out = jax.jit(bl.hypergrad(PROBLEM, bl.solver(_closed_form)))(jnp.asarray(-0.3), jnp.zeros(5), tr, va)
    np.testing.assert_allclose(out.grad, _exact_hypergrad(jnp.asarray(-0.3), tr, va), rtol=1e-10)


def test_implicit_ignores_forward_path():
    """The IFT derivative does not depend on how w was reached, only on where."""
    tr, va = _data(3)
    lam = jnp.asarray(-0.5)
    a = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.unroll(optax.sgd(0.5), 3000), bl.exact())))(lam, jnp.zeros(5), tr, va)
    b = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.unroll(optax.adam(0.05), 3000), bl.exact())))(lam, jnp.ones(5), tr, va)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-8)


def test_cg_stats_iterations_and_residual():
    tr, va = _data(4)
    lam = jnp.asarray(-1.0)
    few = bl.hypergrad(PROBLEM, bl.implicit(FORWARD, bl.cg(maxiter=2, tol=1e-14)))(lam, jnp.zeros(5), tr, va)
    many = bl.hypergrad(PROBLEM, bl.implicit(FORWARD, bl.cg(maxiter=50, tol=1e-12)))(lam, jnp.zeros(5), tr, va)
    assert int(few.stats["solve_iterations"]) == 2
    assert few.stats["solve_iterations"].dtype == jnp.int32
    assert few.stats["solve_residual"] > 1e-6  # two iterations on a 5-dim system: not solved
    assert 2 < int(many.stats["solve_iterations"]) <= 6  # CG solves a 5-dim SPD system in <= 5 (+1 slack)
    assert many.stats["solve_residual"] < 1e-11
    # The reported residual is the true one of the solve that produced the gradient:
    X, y = tr
    H = X.T @ X / 40 + jnp.exp(lam) * jnp.eye(5)
    w = few.params
    gv = jax.grad(_outer)(w, lam, va)
    # Solve with exactly two CG iterations by hand and recompute the residual.
    x, r = jnp.zeros(5), gv
    p = r
    for _ in range(2):
        a = (r @ r) / (p @ H @ p)
        x, r_new = x + a * p, r - a * (H @ p)
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    np.testing.assert_allclose(few.stats["solve_residual"],
                               jnp.linalg.norm(H @ x - gv) / jnp.linalg.norm(gv), rtol=1e-6)
    np.testing.assert_allclose(few.grad, -jnp.exp(lam) * w @ x, rtol=1e-8)


def test_backward_tolerance_is_independent_of_forward():
    """A loose backward tol gives a loose hypergradient even with a perfect forward solve."""
    tr, va = _data(5, d=30, n=60)
    lam = jnp.asarray(-3.0)
    exact = _exact_hypergrad(lam, tr, va)
    loose = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.solver(_closed_form), bl.cg(maxiter=100, tol=1e-2))))(
        lam, jnp.zeros(30), tr, va)
    tight = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.solver(_closed_form), bl.cg(maxiter=100, tol=1e-12))))(
        lam, jnp.zeros(30), tr, va)
    assert tight.stats["solve_residual"] < 1e-11
    assert 1e3 * tight.stats["solve_residual"] < loose.stats["solve_residual"] <= 1e-2
    assert int(loose.stats["solve_iterations"]) < int(tight.stats["solve_iterations"])
    assert abs(loose.grad - exact) > abs(tight.grad - exact)
    np.testing.assert_allclose(tight.grad, exact, rtol=1e-8)


def _neumann_error(terms, alpha, tr, va, lam):
    out = bl.hypergrad(PROBLEM, bl.implicit(bl.solver(_closed_form), bl.neumann(terms, alpha)))(
        lam, jnp.zeros(5), tr, va)
    return out, float(jnp.abs(out.grad - _exact_hypergrad(lam, tr, va)))


def test_neumann_converges_and_matches_explicit_series():
    tr, va = _data(6)
    lam = jnp.asarray(-1.0)
    X, y = tr
    H = X.T @ X / 40 + jnp.exp(lam) * jnp.eye(5)
    alpha = 1.0 / float(jnp.linalg.eigvalsh(H).max())
    out, err = _neumann_error(7, alpha, tr, va, lam)
    w = out.params
    gv = jax.grad(_outer)(w, lam, va)
    M = jnp.eye(5) - alpha * H
    series = alpha * sum(jnp.linalg.matrix_power(M, j) for j in range(8)) @ gv
    np.testing.assert_allclose(out.grad, -jnp.exp(lam) * w @ series, rtol=1e-10)
    last = alpha * jnp.linalg.matrix_power(M, 7) @ gv
    np.testing.assert_allclose(out.stats["neumann_last_term"], jnp.linalg.norm(last), rtol=1e-9)
    assert not bool(out.stats["neumann_diverged"])
    _, err_long = _neumann_error(400, alpha, tr, va, lam)
    assert err_long < 1e-9 < err


def test_neumann_divergence_is_flagged():
    tr, va = _data(7)
    lam = jnp.asarray(-1.0)
    X, _ = tr
    H = X.T @ X / 40 + jnp.exp(lam) * jnp.eye(5)
    alpha = 2.5 / float(jnp.linalg.eigvalsh(H).max())  # rho(I - alpha H) = 1.5 > 1
    for terms in (5, 30, 3000):
        out, _ = _neumann_error(terms, alpha, tr, va, lam)
        assert bool(out.stats["neumann_diverged"]), terms
        assert out.stats["neumann_diverged"].dtype == jnp.bool_


def test_identity_is_one_step_formula():
    tr, va = _data(8)
    lam = jnp.linspace(-1.0, 0.0, 5)
    out = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(FORWARD, bl.identity())))(lam, jnp.zeros(5), tr, va)
    w = out.params
    gv = jax.grad(_outer)(w, lam, va)
    direct = jax.grad(_outer, argnums=1)(w, lam, va)
    cross = jax.jacfwd(jax.grad(_inner), argnums=1)(w, lam, tr)  # (d_w, d_lam)
    np.testing.assert_allclose(out.grad, direct - cross.T @ gv, rtol=1e-12)
    # identity() is neumann(0, 1): same number.
    nm = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(FORWARD, bl.neumann(0, 1.0))))(lam, jnp.zeros(5), tr, va)
    np.testing.assert_allclose(nm.grad, out.grad, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_jvp_equals_grad(name):
    tr, va = _data(9)
    lam = jnp.linspace(-1.0, 0.0, 5)
    v = jnp.asarray([0.3, -1.0, 0.5, 2.0, 0.1])
    method = bl.implicit(FORWARD, SOLVERS[name])
    respond = bl.response(PROBLEM, method)
    _, jv = jax.jit(lambda lam: jax.jvp(lambda h: _outer(respond(h, jnp.zeros(5), tr), h, va), (lam,), (v,)))(lam)
    out = jax.jit(bl.hypergrad(PROBLEM, method))(lam, jnp.zeros(5), tr, va)
    np.testing.assert_allclose(jv, out.grad @ v, rtol=1e-9)


def test_derivative_with_respect_to_data():
    """The IFT rule also differentiates the response w.r.t. the inner batch."""
    tr, va = _data(10)
    respond = bl.response(PROBLEM, bl.implicit(bl.solver(_closed_form), bl.exact()))
    f = lambda y: jnp.sum(respond(jnp.asarray(-0.5), jnp.zeros(5), (tr[0], y)) ** 2)  # noqa: E731
    g = jax.grad(f)(tr[1])
    ref = jax.grad(lambda y: jnp.sum(_closed_form(jnp.asarray(-0.5), None, (tr[0], y)) ** 2))(tr[1])
    np.testing.assert_allclose(g, ref, rtol=1e-10)


def test_second_order_through_implicit():
    """Hyper-hypergradient through implicit(exact) equals finite differences of the hypergradient."""
    tr, va = _data(11)
    hg = jax.jit(bl.hypergrad(PROBLEM, bl.implicit(bl.solver(_closed_form), bl.exact())))
    second = jax.jit(jax.grad(lambda h: hg(h, jnp.zeros(5), tr, va).grad))(jnp.asarray(-0.7))
    eps = 1e-5
    fd = (_exact_hypergrad(jnp.asarray(-0.7 + eps), tr, va) - _exact_hypergrad(jnp.asarray(-0.7 - eps), tr, va)) / (2 * eps)
    np.testing.assert_allclose(second, fd, rtol=1e-6)


# ---- bad input -------------------------------------------------------------------------


def test_bad_linear_solver_settings():
    with pytest.raises(ValueError, match=r"tol.*>= 0.*got tol=-0.001"):
        bl.cg(maxiter=10, tol=-1e-3)
    with pytest.raises(ValueError, match="maxiter"):
        bl.cg(maxiter=0)
    with pytest.raises(ValueError, match=r"alpha.*> 0.*got alpha=0"):
        bl.neumann(terms=5, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        bl.neumann(terms=5, alpha=-0.1)
    with pytest.raises(ValueError, match="terms"):
        bl.neumann(terms=-1, alpha=0.1)
    with pytest.raises(ValueError, match="tol"):
        bl.gmres(tol=-1.0)


def test_implicit_of_implicit_or_truncate_rejected():
    inner = bl.implicit(FORWARD, bl.cg())
    with pytest.raises(TypeError, match=r"bilevel.unroll, bilevel.solver or bilevel.best_response.*instead"):
        bl.implicit(inner, bl.cg())
    with pytest.raises(TypeError, match="Truncate"):
        bl.implicit(bl.truncate(FORWARD, last=5), bl.cg())


def test_implicit_requires_linear_solver():
    with pytest.raises(TypeError, match=r"linear solver such as bilevel.cg"):
        bl.implicit(FORWARD, "cg")


def test_implicit_rejects_per_step_data_it_cannot_use():
    tr, va = _data()
    xs = bl.per_step((jnp.zeros((3, 40, 5)), jnp.zeros((3, 40))))
    solve = bl.solver(lambda h, w0, b: w0)
    with pytest.raises(ValueError, match="per_step"):      # a user solver takes one batch
        bl.hypergrad(PROBLEM, bl.implicit(solve, bl.cg()))(jnp.asarray(0.0), jnp.zeros(5), xs, va)
    with pytest.raises(ValueError, match="curvature='given'"):   # no curvature batch given
        bl.hypergrad(PROBLEM, bl.implicit(bl.unroll(optax.sgd(0.1), steps=3), bl.cg(), curvature="given"))(
            jnp.asarray(0.0), jnp.zeros(5), xs, va)
    with pytest.raises(ValueError, match="per_term"):
        bl.implicit(FORWARD, bl.gmres(), curvature="per_term")
    with pytest.raises(ValueError, match="'mean'"):
        bl.implicit(FORWARD, bl.cg(), curvature="full")


def test_solver_output_tree_checked():
    tr, va = _data()
    bad = bl.solver(lambda h, w0, b: {"w": w0})
    with pytest.raises(ValueError, match="same tree and shapes as params0"):
        bl.hypergrad(PROBLEM, bl.implicit(bad, bl.cg()))(jnp.asarray(0.0), jnp.zeros(5), tr, va)
    with pytest.raises(TypeError, match="callable"):
        bl.solver(3)


def test_solver_rejects_per_step_data():
    tr, va = _data()
    xs = bl.per_step((jnp.zeros((3, 40, 5)), jnp.zeros((3, 40))))
    with pytest.raises(ValueError, match="only unroll steps through"):
        bl.response(PROBLEM, bl.solver(_closed_form))(jnp.asarray(0.0), jnp.zeros(5), xs)


def _bias_inner(p, log_lam, batch):
    X, y, _ = batch
    return 0.5 * jnp.mean((X @ p["W"] + p["b"] - y) ** 2) + 0.5 * jnp.exp(log_lam) * p["W"] @ p["W"]


def _bias_outer(p, log_lam, batch):
    X, y, _ = batch
    return 0.5 * jnp.mean((X @ p["W"] + p["b"] - y + 0.3) ** 2)


@jax.jit
def _bias_dense_parts(params, h, batch):
    """The inner Hessian, ∂(∇_w L_T)/∂λ and ∇_w L_V at `params`, flattened, by autodiff."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    H = jax.hessian(lambda v: _bias_inner(unravel(v), h, batch))(flat)
    cross = jax.jacfwd(lambda lam: jax.grad(lambda v: _bias_inner(unravel(v), lam, batch))(flat))(h)
    gv = jax.grad(lambda v: _bias_outer(unravel(v), h, batch))(flat)
    return H, cross, gv


@pytest.mark.parametrize("solver", [bl.exact(), bl.cg(maxiter=50, tol=1e-12), bl.neumann(terms=5, alpha=0.1),
                                    bl.identity()])
def test_params_that_the_hparams_do_not_touch(solver):
    """An unpenalised bias: λ's cross-derivative is zero on that leaf (regression: reverse mode
    used to fail to transpose the solve). The hypergradient equals the dense IFT formula."""
    key1, key2 = jax.random.split(jax.random.key(7))
    X, y = jax.random.normal(key1, (40, 3)), jax.random.normal(key2, (40,))
    labels = (jnp.arange(40) % 2).astype(jnp.int32)      # an integer batch leaf, unused by the loss
    problem = bl.Problem(inner=_bias_inner, outer=_bias_outer)
    batch, h = (X, y, labels), jnp.asarray(-0.5)
    method = bl.implicit(bl.unroll(optax.sgd(0.3), steps=3000), solver)
    out = jax.jit(bl.hypergrad(problem, method))(h, {"W": jnp.zeros(3), "b": jnp.zeros(())}, batch, batch)
    H, cross, gv = _bias_dense_parts(out.params, h, batch)
    size = H.shape[0]
    if isinstance(solver, bl.Identity):
        H = jnp.eye(size)
    if isinstance(solver, bl.Neumann):                 # H⁻¹ ≈ α Σ_{j=0}^{terms} (I − αH)^j, inverted
        step = jnp.eye(size) - solver.alpha * H
        series = solver.alpha * sum(jnp.linalg.matrix_power(step, j) for j in range(solver.terms + 1))
        H = jnp.linalg.inv(series)
    expected = -gv @ jnp.linalg.solve(H, cross)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-8)
    _, tangent = jax.jit(lambda h: jax.jvp(
        lambda lam: _bias_outer(bl.response(problem, method)(lam, out.params, batch), lam, batch),
        (h,), (jnp.ones(()),)))(h)
    np.testing.assert_allclose(tangent, out.grad, rtol=1e-6)
