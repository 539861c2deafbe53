"""DrMAD (`bl.drmad`): reverse mode along the straight line from the start to the end of an unroll.

Exact values: where each step's derivatives do not depend on the point (gradient descent,
with or without momentum, on a quadratic whose ∂∇_w L_T/∂λ does not depend on w), DrMAD is
the exact unrolled hypergradient, so it must equal `bl.unroll`'s. Elsewhere it is compared
with `UnrolledQuadratic.drmad_hypergrad`, the same sum written out in closed form in the
eigenbasis, and shown to differ from the exact unrolled value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py: compile-bound


def _shift_problem(seed: int, dim: int = 4):
    """L_T = ½(w − Pλ)ᵀA(w − Pλ): ∇_w L_T is affine in w with a λ-derivative −AP free of w."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(dim, dim))
    A = M @ M.T / dim + 0.5 * np.eye(dim)
    P = rng.normal(size=(dim, 2))
    target = rng.normal(size=dim)
    problem = bl.Problem(
        inner=lambda w, h, b: 0.5 * (w - b[1] @ h) @ (b[0] @ (w - b[1] @ h)),
        outer=lambda w, h, b: 0.5 * jnp.sum((w - b) ** 2) + 0.1 * jnp.sum(h**2),
    )
    lr = 1.0 / np.linalg.eigvalsh(A).max()
    return problem, (jnp.asarray(A), jnp.asarray(P)), jnp.asarray(target), lr


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("momentum", [None, 0.6])
def test_drmad_is_exact_where_the_step_jacobians_are_constant(seed, momentum):
    problem, inner_b, outer_b, lr = _shift_problem(seed)
    method = bl.unroll(optax.sgd(0.5 * lr, momentum=momentum), steps=40)
    h, w0 = jnp.array([0.3, -1.2]), jnp.asarray(np.random.default_rng(seed + 7).normal(size=4))
    exact = bl.hypergrad(problem, method)(h, w0, inner_b, outer_b)
    approx = bl.hypergrad(problem, bl.drmad(method))(h, w0, inner_b, outer_b)
    np.testing.assert_allclose(approx.params, exact.params, rtol=1e-13)
    np.testing.assert_allclose(approx.grad, exact.grad, rtol=1e-10)
    assert bool(approx.stats["drmad"])


def test_drmad_with_per_step_batches_and_a_start_point_is_exact_on_the_shift_problem():
    problem, (A, P), outer_b, lr = _shift_problem(3)
    steps = 12
    scales = jnp.linspace(0.5, 1.5, steps)[:, None, None]
    batch = bl.per_step((A[None] * scales, jnp.broadcast_to(P, (steps,) + P.shape)))
    maml = bl.Problem(inner=problem.inner, outer=problem.outer, start=lambda h: jnp.tile(h, 2))
    method = bl.unroll(optax.sgd(0.3 * lr), steps=steps)
    h = jnp.array([0.4, 0.9])
    exact = bl.hypergrad(maml, method)(h, None, batch, outer_b)
    approx = bl.hypergrad(maml, bl.drmad(method))(h, None, batch, outer_b)
    np.testing.assert_allclose(approx.grad, exact.grad, rtol=1e-10)


@pytest.mark.parametrize("seed,steps", [(0, 30), (1, 80), (2, 200)])
def test_drmad_matches_its_closed_form_on_the_unrolled_quadratic(seed, steps):
    exact = blt.UnrolledQuadratic.sample(seed, dim=5, steps=steps)
    method = bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=exact.steps))
    out = bl.hypergrad(exact.problem, method)(exact.hparams, exact.params0, exact.inner_batch,
                                              exact.outer_batch)
    np.testing.assert_allclose(out.grad, exact.drmad_hypergrad(exact.hparams), rtol=1e-9)
    np.testing.assert_allclose(out.params, exact.unrolled_response(exact.hparams), rtol=1e-10)
    # ... and it is an approximation: the penalty's λ-derivative e^λ w_t follows the curved path
    assert abs(float(out.grad) - float(exact.unrolled_hypergrad(exact.hparams))) > 1e-6 * abs(
        float(exact.unrolled_hypergrad(exact.hparams)))


def _mlp_problem():
    def net(w, x):
        return jnp.tanh(x @ w["W1"]) @ w["W2"]

    problem = bl.Problem(
        inner=lambda w, h, b: jnp.mean((net(w, b[0]) - b[1]) ** 2) + jnp.exp(h) * sum(
            jnp.sum(x**2) for x in jax.tree_util.tree_leaves(w)),
        outer=lambda w, h, b: jnp.mean((net(w, b[0]) - b[1]) ** 2),
    )
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (32, 8))
    y = jnp.sin(x[:, :1])
    w0 = {"W1": 0.3 * jax.random.normal(k2, (8, 64)), "W2": 0.3 * jax.random.normal(k3, (64, 1))}
    return problem, w0, (x, y)


def test_drmad_memory_does_not_grow_with_steps(full_optimization):
    problem, w0, data = _mlp_problem()
    h = jnp.asarray(-3.0)

    def temp_bytes(method):
        compiled = jax.jit(bl.hypergrad(problem, method)).lower(h, w0, data, data).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    drmad = {T: temp_bytes(bl.drmad(bl.unroll(optax.sgd(0.05), steps=T))) for T in (50, 500)}
    unroll = {T: temp_bytes(bl.unroll(optax.sgd(0.05), steps=T)) for T in (50, 500)}
    assert unroll[500] > 5 * unroll[50]            # reverse mode stores the trajectory
    assert drmad[500] <= 1.1 * drmad[50]           # DrMAD stores the two ends only
    assert drmad[500] < unroll[500] / 5


def test_drmad_on_an_mlp_is_close_to_but_not_the_exact_hypergradient():
    problem, w0, data = _mlp_problem()
    h = jnp.asarray(-3.0)
    method = bl.unroll(optax.sgd(0.05), steps=100)
    exact = bl.hypergrad(problem, method)(h, w0, data, data)
    approx = bl.hypergrad(problem, bl.drmad(method))(h, w0, data, data)
    np.testing.assert_allclose(approx.params["W1"], exact.params["W1"], rtol=1e-12)
    rel = abs(float(approx.grad - exact.grad)) / abs(float(exact.grad))
    assert 1e-8 < rel < 1.0, rel     # an approximation, of the right sign and magnitude here


def test_drmad_composes_with_jit_vmap_and_does_not_retrace():
    exact = blt.UnrolledQuadratic.sample(4, dim=3, steps=20)
    traces = []

    def run(lam):
        traces.append(1)
        method = bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=exact.steps))
        return bl.hypergrad(exact.problem, method)(lam, exact.params0, exact.inner_batch, exact.outer_batch).grad

    jitted = jax.jit(run)
    lams = jnp.array([-0.5, 0.0, 0.7])
    for lam in lams:
        np.testing.assert_allclose(jitted(lam), exact.drmad_hypergrad(lam), rtol=1e-9)
    assert len(traces) == 1
    np.testing.assert_allclose(jax.vmap(run)(lams), [exact.drmad_hypergrad(x) for x in lams], rtol=1e-9)


def test_drmad_integer_step_counters_are_interpolated_exactly():
    # optax keeps integer step counts in its state; a schedule reads them. DrMAD rounds the
    # interpolated counter, so step t sees its own rate. The shift component h[1] enters the
    # gradient independently of w, so its DrMAD hypergradient is exact only if every step's
    # rate (through the counter) is right; the rate factor h[0] multiplies the gradient, which
    # depends on w, so its DrMAD value is an approximation and must differ.
    problem, inner_b, outer_b, lr = _shift_problem(5)
    rates = lambda h: lambda count: h[0] * 0.5 * lr / (1.0 + 0.1 * count)  # noqa: E731
    method = bl.unroll(lambda h: optax.sgd(rates(h)), steps=25)
    h, w0 = jnp.array([1.0, 0.5]), jnp.zeros(4)
    exact = bl.hypergrad(problem, method)(h, w0, inner_b, outer_b)
    approx = bl.hypergrad(problem, bl.drmad(method))(h, w0, inner_b, outer_b)
    np.testing.assert_allclose(approx.grad[1], exact.grad[1], rtol=1e-10)
    assert abs(float(approx.grad[0] - exact.grad[0])) > 1e-3 * abs(float(exact.grad[0]))


def test_drmad_nan_in_validation_data_gives_nan():
    exact = blt.UnrolledQuadratic.sample(0, dim=3, steps=10)
    C, e = exact.outer_batch
    method = bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=exact.steps))
    out = bl.hypergrad(exact.problem, method)(exact.hparams, exact.params0, exact.inner_batch,
                                              (C, e.at[0].set(jnp.nan)))
    assert bool(jnp.isnan(out.grad))


def test_drmad_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match=r"drmad\(method\) requires an unrolled method"):
        bl.drmad(bl.truncate(bl.unroll(optax.sgd(0.1), steps=5), last=2))
    with pytest.raises(TypeError, match=r"drmad\(method\) requires an unrolled method"):
        bl.drmad(bl.implicit(bl.unroll(optax.sgd(0.1), steps=5), bl.exact()))
    exact = blt.UnrolledQuadratic.sample(0, dim=3, steps=10)
    respond = bl.response(exact.problem, bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=10)))
    with pytest.raises(TypeError, match="forward-mode"):   # reverse mode only, as documented
        jax.jvp(lambda lam: respond(lam, exact.params0, exact.inner_batch), (exact.hparams,),
                (jnp.ones_like(exact.hparams),))
    with pytest.raises(ValueError, match="steps"):
        bl.hypergrad(exact.problem, bl.drmad(bl.unroll(optax.sgd(0.1), steps=10)))(
            exact.hparams, exact.params0, bl.per_step(jnp.zeros((4, 3))), exact.outer_batch)


def test_hypergrad_error_compares_drmad_with_its_closed_form():
    exact = blt.UnrolledQuadratic.sample(2, dim=4, steps=40)
    cmp = blt.hypergrad_error(bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=exact.steps)), exact)
    assert cmp.target == "drmad" and float(cmp.error) < 1e-9
    with pytest.raises(ValueError, match="target='drmad'"):
        blt.hypergrad_error(bl.drmad(bl.unroll(optax.sgd(0.1), steps=5)), blt.Ridge.sample(0, dim=3),
                            target="drmad")
