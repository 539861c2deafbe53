"""The microbenchmark suite (`bilevel._bench`): every baseline computes the same numbers as
the library, and the structural facts behind the timings hold (memory growth, compile-time
independence of the step count, one compile per population). No wall-clock time is asserted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt
from bilevel import _bench


@pytest.fixture(scope="module")
def ridge64():
    return _bench.ridge_case(jnp.float64, n=60, d=12, steps=30)


@pytest.fixture(scope="module")
def ridge_ratios(ridge64):
    return _bench.ratios(ridge64, cg_iters=8, repeats=1)


def test_hand_written_unroll_equals_the_closed_form_of_gradient_descent(ridge64):
    """The baseline itself is right: T SGD steps on ridge have a closed-form hypergradient."""
    exact = blt.Ridge.sample(0, dim=12, n_train=60, max_condition=10.0, dtype=jnp.float64)
    lr, t = ridge64.lr, ridge64.steps
    value, grad = jax.jit(_bench.hand_unroll(ridge64))(ridge64.hparams, ridge64.params0)
    h = exact.hessian(exact.hparams)
    a = jnp.eye(12) - lr * h
    b = exact.X.T @ exact.y / exact.X.shape[0]
    w = jnp.linalg.solve(h, (jnp.eye(12) - jnp.linalg.matrix_power(a, t)) @ b)  # w_T from w_0 = 0
    np.testing.assert_allclose(value, exact.problem.outer(w, exact.hparams, exact.outer_batch), rtol=1e-12)
    dw = jax.jacfwd(lambda lam: jnp.linalg.solve(
        exact.hessian(lam), (jnp.eye(12) - jnp.linalg.matrix_power(jnp.eye(12) - lr * exact.hessian(lam), t)) @ b))
    g_w = jax.grad(exact.problem.outer)(w, exact.hparams, exact.outer_batch)
    np.testing.assert_allclose(grad, g_w @ dw(exact.hparams), rtol=1e-9)


def test_every_compared_pair_computes_the_same_hypergradient(ridge_ratios):
    diffs = ridge_ratios["max_relative_difference"]
    assert diffs["unroll vs hand-written (grad)"] <= 1e-12
    assert diffs["implicit(cg) vs jaxopt (grad)"] <= 1e-9


def test_forward_plus_k_hvps_applies_the_hessian_k_times(ridge64):
    k = 3
    out = jax.jit(_bench.hand_forward_hvps(ridge64, k))(ridge64.hparams, ridge64.params0)
    w = _bench.hand_forward(ridge64, ridge64.hparams, ridge64.params0)
    exact = blt.Ridge.sample(0, dim=12, n_train=60, max_condition=10.0, dtype=jnp.float64)
    np.testing.assert_allclose(out, jnp.linalg.matrix_power(exact.hessian(exact.hparams), k) @ w, rtol=1e-10)


def test_ratio_rows_and_targets_are_complete(ridge_ratios):
    rows = ridge_ratios["rows"]
    for label, num, den, _ in _bench.TARGETS:
        t = next(t for t in ridge_ratios["targets"] if t["label"] == label)
        assert t["numerator"] == num.format(k=8) and t["denominator"] == den.format(k=8)
        assert t["ratio"] == pytest.approx(rows[t["numerator"]]["median_s"] / rows[t["denominator"]]["median_s"])
    assert all(r["compile_s"] > 0 and r["q25_s"] <= r["median_s"] <= r["q75_s"] for r in rows.values())


def test_digits_case_is_per_weight_logistic_regression():
    case = _bench.digits_case(jnp.float32, steps=2)
    assert case.hparams.shape == case.params0["W"].shape == (64, 10)
    value, grad = jax.jit(_bench.hand_unroll(case))(case.hparams, case.params0)
    out = jax.jit(bl.hypergrad(case.problem, bl.unroll(case.optimizer, 2)))(
        case.hparams, case.params0, case.inner_batch, case.outer_batch)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(out.grad, grad, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out.value, value, rtol=1e-6)


def test_memory_checkpointed_grows_like_sqrt_steps_and_forward_mode_is_flat():
    rows = _bench.memory(d=1_000, steps=(100, 10_000))
    first, last = rows
    growth = {k: last[k] / first[k] for k in ("unroll", "unroll(checkpoint=√T)", "forward_mode")}
    assert growth["unroll"] > 50          # ~100× the steps: the whole trajectory is stored
    assert growth["unroll(checkpoint=√T)"] < 20   # √100 = 10 (2× margin)
    assert growth["forward_mode"] == 1.0


def test_compiled_program_does_not_grow_with_the_steps():
    """Compile time is independent of T because the HLO is: the scan length is a constant."""
    problem = _bench.quadratic(50)
    sizes = []
    for t in (10, 100_000):
        for method in (bl.unroll(optax.sgd(0.05), t), bl.forward_mode(bl.unroll(optax.sgd(0.05), t)),
                       bl.implicit(bl.unroll(optax.sgd(0.05), t), bl.cg(20, 0.0))):
            hlo = jax.jit(bl.hypergrad(problem, method)).lower(jnp.zeros(()), jnp.zeros(50), None, None).as_text()
            sizes.append(len(hlo.splitlines()))
    assert sizes[:3] == sizes[3:]


def test_vmapped_population_equals_the_loop_and_compiles_once():
    case = _bench.small_ridge_case(jnp.float32, steps=5)
    row = _bench.vmap_throughput(case, population=6, repeats=1)
    assert row["max_relative_difference"] <= 1e-5 and row["loop_calls"] == 6 and row["speedup"] > 0
    fn = jax.jit(_bench._population_fn(case))
    for h in _bench._population(case, 3):
        fn(h, case.params0, case.inner_batch, case.outer_batch)
    assert fn._cache_size() == 1


def test_sharded_population_matches_one_device_in_a_subprocess():
    out = _bench.sharding_subprocess("ridge-small", population=4, devices=2, steps=5, repeats=1)
    assert [r["devices"] for r in out["rows"]] == [1, 2]
    assert all(r["max_relative_difference"] <= 1e-5 and r["seconds"] > 0 for r in out["rows"])


def test_markdown_has_every_section_and_target():
    result = _bench.run_suite(sections=("ratios", "memory"), problems=("ridge",), dtypes=("float32",),
                              repeats=1, quick=True)
    text = _bench.markdown(result)
    for label, *_ in _bench.TARGETS:
        assert label in text
    assert "## Peak temporary memory" in text and result["ratios"][0]["dtype"] == "float32"


def test_same_mathematics_compiles_to_the_same_matrix_products(ridge_ratios):
    """Structural parity behind the timings: (value, grad) of unroll has exactly the dot ops of
    the hand-written scan, implicit(cg) those of jaxopt's custom_root; the diagnostics in the
    full result (inner gradient norm, CG residual) cost one gradient and one HVP more."""
    dots = {name: row["dots"] for name, row in ridge_ratios["rows"].items()}
    assert dots["unroll"] == dots["hand-written unroll (jax.grad through lax.scan)"]
    assert dots["implicit(cg(8))"] == dots["jaxopt custom_root (cg 8)"]
    assert dots["implicit(cg(8)), full result"] == dots["implicit(cg(8))"] + 4
    assert dots["best_response(linear)"] == dots["hand-written best response"]


# ---------------------------------------------------------------- lasso

LASSO_ROWS = (
    "hand-written: FISTA scan + masked CG(20) on X_SᵀX_S/n",
    "implicit(proximal_gradient, cg(20))",
    "implicit(proximal_gradient, gmres(restart=20, maxiter=1))",
    "implicit(proximal_gradient, normal_cg(20))",
    "unroll: grad through the FISTA steps",
    "jaxopt custom_fixed_point, default solve (normal CG, tol 1e-5)",
    "jaxopt custom_fixed_point, solve_normal_cg(20)",
)


@pytest.fixture(scope="module")
def lasso64():
    """A tiny float64 Lasso whose support (7 of 12) is a proper subset; 300 FISTA steps converge."""
    return _bench.lasso_case(jnp.float64, n=60, d=12, steps=300, lam_fraction=0.3)


@pytest.fixture(scope="module")
def lasso_run(lasso64):
    return _bench.lasso(lasso64, cg_iters=20, repeats=1)


def test_lasso_closed_form_is_the_derivative_of_the_validation_loss(lasso64, lasso_run):
    """The reference itself is right: central differences of the validation loss at FISTA's
    solution for λ ± h (the support does not change in between)."""
    solve = jax.jit(lambda h: _bench.hand_fista(lasso64, h, lasso64.params0))
    loss = lambda h: float(_bench._half_mse(solve(h), h, lasso64.val))  # noqa: E731
    h = 1e-5
    fd = (loss(lasso64.log_lam + h) - loss(lasso64.log_lam - h)) / (2 * h)
    assert 0 < lasso_run["support_size"] < 12
    assert lasso_run["closed_form_grad"] == pytest.approx(fd, rel=1e-6)


def test_every_lasso_method_agrees_with_the_closed_form(lasso_run):
    """Every row computes dL_V/dλ of the same Lasso: the implicit rows and the hand-written CG
    to rounding (20 iterations ≥ the 7 support coordinates, so CG is exact); unrolling up to
    FISTA's remaining error; jaxopt's default solve up to its tolerance of 1e-5."""
    rows = lasso_run["rows"]
    assert tuple(rows) == LASSO_ROWS
    loose = {"unroll: grad through the FISTA steps": 1e-5,
             "jaxopt custom_fixed_point, default solve (normal CG, tol 1e-5)": 1e-5}
    for name, row in rows.items():
        assert row["closed_form_rel_diff"] <= loose.get(name, 1e-12), name
        assert row["grad"] == pytest.approx(lasso_run["closed_form_grad"], rel=loose.get(name, 1e-12))
    values = [row["value"] for row in rows.values()]
    assert max(values) - min(values) <= 1e-12 * abs(values[0])


def test_lasso_rows_are_timed_and_compared_to_the_hand_written_baseline(lasso_run):
    rows, base = lasso_run["rows"], lasso_run["rows"][lasso_run["baseline"]]
    assert lasso_run["baseline"] == LASSO_ROWS[0] and base["ratio"] == 1.0
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["median_s"] / base["median_s"])
        assert row["compile_s"] > 0 and row["dots"] > 0 and row["q25_s"] <= row["median_s"] <= row["q75_s"]
    assert (lasso_run["dtype"], lasso_run["n"], lasso_run["d"], lasso_run["steps"]) == ("float64", 60, 12, 300)


def test_lasso_support_is_the_one_bilevel_restricts_to(lasso64, lasso_run):
    fista = bl.proximal_gradient(bl.prox_l1(jnp.exp), lasso64.stepsize, lasso64.steps)
    out = jax.jit(bl.hypergrad(_bench.lasso_problem(), bl.implicit(fista, bl.cg(20, 0.0))))(
        lasso64.log_lam, lasso64.params0, lasso64.train, lasso64.val)
    assert int(out.stats["support_size"]) == lasso_run["support_size"]
    assert int(jnp.sum(out.params != 0)) == lasso_run["support_size"]


def test_suite_runs_the_lasso_section_per_dtype_and_reports_it(monkeypatch, lasso_run):
    """`bilevel bench --sections lasso` parses, and run_suite builds one case per dtype (float32 at
    the larger size) and writes its table; the measurement is stubbed with the tiny run."""
    from bilevel.__main__ import _BENCH_SECTIONS, _parser

    assert _parser().parse_args(["bench", "--sections", "lasso"]).sections == ["lasso"]
    assert _BENCH_SECTIONS == _bench.SECTIONS
    seen = []
    monkeypatch.setattr(_bench, "lasso", lambda case, **kw: seen.append((case, kw)) or lasso_run)
    result = _bench.run_suite(sections=("lasso",), dtypes=("float32", "float64"), repeats=5, cg_iters=20)
    assert [(c.params0.dtype, c.train[0].shape, c.steps) for c, _ in seen] == [
        (jnp.float32, (2000, 500), 200), (jnp.float64, (500, 125), 200)]
    assert all(kw == {"cg_iters": 20, "repeats": 5} for _, kw in seen)
    text = _bench.markdown(result)
    assert "## Lasso hypergradients" in text and all(f"| {name} |" in text for name in LASSO_ROWS)
    assert "Support: 7 of 12 coordinates" in text
