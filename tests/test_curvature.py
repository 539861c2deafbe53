"""Gauss-Newton curvature for `bl.implicit(..., hessian=bl.gauss_newton(model, loss))`.

Exact values: for a model linear in w (ridge, logistic regression) the Gauss-Newton matrix
is the Hessian, so the hypergradient must equal the closed form (ridge) or the exact-Hessian
IFT; for nonlinear least squares at zero residual likewise. Where it is an approximation,
the result is compared with the IFT formula with a dense Gauss-Newton matrix J_mᵀ∇²ℓJ_m + ∇²R
assembled independently in NumPy from `jax.jacfwd` Jacobians.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py: compile-bound


def _ridge_gn():
    return bl.gauss_newton(lambda w, h, b: b[0] @ w, lambda z, h, b: 0.5 * jnp.mean((z - b[1]) ** 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_gauss_newton_is_exact_for_ridge_regression(seed):
    exact = blt.Ridge.sample(seed, dim=5)
    forward = bl.solver(lambda h, w0, b: exact.response(h))
    for solver in (bl.exact(), bl.cg(maxiter=50, tol=1e-13)):
        out = bl.hypergrad(exact.problem, bl.implicit(forward, solver, hessian=_ridge_gn()))(
            exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
        np.testing.assert_allclose(out.grad, exact.hypergrad(exact.hparams), rtol=1e-9)
        assert bool(out.stats["gauss_newton"])


def test_gauss_newton_is_exact_at_zero_residual_and_not_otherwise():
    rng = np.random.default_rng(0)
    d = 4
    C = jnp.asarray(rng.normal(size=(d, d)) / d)
    w_star = jnp.asarray(rng.normal(size=d))
    m = lambda w: w + 0.5 * jnp.tanh(C @ w) + 0.2 * w**3  # noqa: E731  (nonlinear, invertible)
    lam_fit = m(w_star)                                    # residuals m(w*) − λ vanish at w*
    problem = bl.Problem(inner=lambda w, lam, b: 0.5 * jnp.sum((m(w) - lam) ** 2),
                         outer=lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2))
    gn = bl.gauss_newton(lambda w, lam, b: m(w) - lam)
    forward = bl.solver(lambda lam, w0, b: w0)             # w0 is the solution we pass in
    out = bl.hypergrad(problem, bl.implicit(forward, bl.exact(), hessian=gn))(lam_fit, w_star, None, None)
    # Independent: m(w*(λ)) = λ, so dw*/dλ = J_m⁻¹ and dL_V/dλ = J_m⁻ᵀ (w* − 1).
    J = np.asarray(jax.jacfwd(m)(w_star))
    np.testing.assert_allclose(out.grad, np.linalg.solve(J.T, np.asarray(w_star) - 1.0), rtol=1e-10)

    # With more residuals than weights the fit leaves nonzero residuals; then G ≠ H.
    B = jnp.asarray(rng.normal(size=(2 * d, d)))
    m2 = lambda w: B @ w + 0.3 * jnp.sin(B @ w)  # noqa: E731
    lam = jnp.asarray(rng.normal(size=2 * d))
    problem2 = bl.Problem(inner=lambda w, lam, b: 0.5 * jnp.sum((m2(w) - lam) ** 2),
                          outer=lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2))
    def newton(lam, w, b):             # 30 Newton steps: converged to machine precision
        loss = lambda v: problem2.inner(v, lam, b)  # noqa: E731
        step = lambda _, v: v - jnp.linalg.solve(jax.hessian(loss)(v), jax.grad(loss)(v))  # noqa: E731
        return jax.lax.fori_loop(0, 30, step, w)

    fit = bl.solver(newton)
    w0 = jnp.linalg.lstsq(B, lam)[0]
    exact = bl.hypergrad(problem2, bl.implicit(fit, bl.exact()))(lam, w0, None, None)
    approx = bl.hypergrad(problem2, bl.implicit(fit, bl.exact(),
                                                hessian=bl.gauss_newton(lambda w, l, b: m2(w) - l)))(lam, w0, None, None)
    assert float(exact.stats["inner_grad_norm"]) < 1e-10
    Jm = np.asarray(jax.jacfwd(m2)(exact.params))
    G = Jm.T @ Jm                                           # the dense Gauss-Newton matrix
    cross = -Jm.T                                           # ∂²L_T/∂w∂λ, (d, 2d)
    expected = -cross.T @ np.linalg.solve(G, np.asarray(exact.params) - 1.0)
    np.testing.assert_allclose(approx.grad, expected, rtol=1e-9)
    assert np.max(np.abs(np.asarray(approx.grad - exact.grad))) > 1e-4 * np.max(np.abs(exact.grad))


def _mlp():
    def net(w, x):
        return jnp.tanh(x @ w["W1"] + w["b1"]) @ w["W2"]

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (40, 3))
    y = jnp.sin(2 * x[:, 0]) + 0.1 * jax.random.normal(k2, (40,))
    w0 = {"W1": 0.8 * jax.random.normal(k3, (3, 6)), "b1": jnp.zeros(6), "W2": jnp.zeros(6)}
    problem = bl.Problem(
        inner=lambda w, h, b: 0.5 * jnp.mean((net(w, b[0]) - b[1]) ** 2) + 0.5 * jnp.exp(h) @ (w["W1"] ** 2).sum(0),
        outer=lambda w, h, b: 0.5 * jnp.mean((net(w, b[0]) - b[1]) ** 2),
    )
    gn = bl.gauss_newton(lambda w, h, b: net(w, b[0]), lambda z, h, b: 0.5 * jnp.mean((z - b[1]) ** 2))
    return problem, gn, net, w0, (x, y)


def test_gauss_newton_on_an_mlp_matches_a_dense_gauss_newton_solve():
    problem, gn, net, w0, data = _mlp()
    h = jnp.full(6, -4.0)
    forward = bl.unroll(optax.sgd(0.1, momentum=0.9), steps=30)     # far from converged
    out = bl.hypergrad(problem, bl.implicit(forward, bl.cg(maxiter=200, tol=1e-12), hessian=gn))(h, w0, data, data)
    flat, unravel = jax.flatten_util.ravel_pytree(out.params)
    x, y = data
    Jm = np.asarray(jax.jacfwd(lambda v: net(unravel(v), x))(flat))             # (n, P)
    hess_R = np.asarray(jax.hessian(lambda v: 0.5 * jnp.exp(h) @ (unravel(v)["W1"] ** 2).sum(0))(flat))
    G = Jm.T @ Jm / x.shape[0] + hess_R                                         # ∇²ℓ = I/n
    cross = np.asarray(jax.jacfwd(lambda hh: jax.grad(lambda v: problem.inner(unravel(v), hh, data))(flat))(h))
    g_out = np.asarray(jax.grad(lambda v: problem.outer(unravel(v), h, data))(flat))
    expected = -cross.T @ np.linalg.solve(G, g_out)
    np.testing.assert_allclose(out.grad, expected, rtol=1e-8, atol=1e-12)
    assert float(out.stats["solve_residual"]) < 1e-10
    assert not bool(out.stats["solve_negative_curvature"])
    # The exact Hessian is indefinite at this point; Gauss-Newton is not, so CG is valid.
    H = np.asarray(jax.hessian(lambda v: problem.inner(unravel(v), h, data))(flat))
    assert np.linalg.eigvalsh(H).min() < -1e-6 < np.linalg.eigvalsh(G).min() + 1e-6


def test_gauss_newton_logistic_regression_is_the_exact_hessian_and_per_step_data():
    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.normal(size=(5, 32, 3)))
    Y = jnp.asarray(rng.integers(0, 2, size=(5, 32)).astype(float))
    xent = lambda z, h, b: jnp.mean(jnp.logaddexp(0.0, z) - b[1] * z)  # noqa: E731
    problem = bl.Problem(inner=lambda w, h, b: xent(b[0] @ w, h, b) + 0.5 * jnp.exp(h) * w @ w,
                         outer=lambda w, h, b: xent(b[0] @ w, h, b))
    gn = bl.gauss_newton(lambda w, h, b: b[0] @ w, xent)
    batch = bl.per_step((X, Y))
    forward = bl.unroll(optax.sgd(0.5), steps=5)
    for curvature in ("mean",):        # per-step data: the Gauss-Newton map averaged over steps
        exact = bl.hypergrad(problem, bl.implicit(forward, bl.exact(), curvature=curvature))(
            jnp.asarray(-1.0), jnp.zeros(3), batch, (X[0], Y[0]))
        approx = bl.hypergrad(problem, bl.implicit(forward, bl.exact(), curvature=curvature, hessian=gn))(
            jnp.asarray(-1.0), jnp.zeros(3), batch, (X[0], Y[0]))
        np.testing.assert_allclose(approx.grad, exact.grad, rtol=1e-10)


def test_gauss_newton_hyper_hessian_on_ridge_equals_finite_differences_of_the_closed_form():
    exact = blt.Ridge.sample(5, dim=4)
    method = bl.implicit(bl.solver(lambda h, w0, b: exact.response(h)), bl.exact(), hessian=_ridge_gn())
    hg = lambda h: bl.hypergrad(exact.problem, method)(h, exact.params0, exact.inner_batch, exact.outer_batch).grad  # noqa: E731
    h, eps = exact.hparams, 1e-5
    fd = (exact.hypergrad(h + eps) - exact.hypergrad(h - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(hg)(h), fd, rtol=1e-6)
    np.testing.assert_allclose(jax.jvp(hg, (h,), (jnp.ones_like(h),))[1], fd, rtol=1e-6)


def test_gauss_newton_refusals():
    with pytest.raises(TypeError, match=r"gauss_newton\(model, loss=None\) requires `model`"):
        bl.gauss_newton(3.0)
    with pytest.raises(TypeError, match=r"requires `loss`"):
        bl.gauss_newton(lambda w, h, b: w, loss="mse")
    forward = bl.unroll(optax.sgd(0.1), steps=5)
    with pytest.raises(TypeError, match=r"hessian=\.\.\.\) requires None"):
        bl.implicit(forward, bl.cg(), hessian="gauss_newton")
    with pytest.raises(ValueError, match="Jacobian is not a Hessian"):
        bl.implicit(forward, bl.gmres(), bl.prox_fixed_point(bl.prox_l1(jnp.exp), 0.1),
                    hessian=bl.gauss_newton(lambda w, h, b: w))
