"""No silent wrong hypergradient: bad input raises, non-finite input shows, approximations say so.

Each test here reproduces a way a plausible-looking wrong number came back (integer params0,
NaN validation data, tiny right-hand sides, indefinite Hessians, derivatives of the clipped
forward mode) and checks the fix against a closed form or a dense computation.

The shared problem: L_T = ½‖w − 1‖² + ½λ‖w‖², L_V = s·½‖w − c‖² over d = 3 coordinates,
so w*(λ) = 1/(1 + λ) and dL_V/dλ = −s·Σ(w* − c)/(1 + λ)² in closed form.

Second derivatives and the float32 solves are jitted (run eagerly, every operation and loop
of them compiled on its own, they were most of this file's time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel._unroll as unroll_module

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

D = 3


def _problem(scale=1.0, target=0.5):
    return bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w * w),
        outer=lambda w, lam, b: scale * 0.5 * jnp.sum((w - (target if b is None else b)) ** 2),
    )


def _closed_form_grad(lam, scale=1.0, target=0.5):
    w = 1.0 / (1.0 + lam)
    return -scale * D * (w - target) / (1.0 + lam) ** 2


UNROLL = bl.unroll(optax.sgd(0.5), steps=60)   # contraction factor 0.5/step at λ ≈ 0.3: converged
SOLVERS = {
    "exact": bl.exact(),
    "cg": bl.cg(maxiter=20, tol=1e-12),
    "gmres": bl.gmres(maxiter=5, tol=1e-12),
    "neumann": bl.neumann(40, 0.5),
    "identity": bl.identity(),
}


# --- integer, Python-scalar and complex params0 -------------------------------------------

METHODS = {
    "unroll": UNROLL,
    "truncate": bl.truncate(UNROLL, last=5),
    "implicit_cg": bl.implicit(UNROLL, bl.cg()),
    "implicit_exact": bl.implicit(UNROLL, bl.exact()),
    "forward_mode": bl.forward_mode(UNROLL),
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("params0", [jnp.array([0, 0, 0]), 0.0, {"w": jnp.zeros(3), "n": jnp.array(2)}],
                         ids=["int-array", "python-float", "int-leaf-in-dict"])
def test_non_float_params0_raises_naming_params0(name, params0):
    # Before: int params came back unchanged with grad 0 and inner_grad_norm 0 (truth ≠ 0).
    problem = bl.Problem(
        inner=lambda w, lam, _: sum(0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * lam * jnp.sum(x * x)
                                    for x in jax.tree_util.tree_leaves(w)),
        outer=lambda w, lam, _: sum(0.5 * jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(w)),
    )
    with pytest.raises(TypeError, match=r"params0"):
        bl.hypergrad(problem, METHODS[name])(jnp.asarray(0.3), params0, None, None)
    with pytest.raises(TypeError, match=r"params0"):
        bl.response(problem, METHODS[name])(jnp.asarray(0.3), params0, None)


def test_non_float_params_raise_in_the_drivers():
    problem = _problem()
    with pytest.raises(TypeError, match=r"params0.*floating point"):
        bl.online(problem, optax.sgd(0.1), optax.sgd(0.1)).init(jnp.asarray(0.3), jnp.array([0, 0, 0]))
    driver = bl.hyperopt(problem, UNROLL, optax.sgd(0.1))
    state = driver.init(jnp.asarray(0.3), jnp.array([0, 0, 0]))
    with pytest.raises(TypeError, match=r"params0"):
        driver.step(state, None, None)


def test_non_array_leaves_still_pass_through():
    """Functions, strings and bools in params0 are settings, not errors."""
    problem = bl.Problem(
        inner=lambda p, lam, _: 0.5 * jnp.sum((p["act"](p["w"]) - 1.0) ** 2) + 0.5 * lam * p["w"] @ p["w"],
        outer=lambda p, lam, _: 0.5 * jnp.sum((p["w"] - 0.5) ** 2),
    )
    params0 = {"w": jnp.zeros(3), "act": lambda x: x, "name": "ridge", "flag": True}
    out = bl.hypergrad(problem, bl.implicit(UNROLL, bl.exact()))(jnp.asarray(0.3), params0, None, None)
    np.testing.assert_allclose(out.grad, _closed_form_grad(0.3), rtol=1e-9)
    assert out.params["name"] == "ridge" and out.params["flag"] is True


@pytest.mark.parametrize("method", [bl.implicit(UNROLL, bl.cg()), bl.implicit(UNROLL, bl.exact()),
                                    bl.forward_mode(UNROLL)], ids=["cg", "exact", "forward_mode"])
def test_complex_params_are_rejected_where_the_rule_is_real(method):
    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum(jnp.abs(w - 1) ** 2) + 0.5 * lam * jnp.sum(jnp.abs(w) ** 2),
        outer=lambda w, lam, _: 0.5 * jnp.sum(jnp.abs(w - 0.5) ** 2),
    )
    with pytest.raises(TypeError, match=r"complex"):
        bl.hypergrad(problem, method)(jnp.asarray(0.3), jnp.zeros(3, jnp.complex128), None, None)


# --- non-finite and tiny right-hand sides ---------------------------------------------------

@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_non_finite_validation_data_gives_nan_not_zero(name, bad):
    # Before: CG and GMRES returned a hypergradient of exactly 0 (the loop never started).
    target = jnp.array([0.5, bad, 0.5])
    out = bl.hypergrad(_problem(), bl.implicit(UNROLL, SOLVERS[name]))(jnp.asarray(0.3), jnp.zeros(D), None, target)
    assert np.isnan(out.grad), out.grad


@pytest.mark.parametrize("method", [UNROLL, bl.truncate(UNROLL, last=5), bl.forward_mode(UNROLL, clip=1.0)],
                         ids=["unroll", "truncate", "forward_mode"])
def test_non_finite_validation_data_gives_nan_through_autodiff_methods(method):
    target = jnp.array([0.5, jnp.nan, 0.5])
    out = bl.hypergrad(_problem(), method)(jnp.asarray(0.3), jnp.zeros(D), None, target)
    assert np.isnan(out.grad), out.grad


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_tree_norm_of_a_non_finite_tree_is_not_zero(bad):
    # A `sq > 0` guard for the zero-derivative-at-zero rule once turned a NaN norm into 0, which
    # made bilevel.optimize read a NaN hypergradient's grad_norm as finite.
    from bilevel._base import tree_norm
    norm = tree_norm({"a": jnp.array([1.0, bad]), "b": jnp.ones(2)})
    assert not np.isfinite(norm) and (np.isnan(norm) if np.isnan(bad) else norm == np.inf)
    assert float(jax.grad(tree_norm)(jnp.zeros(3)).sum()) == 0.0      # the guard it exists for
    assert float(tree_norm(jnp.array([3.0, 4.0]))) == 5.0


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_return_nan_for_a_non_finite_right_hand_side(name):
    matvec = lambda v: jax.tree_util.tree_map(lambda x: 2.0 * x, v)  # noqa: E731
    x, stats = SOLVERS[name].solve(matvec, {"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)})
    assert np.all(np.isnan(x["a"])) and np.all(np.isnan(x["b"]))
    assert np.isnan(stats["solve_residual"])


@functools.cache
def _scaled_hypergrad(name):
    """jit(hypergrad) of `_problem(scale)` with the scale passed as the outer batch: one
    compile per solver for the three scales."""
    problem = bl.Problem(inner=_problem().inner,
                         outer=lambda w, lam, scale: scale * 0.5 * jnp.sum((w - 0.5) ** 2))
    return jax.jit(bl.hypergrad(problem, bl.implicit(bl.unroll(optax.sgd(0.5), steps=60), SOLVERS[name])))


@pytest.mark.parametrize("scale", [1e-7, 1e-20, 1e20])
@pytest.mark.parametrize("name", ["exact", "cg", "gmres", "neumann"])   # neumann: ρ = 0.35, 40 terms
def test_tiny_and_huge_right_hand_sides_are_solved_in_float32(name, scale):
    # Before: float32 GMRES returned 0 at scale 1e-7 and CG did 0 iterations at 1e-20.
    lam = jnp.asarray(0.3, jnp.float32)
    out = _scaled_hypergrad(name)(lam, jnp.zeros(D, jnp.float32), None, jnp.asarray(scale, jnp.float32))
    assert out.grad.dtype == jnp.float32
    np.testing.assert_allclose(out.grad, _closed_form_grad(0.3, scale), rtol=1e-4)
    assert out.stats["solve_residual"] < 1e-5            # honest: measured on the normalised system
    if name == "cg":
        assert out.stats["solve_iterations"] >= 1


def test_cg_absolute_tolerance_is_in_the_units_of_the_system():
    """atol is absolute in the user's units: normalisation must not change what it means."""
    h = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
    b = 1e-3 * jnp.array([1.0, 1.0, 1.0])
    x, stats = bl.cg(maxiter=50, tol=0.0, atol=1e-2).solve(lambda v: h @ v, b)
    assert int(stats["solve_iterations"]) == 0          # ‖b‖ ≈ 1.7e-3 is already below atol = 1e-2
    x, stats = bl.cg(maxiter=50, tol=0.0, atol=1e-12).solve(lambda v: h @ v, b)
    np.testing.assert_allclose(h @ x, b, rtol=1e-9)


# --- residuals for every solver; negative curvature -----------------------------------------

def _indefinite_problem():
    """L_T = ½ wᵀAw − 1ᵀw + ½λ‖w‖² with A indefinite (eigenvalues 2, 1, −0.5) at λ = 0.

    The stationary point w* = (A + λI)⁻¹ 1 is a saddle; the forward solve returns it in
    closed form so the IFT system is exactly H = A + λI.
    """
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (D, D), jnp.float64))
    a = q @ jnp.diag(jnp.array([2.0, 1.0, -0.5])) @ q.T
    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * w @ a @ w - jnp.sum(w) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.3) ** 2),
    )
    forward = bl.solver(lambda lam, w0, _: jnp.linalg.solve(a + lam * jnp.eye(D), jnp.ones(D)))
    return problem, forward, a


def _dense_hypergrad(a, lam):
    w = jnp.linalg.solve(a + lam * jnp.eye(D), jnp.ones(D))
    return -(w - 0.3) @ jnp.linalg.solve(a + lam * jnp.eye(D), w)   # dw/dλ = −H⁻¹w


def test_neumann_and_identity_report_the_residual_that_exposes_an_indefinite_hessian():
    # Before: Neumann on an indefinite Hessian returned a wrong number with
    # neumann_diverged False and no residual at all.
    problem, forward, a = _indefinite_problem()
    lam = jnp.asarray(0.0)
    truth = _dense_hypergrad(a, lam)
    exact = bl.hypergrad(problem, bl.implicit(forward, bl.exact()))(lam, jnp.zeros(D), None, None)
    np.testing.assert_allclose(exact.grad, truth, rtol=1e-10)
    for linear_solver in (bl.neumann(3, 0.3), bl.identity()):
        out = bl.hypergrad(problem, bl.implicit(forward, linear_solver))(lam, jnp.zeros(D), None, None)
        # The residual the solver reports is the one of its answer, recomputed densely here.
        g_w = jax.grad(problem.outer)(out.params, lam, None)
        h = a + lam * jnp.eye(D)
        x = linear_solver.solve(lambda v: h @ v, g_w)[0]
        np.testing.assert_allclose(out.stats["solve_residual"],
                                   jnp.linalg.norm(h @ x - g_w) / jnp.linalg.norm(g_w), rtol=1e-9)
        assert out.stats["solve_residual"] > 0.1
        assert abs(out.grad - truth) > 0.1 * abs(truth)   # it is wrong, and the residual says so


def test_cg_flags_negative_curvature():
    problem, forward, a = _indefinite_problem()
    lam = jnp.asarray(0.0)
    out = bl.hypergrad(problem, bl.implicit(forward, bl.cg(maxiter=10)))(lam, jnp.zeros(D), None, None)
    assert out.stats["solve_negative_curvature"].dtype == jnp.bool_
    assert bool(out.stats["solve_negative_curvature"])
    shifted = bl.hypergrad(problem, bl.implicit(forward, bl.cg(maxiter=10)))(jnp.asarray(1.0), jnp.zeros(D), None, None)
    assert not bool(shifted.stats["solve_negative_curvature"])   # A + I has eigenvalues 3, 2, 0.5
    np.testing.assert_allclose(shifted.grad, _dense_hypergrad(a, 1.0), rtol=1e-9)


# --- approximate derivatives say so; forward mode's derivatives are consistent -----------------

def _hessian_of_value(method, lam):
    hg = bl.hypergrad(_problem(), method)
    return jax.jit(jax.grad(jax.grad(lambda h: hg(h, jnp.zeros(D), None, None).value)))(lam)


def _exact_hessian(lam):
    return jax.grad(lambda h: _closed_form_grad(h))(lam)


def test_forward_mode_with_inactive_clip_has_exact_finite_second_derivatives():
    # Before: NaN (the norm of the zero initial Jacobian was differentiated at 0).
    lam = jnp.asarray(0.3)
    method = bl.forward_mode(bl.unroll(optax.sgd(0.5), steps=60), clip=100.0)
    out = bl.hypergrad(_problem(), method)(lam, jnp.zeros(D), None, None)
    assert float(out.stats["clip_fraction"]) == 0.0
    np.testing.assert_allclose(_hessian_of_value(method, lam), _exact_hessian(lam), rtol=1e-7)


def test_forward_mode_derivative_of_the_value_is_the_reported_grad_when_clipping():
    # Before: jax.grad of the value returned the unclipped gradient, not .grad.
    lam = jnp.asarray(0.3)
    method = bl.forward_mode(bl.unroll(optax.sgd(0.5), steps=60), clip=0.1)
    hg = bl.hypergrad(_problem(), method)
    out = hg(lam, jnp.zeros(D), None, None)
    assert float(out.stats["clip_fraction"]) > 0.5
    assert abs(out.grad - _closed_form_grad(0.3)) > 0.5 * abs(_closed_form_grad(0.3))  # clipped: biased
    np.testing.assert_allclose(jax.jit(jax.grad(lambda h: hg(h, jnp.zeros(D), None, None).value))(lam), out.grad,
                               rtol=1e-12)
    assert np.isfinite(_hessian_of_value(method, lam))


def test_forward_mode_hyper_hessian_is_exact_on_a_nonlinear_response():
    """Every order of forward mode (no clip) equals unroll when the response is nonlinear in λ."""
    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.sum(lam * w * w) + 0.1 * jnp.sum(w**4),
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    lam = jnp.array([0.3, 0.5, 0.7])
    unroll = bl.unroll(optax.sgd(0.1, momentum=0.5), steps=30)
    hessians = []
    for method in (unroll, bl.forward_mode(unroll)):
        hg = bl.hypergrad(problem, method)
        hessians.append(jax.jit(jax.hessian(lambda h: hg(h, jnp.zeros(D), None, None).value))(lam))
    np.testing.assert_allclose(hessians[1], hessians[0], rtol=1e-9, atol=1e-12)


def test_truncate_reports_how_many_steps_it_did_not_differentiate():
    out = bl.hypergrad(_problem(), bl.truncate(UNROLL, last=5))(jnp.asarray(0.3), jnp.zeros(D), None, None)
    assert int(out.stats["truncated_steps"]) == UNROLL.steps - 5
    full = bl.hypergrad(_problem(), bl.truncate(UNROLL, last=UNROLL.steps))(jnp.asarray(0.3), jnp.zeros(D), None, None)
    assert int(full.stats["truncated_steps"]) == 0
    np.testing.assert_allclose(full.grad, _closed_form_grad(0.3), rtol=1e-9)


# --- settings and inputs that used to leak JAX internals ----------------------------------------

@pytest.mark.parametrize("build", [lambda: bl.cg(tol=float("inf")), lambda: bl.gmres(tol=float("inf")),
                                   lambda: bl.neumann(3, float("inf")), lambda: bl.neumann(3, float("nan")),
                                   lambda: bl.cg(atol=float("nan"))],
                         ids=["cg-tol-inf", "gmres-tol-inf", "neumann-alpha-inf", "neumann-alpha-nan", "cg-atol-nan"])
def test_non_finite_solver_settings_are_refused_when_built(build):
    with pytest.raises(ValueError, match=r"finite"):
        build()


def test_numpy_scalar_settings_keep_float32_data_in_float32():
    # Before: neumann(5, np.float64(.1)) with float32 data under x64 raised an internal
    # "linearized function called on tangent values inconsistent..." error.
    lam, w0 = jnp.asarray(0.3, jnp.float32), jnp.zeros(D, jnp.float32)
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=60), bl.neumann(np.int64(20), np.float64(0.5)))
    out = bl.hypergrad(_problem(), method)(lam, w0, None, None)
    assert out.grad.dtype == jnp.float32
    np.testing.assert_allclose(out.grad, _closed_form_grad(0.3), rtol=1e-4)
    assert isinstance(method.linear_solver.alpha, float) and isinstance(method.linear_solver.terms, int)


@pytest.mark.parametrize("method", [bl.implicit(UNROLL, bl.cg()), bl.forward_mode(UNROLL), UNROLL],
                         ids=["implicit", "forward_mode", "unroll"])
def test_vmap_over_a_numpy_array_inside_jit(method):
    # Before: "AssertionError: non-canonical constant" from the custom derivative rules.
    hg = bl.hypergrad(_problem(), method)
    lams = np.linspace(0.1, 1.0, 4)
    grads = jax.jit(lambda: jax.vmap(hg, in_axes=(0, None, None, None))(lams, jnp.zeros(D), None, None).grad)()
    np.testing.assert_allclose(grads, _closed_form_grad(lams), rtol=1e-7)


# --- an unroll that cannot fit --------------------------------------------------------------

def test_an_unroll_too_large_for_memory_says_so_at_trace_time(monkeypatch):
    monkeypatch.setattr(unroll_module, "available_bytes", lambda: 2**30)   # 1 GiB free
    problem = _problem()
    params0 = jnp.zeros(10_000, jnp.float32)                               # 39 KiB per copy
    big = bl.hypergrad(problem, bl.unroll(optax.adam(0.1), steps=100_000))  # ≥ 100k × 3 copies
    with pytest.raises(MemoryError, match=r"(?s)11\.2 GiB.*checkpoint=316.*forward_mode"):
        jax.eval_shape(big, jnp.asarray(0.3, jnp.float32), params0, None, None)
    for fits in (bl.unroll(optax.adam(0.1), steps=100_000, checkpoint=316),
                 bl.forward_mode(bl.unroll(optax.adam(0.1), steps=100_000)),
                 bl.truncate(bl.unroll(optax.adam(0.1), steps=100_000), last=100)):
        jax.eval_shape(bl.hypergrad(problem, fits), jnp.asarray(0.3, jnp.float32), params0, None, None)


def test_free_memory_is_known_on_this_machine():
    free = unroll_module.available_bytes()
    assert free is None or free > 0
