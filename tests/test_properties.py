"""Property tests (hypothesis, float64) of every method against bilevel.testing's exact values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst

REGRESSION = st.one_of(bst.ridge_problems(), bst.ridge_per_coordinate_problems())
ANY_IFT = st.one_of(REGRESSION, bst.quadratic004_problems(max_dim=8))


def _call(exact, method, hparams=None):
    hparams = exact.hparams if hparams is None else hparams
    return bl.hypergrad(exact.problem, method)(hparams, exact.params0, exact.inner_batch, exact.outer_batch)


def _lipschitz(exact):
    return float(jnp.linalg.eigvalsh(exact.hessian(exact.hparams)).max())


def _forward(exact, steps=800):
    """Gradient descent at step 1/L: converged to ~1e-30 for condition numbers <= 10."""
    return bl.unroll(optax.sgd(1.0 / _lipschitz(exact)), steps=steps)


def _rel(a, b, floor=1e-6):
    """Relative error, with `floor` as the smallest scale (exact zeros occur, e.g. T=1, w0=0)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), floor)


@given(bst.unrolled_quadratic_problems(max_steps=40))
def test_unroll_equals_exact_unrolled_hypergradient(exact):
    method = bl.unroll(optax.sgd(float(exact.lr)), steps=exact.steps)
    out = _call(exact, method)
    assert _rel(out.grad, exact.unrolled_hypergrad(exact.hparams)) < 1e-9
    assert _rel(out.params, exact.unrolled_response(exact.hparams)) < 1e-10
    assert _rel(out.value, exact.unrolled_value(exact.hparams)) < 1e-10


@given(bst.unrolled_quadratic_problems(max_steps=40), st.integers(1, 40))
def test_checkpoint_and_full_truncate_equal_unroll(exact, k):
    lr = float(exact.lr)
    plain = _call(exact, bl.unroll(optax.sgd(lr), exact.steps))
    ckpt = _call(exact, bl.unroll(optax.sgd(lr), exact.steps, checkpoint=min(k, exact.steps)))
    trunc = _call(exact, bl.truncate(bl.unroll(optax.sgd(lr), exact.steps), last=exact.steps))
    np.testing.assert_allclose(ckpt.grad, plain.grad, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(trunc.grad, plain.grad, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ckpt.value, plain.value, rtol=1e-13)


@given(ANY_IFT, st.sampled_from(["exact", "cg"]))
def test_implicit_equals_exact_ift(exact, name):
    solver = bl.exact() if name == "exact" else bl.cg(maxiter=100, tol=1e-13)
    out = _call(exact, bl.implicit(_forward(exact), solver))
    assert _rel(out.grad, exact.hypergrad(exact.hparams)) < 1e-8
    assert out.stats["solve_residual"] < 1e-10


@given(ANY_IFT)
def test_identity_equals_one_step_formula(exact):
    out = _call(exact, bl.implicit(_forward(exact), bl.identity()))
    assert _rel(out.grad, exact.identity_hypergrad(exact.hparams)) < 1e-9


@given(bst.quadratic004_problems(max_dim=8), st.integers(0, 30), st.floats(0.2, 1.0))
def test_neumann_error_is_the_exact_remainder(exact, k, frac):
    """On the diagonal quadratic the Neumann error is Σ_i c_i v_i (1 − α a_i)^(k+1) / a_i."""
    lam = exact.hparams
    a = (1 + lam) * exact.h  # the diagonal inner Hessian
    alpha = frac / float(a.max())
    out = _call(exact, bl.implicit(bl.solver(lambda h, w0, b: exact.response(h)), bl.neumann(k, alpha)))
    theta = exact.response(lam)
    cross = exact.h * theta  # ∂(∇_θ L_T)/∂λ
    gv = exact.h * (theta - exact.theta_tilde)
    remainder = jnp.sum(cross * gv * (1 - alpha * a) ** (k + 1) / a)
    scale = float(jnp.sum(jnp.abs(cross * gv / a)))
    np.testing.assert_allclose(out.grad - exact.hypergrad(lam), remainder, rtol=1e-8, atol=1e-12 * scale)
    rho = float(jnp.max(jnp.abs(1 - alpha * a)))
    assert abs(float(out.grad - exact.hypergrad(lam))) <= rho ** (k + 1) * scale * (1 + 1e-9)
    assert not bool(out.stats["neumann_diverged"])


@given(REGRESSION, st.integers(0, 40))
def test_neumann_error_within_rho_bound(exact, k):
    """|error| ≤ ‖∂²L_T/∂λ∂w‖ ‖H⁻¹‖ ρ^(k+1) ‖∂L_V/∂w‖ with ρ = ‖I − αH‖, α = 1/L."""
    H = exact.hessian(exact.hparams)
    eig = jnp.linalg.eigvalsh(H)
    alpha = 1.0 / float(eig.max())
    rho = float(1 - alpha * eig.min())
    solve = bl.solver(lambda h, w0, b: exact.response(h))
    out = _call(exact, bl.implicit(solve, bl.neumann(k, alpha)))
    ref = _call(exact, bl.implicit(solve, bl.exact()))
    w = ref.params
    gv = jax.grad(exact.problem.outer)(w, exact.hparams, exact.outer_batch)
    cross = jax.jacfwd(jax.grad(exact.problem.inner), argnums=1)(w, exact.hparams, exact.inner_batch)
    bound = np.linalg.norm(cross) / float(eig.min()) * rho ** (k + 1) * np.linalg.norm(gv)
    err = np.linalg.norm(np.asarray(out.grad) - np.asarray(exact.hypergrad(exact.hparams)))
    assert err <= bound * (1 + 1e-8) + 1e-13


METHOD_FACTORIES = {
    "unroll": lambda f: f,
    "checkpoint": lambda f: bl.unroll(f.optimizer, f.steps, checkpoint=25),
    "truncate": lambda f: bl.truncate(f, last=30),
    "forward": lambda f: bl.forward_mode(f),
    "forward_clip": lambda f: bl.forward_mode(f, clip=0.5),
    "exact": lambda f: bl.implicit(f, bl.exact()),
    "cg": lambda f: bl.implicit(f, bl.cg(maxiter=50, tol=1e-12)),
    "gmres": lambda f: bl.implicit(f, bl.gmres(maxiter=5, tol=1e-12)),
    "neumann": lambda f: bl.implicit(f, bl.neumann(10, 0.05)),
    "identity": lambda f: bl.implicit(f, bl.identity()),
}


@given(bst.ridge_per_coordinate_problems(), st.sampled_from(sorted(METHOD_FACTORIES)), st.integers(0, 2**31 - 1))
def test_grad_dot_v_equals_jvp(exact, name, seed):
    method = METHOD_FACTORIES[name](_forward(exact, steps=300))
    v = jnp.asarray(np.random.default_rng(seed).normal(size=exact.hparams.shape))
    respond = bl.response(exact.problem, method)

    def f(h):
        return exact.problem.outer(respond(h, exact.params0, exact.inner_batch), h, exact.outer_batch)

    _, jv = jax.jvp(f, (exact.hparams,), (v,))
    out = _call(exact, method)
    np.testing.assert_allclose(jv, jnp.vdot(out.grad, v), rtol=1e-9, atol=1e-14 * float(jnp.linalg.norm(out.grad)))


@given(bst.ridge_problems(), st.sampled_from(sorted(METHOD_FACTORIES)))
def test_vmap_equals_stacked_calls(exact, name):
    method = METHOD_FACTORIES[name](_forward(exact, steps=300))
    hg = jax.jit(bl.hypergrad(exact.problem, method))   # one compile for the four single calls
    hs = exact.hparams + jnp.linspace(-0.5, 0.5, 4)
    batched = jax.vmap(hg, in_axes=(0, None, None, None))(hs, exact.params0, exact.inner_batch, exact.outer_batch)
    for i, h in enumerate(hs):
        single = hg(h, exact.params0, exact.inner_batch, exact.outer_batch)
        np.testing.assert_allclose(batched.grad[i], single.grad, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(batched.value[i], single.value, rtol=1e-12)


@given(ANY_IFT)
def test_assert_hypergrad_close_helper(exact):
    """The public checker accepts a correct method and rejects a wrong one."""
    good = bl.implicit(_forward(exact), bl.exact())
    blt.assert_hypergrad_close(good, exact, rtol=1e-8)
    one_step = bl.implicit(_forward(exact), bl.identity())
    if _rel(exact.identity_hypergrad(exact.hparams), exact.hypergrad(exact.hparams)) > 1e-3:
        with pytest.raises(AssertionError, match="relative error"):
            blt.assert_hypergrad_close(one_step, exact, rtol=1e-6, target="ift")


@pytest.mark.slow
@settings(max_examples=50)
@given(bst.unrolled_quadratic_problems(min_steps=1, max_steps=200, lr_range=(0.5, 1.5)))
def test_long_unroll_approaches_ift(exact):
    """Slow: the unrolled hypergradient at large T converges to the IFT one."""
    long = bl.unroll(optax.sgd(float(exact.lr)), steps=3000)
    out = _call(exact, long)
    assert _rel(out.grad, exact.hypergrad(exact.hparams)) < 1e-7
