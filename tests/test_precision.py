"""The precision policy of `implicit` (`bl.precision`): low-precision steps and products, a
wider solve. Exact values come from `bilevel.testing.Ridge`'s closed form in float64; the
bounds are the compute dtype's unit roundoff times the problem's condition number (κ ≤ 10)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py: compile-bound


def _ridge(dtype=jnp.float64):
    exact = blt.Ridge.sample(3, dim=12, max_condition=10.0)
    cast = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    lr = 1.0 / float(jnp.linalg.eigvalsh(exact.hessian(exact.hparams)).max())
    args = (cast(exact.hparams), cast(exact.params0), cast(exact.inner_batch), cast(exact.outer_batch))
    return exact, lr, args


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def test_a_policy_in_the_parameters_dtype_changes_nothing():
    exact, lr, args = _ridge()
    forward = bl.unroll(optax.sgd(lr), steps=300)
    plain = bl.hypergrad(exact.problem, bl.implicit(forward, bl.cg(tol=1e-12)))(*args)
    policy = bl.precision(jnp.float64, jnp.float64)
    same = bl.hypergrad(exact.problem, bl.implicit(forward, bl.cg(tol=1e-12), precision=policy))(*args)
    np.testing.assert_allclose(same.grad, plain.grad, rtol=1e-12)
    np.testing.assert_allclose(same.params, plain.params, rtol=1e-12)


@pytest.mark.parametrize("compute,bound", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-2), (jnp.float16, 5e-3)])
def test_low_precision_compute_with_float32_or_wider_accumulation(compute, bound):
    # bound ≈ κ · unit roundoff of `compute`: 10 · 6e-8, 10 · 3.9e-3, 10 · 4.9e-4 (rounded up)
    exact, lr, args = _ridge(jnp.float32)
    forward = bl.unroll(optax.sgd(lr), steps=500)
    method = bl.implicit(forward, bl.cg(maxiter=100, tol=1e-7), precision=bl.precision(compute, jnp.float64))
    out = jax.jit(bl.hypergrad(exact.problem, method))(*args)
    assert out.grad.dtype == jnp.float32 and out.params.dtype == jnp.float32
    assert _rel(out.grad, exact.hypergrad(exact.hparams)) < bound
    # forward mode agrees with reverse mode under the policy, to the compute dtype's rounding
    # (the two transpose the cross derivative differently, each rounded in `compute`)
    respond = bl.response(exact.problem, method)
    _, tangent = jax.jvp(lambda h: respond(h, args[1], args[2]), (args[0],), (jnp.ones_like(args[0]),))
    _, vjp = jax.vjp(lambda h: respond(h, args[1], args[2]), args[0])
    v = jnp.ones_like(out.params)
    np.testing.assert_allclose(jnp.vdot(tangent, v), vjp(v)[0], rtol=bound)


def test_loss_scaling_keeps_small_float16_products_from_underflowing():
    exact, _, args = _ridge(jnp.float32)
    tiny = 1e-5        # the losses' curvature becomes ~1e-5: below float16's normal range (6.1e-5)
    problem = bl.Problem(inner=lambda w, h, b: tiny * exact.problem.inner(w, h, b),
                         outer=lambda w, h, b: tiny * exact.problem.outer(w, h, b))
    forward = bl.solver(lambda h, w0, b: exact.response(h).astype(w0.dtype))   # the exact w*
    target = tiny * exact.hypergrad(exact.hparams)

    def error(scale):
        policy = bl.precision(jnp.float16, loss_scale=scale)
        out = bl.hypergrad(problem, bl.implicit(forward, bl.exact(), precision=policy))(*args)
        return _rel(out.grad, target)

    scaled, unscaled = error(2.0**8), error(1.0)
    assert scaled < 5e-3 and (not np.isfinite(unscaled) or unscaled > 10 * scaled)


def test_precision_arguments_are_checked():
    with pytest.raises(TypeError, match="floating dtype"):
        bl.precision("int8")
    with pytest.raises(TypeError, match="floating dtype"):
        bl.precision("bfloat17")
    with pytest.raises(ValueError, match="at least as wide"):
        bl.precision(jnp.float32, jnp.bfloat16)
    for bad in (0.0, -1.0, float("inf"), True, 2.0**20):      # 2²⁰ overflows float16
        with pytest.raises(ValueError, match="loss_scale"):
            bl.precision(jnp.float16, loss_scale=bad)
    forward = bl.unroll(optax.sgd(0.1), steps=5)
    with pytest.raises(TypeError, match="precision=...\\) requires None or a policy"):
        bl.implicit(forward, bl.cg(), precision="bfloat16")
    with pytest.raises(ValueError, match="not supported"):
        bl.implicit(forward, bl.cg(), precision=bl.precision(),
                    hessian=bl.gauss_newton(lambda w, h, b: w))


def test_integer_data_stays_integer_under_a_scaled_policy():
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=40), jnp.int32)      # labels: must not become floats

    def xent(W, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(b[0] @ W, b[1]))

    problem = bl.Problem(inner=lambda W, h, b: xent(W, b) + 0.5 * jnp.exp(h) * jnp.sum(W**2),
                         outer=lambda W, h, b: xent(W, b))
    forward = bl.unroll(optax.sgd(0.5), steps=200)
    args = (jnp.asarray(-2.0, jnp.float32), jnp.zeros((5, 3), jnp.float32), (X, y), (X, y))
    ref = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-6)))(*args)
    out = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-6),
                                            precision=bl.precision(jnp.float16, loss_scale=2.0**8)))(*args)
    assert _rel(out.grad, ref.grad) < 2e-2       # float16 rounding of a 200-step run, κ of a few
