"""The Hessian-vector product of `implicit`: forward-over-reverse, reverse-over-reverse and
finite differences (`bl.finite_difference`).

Reverse-over-reverse computes the same numbers as the default by another route, so it must
agree to rounding. The finite difference is an approximation whose error must fall as ε²
(central) or ε (one-sided), measured against the exact product `jax.hessian(f) @ v` on a
function with nonzero third derivatives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
from bilevel._hvp import matvec

pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py: compile-bound


def _mlp():
    def net(w, x):
        return jnp.tanh(x @ w["W1"]) @ w["W2"]

    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k1, (30, 3))
    y = jnp.sin(2 * x[:, :1])
    w0 = {"W1": 0.7 * jax.random.normal(k2, (3, 8)), "W2": 0.3 * jax.random.normal(k3, (8, 1))}
    problem = bl.Problem(
        inner=lambda w, h, b: 0.5 * jnp.mean((net(w, b[0]) - b[1]) ** 2) + 0.5 * jnp.exp(h) * jnp.sum(w["W1"] ** 2),
        outer=lambda w, h, b: 0.5 * jnp.mean((net(w, b[0]) - b[1]) ** 2),
    )
    return problem, w0, (x, y)


@pytest.mark.parametrize("solver", [bl.exact(), bl.cg(maxiter=100, tol=1e-12)])
def test_reverse_over_reverse_equals_forward_over_reverse(solver):
    problem, w0, data = _mlp()
    forward = bl.unroll(optax.adam(0.05), steps=300)
    h = jnp.asarray(-3.0)
    fwd = bl.hypergrad(problem, bl.implicit(forward, solver))(h, w0, data, data)
    rev = bl.hypergrad(problem, bl.implicit(forward, solver, hvp="reverse_over_reverse"))(h, w0, data, data)
    np.testing.assert_allclose(rev.grad, fwd.grad, rtol=1e-10)
    # ... and the hyper-Hessian through it
    hg = lambda hvp: lambda lam: bl.hypergrad(problem, bl.implicit(forward, solver, hvp=hvp))(  # noqa: E731
        lam, w0, data, data).grad
    np.testing.assert_allclose(jax.grad(hg("reverse_over_reverse"))(h), jax.grad(hg("forward_over_reverse"))(h),
                               rtol=1e-8)


def _cubic():
    """f(w) = Σ cosh(Aw) + ⅓Σ (Bw)³: every third derivative is nonzero."""
    rng = np.random.default_rng(0)
    A, B = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(5, 4)))
    f = lambda w: jnp.sum(jnp.cosh(A @ w)) + jnp.sum((B @ w) ** 3) / 3  # noqa: E731
    w = jnp.asarray(rng.normal(size=4)) * 0.5
    v = jnp.asarray(rng.normal(size=4))
    return f, w, v


def test_finite_difference_error_falls_as_epsilon_squared_central_and_epsilon_one_sided():
    f, w, v = _cubic()
    exact = jax.hessian(f)(w) @ v

    def err(eps, central):
        approx = matvec(bl.finite_difference(eps, central=central), jax.grad(f), w)(v)
        return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))

    central = [err(e, True) for e in (1e-2, 2.5e-3)]
    one_sided = [err(e, False) for e in (1e-2, 2.5e-3)]
    assert 12 < central[0] / central[1] < 20      # O(ε²): a quarter of ε, a sixteenth of the error
    assert 3 < one_sided[0] / one_sided[1] < 5    # O(ε)
    assert central[1] < 1e-4 and one_sided[1] > 10 * central[1]
    assert float(jnp.abs(matvec(bl.finite_difference(1e-3), jax.grad(f), w)(jnp.zeros(4))).max()) == 0.0


def test_finite_difference_hypergradient_error_falls_as_epsilon_squared():
    problem, w0, data = _mlp()
    forward = bl.unroll(optax.adam(0.05), steps=300)
    h = jnp.asarray(-3.0)
    exact = bl.hypergrad(problem, bl.implicit(forward, bl.exact()))(h, w0, data, data)
    errors = []
    for eps in (1e-2, 1e-3):
        out = bl.hypergrad(problem, bl.implicit(forward, bl.exact(), hvp=bl.finite_difference(eps)))(
            h, w0, data, data)
        assert bool(out.stats["finite_difference_hvp"])
        errors.append(abs(float(out.grad - exact.grad)) / abs(float(exact.grad)))
    assert 30 < errors[0] / errors[1] < 300    # a tenth of ε, about a hundredth of the error


def test_finite_difference_with_per_term_curvature_and_neumann():
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.normal(size=(10, 8, 3)))
    Y = jnp.asarray(rng.normal(size=(10, 8)))
    problem = bl.Problem(
        inner=lambda w, h, b: jnp.mean(jnp.log(jnp.cosh(b[0] @ w - b[1]))) + 0.5 * jnp.exp(h) * w @ w,
        outer=lambda w, h, b: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    forward = bl.unroll(optax.sgd(0.3), steps=10)
    args = (jnp.asarray(-1.0), jnp.zeros(3), bl.per_step((X, Y)), None)
    solver = bl.neumann(terms=8, alpha=0.5)
    ref = bl.hypergrad(problem, bl.implicit(forward, solver, curvature="per_term"))(*args)
    errors = []
    for eps in (1e-2, 1e-3):     # each term's minibatch product by differences: the same O(ε²) law
        fd = bl.hypergrad(problem, bl.implicit(forward, solver, curvature="per_term",
                                               hvp=bl.finite_difference(eps)))(*args)
        errors.append(abs(float(fd.grad - ref.grad)))
    assert 30 < errors[0] / errors[1] < 300


def test_hvp_choices_are_checked():
    forward = bl.unroll(optax.sgd(0.1), steps=5)
    with pytest.raises(ValueError, match="hvp=...\\) requires 'forward_over_reverse'"):
        bl.implicit(forward, bl.cg(), hvp="fd")
    with pytest.raises(ValueError, match="only valid for a symmetric linear system"):
        bl.implicit(forward, bl.gmres(), bl.fixed_point(lambda w, h, b: 0.5 * w), hvp="reverse_over_reverse")
    with pytest.raises(ValueError, match="only valid for a symmetric linear system"):
        bl.implicit(forward, bl.gmres(), bl.fixed_point(lambda w, h, b: 0.5 * w), hvp=bl.finite_difference())
    for bad, err in ((0.0, ValueError), (float("inf"), ValueError), (-1e-3, ValueError), ("1e-3", TypeError),
                     (True, TypeError)):
        with pytest.raises(err, match="epsilon"):
            bl.finite_difference(bad)
    with pytest.raises(TypeError, match="central"):
        bl.finite_difference(1e-3, central=1)
