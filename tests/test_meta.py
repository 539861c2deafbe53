"""Meta-learning: MAML (Problem(start=...) with unroll), first-order MAML (first_order),
Meta-SGD (per_parameter_sgd rates as hyperparameters), iMAML (anchored + implicit) and task
batches (over_tasks), against the closed forms of bilevel.testing.QuadraticTasks (NumPy,
float64, no autodiff) and finite differences of its closed-form meta-objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst

pytestmark = pytest.mark.usefixtures("quick_compilation")

KAPPA = 5.0
LR = 1.0 / KAPPA            # stable for every task: rates below 2/κ
TASKS = bst.quadratic_meta_tasks(max_tasks=4, max_dim=4, max_condition=KAPPA)


def _compiled(problem, method):
    return jax.jit(bl.over_tasks(bl.hypergrad(problem, method)))


MAML = {T: _compiled(blt.QuadraticTasks.sample(0).problem, bl.unroll(optax.sgd(LR), T)) for T in (1, 3)}
FOMAML = _compiled(blt.QuadraticTasks.sample(0).problem, bl.first_order(bl.unroll(optax.sgd(LR), 3)))


@settings(max_examples=8)
@given(TASKS)
def test_maml_one_and_several_steps_equal_the_product_formula(tasks):
    for T, fn in MAML.items():
        out = fn(tasks.hparams, None, tasks.inner_data, tasks.outer_data)
        np.testing.assert_allclose(out.grad, tasks.maml_grad(tasks.hparams, LR, T), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.params, tasks.adapted(tasks.hparams, LR, T), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.value, tasks.meta_value(tasks.hparams, LR, T), rtol=1e-9)


@settings(max_examples=8)
@given(TASKS)
def test_first_order_maml_is_the_query_gradient_at_the_adapted_parameters(tasks):
    out = FOMAML(tasks.hparams, None, tasks.inner_data, tasks.outer_data)
    np.testing.assert_allclose(out.grad, tasks.fomaml_grad(tasks.hparams, LR, 3), rtol=1e-9, atol=1e-12)
    assert bool(np.all(out.stats["first_order"]))
    # and it is not MAML's: the two differ unless every M_i = I (never, with steps > 0)
    assert not np.allclose(out.grad, tasks.maml_grad(tasks.hparams, LR, 3), rtol=1e-6, atol=1e-9)


MU = 2.0
IMAML_METHOD = bl.implicit(bl.unroll(optax.sgd(1.0 / (KAPPA + MU)), 400), bl.exact())
IMAML_CG = bl.implicit(bl.unroll(optax.sgd(1.0 / (KAPPA + MU)), 400), bl.cg(maxiter=50, tol=1e-12))
_IMAML_PROBLEM = blt.QuadraticTasks.sample(0).imaml_problem(MU)
IMAML = {name: _compiled(_IMAML_PROBLEM, m) for name, m in (("exact", IMAML_METHOD), ("cg", IMAML_CG))}


@settings(max_examples=8)
@given(TASKS)
def test_imaml_equals_mu_times_the_regularised_inverse_hessian_times_the_query_gradient(tasks):
    # 400 steps at rate 1/(κ+μ) contract the error by (1 − (1+μ)/(κ+μ))^400 < 1e-60
    expected = tasks.imaml_grad(tasks.hparams, MU)
    for name, fn in IMAML.items():
        out = fn(tasks.hparams, jnp.zeros_like(tasks.hparams), tasks.inner_data, tasks.outer_data)
        np.testing.assert_allclose(out.params, tasks.imaml_adapted(tasks.hparams, MU), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.grad, expected, rtol=1e-8, atol=1e-12, err_msg=name)


def test_imaml_does_not_depend_on_where_the_inner_solve_starts():
    tasks = blt.QuadraticTasks.sample(1, num_tasks=3, dim=3, max_condition=KAPPA)
    a = IMAML["cg"](tasks.hparams, jnp.zeros(3), tasks.inner_data, tasks.outer_data)
    b = IMAML["cg"](tasks.hparams, 5.0 * jnp.ones(3), tasks.inner_data, tasks.outer_data)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-9)


def _meta_sgd_problem():
    base = blt.QuadraticTasks.sample(0).problem          # task losses that ignore the hyperparameters
    return bl.Problem(base.inner, base.outer, start=lambda h: h["init"])


def test_meta_sgd_learns_the_initialisation_and_one_rate_per_parameter():
    tasks = blt.QuadraticTasks.sample(2, num_tasks=3, dim=3, max_condition=KAPPA)
    rates = jnp.array([0.05, 0.1, 0.15])
    T = 4
    method = bl.unroll(lambda h: bl.per_parameter_sgd(h["lr"]), T)
    fn = jax.jit(bl.over_tasks(bl.hypergrad(_meta_sgd_problem(), method)))
    out = fn({"init": tasks.hparams, "lr": rates}, None, tasks.inner_data, tasks.outer_data)
    np.testing.assert_allclose(out.grad["init"], tasks.maml_grad(tasks.hparams, np.asarray(rates), T), rtol=1e-9)
    # the rates' meta-gradient against central differences of the closed-form meta-objective
    eps, r = 1e-6, np.asarray(rates)
    fd = [(tasks.meta_value(tasks.hparams, r + eps * e, T) - tasks.meta_value(tasks.hparams, r - eps * e, T))
          / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(out.grad["lr"], fd, rtol=1e-6, atol=1e-10)


def test_a_meta_batch_is_one_vmap_equal_to_the_loop_over_tasks():
    tasks = blt.QuadraticTasks.sample(3, num_tasks=5, dim=3, max_condition=KAPPA)
    single = jax.jit(bl.hypergrad(tasks.problem, bl.unroll(optax.sgd(LR), 3)))
    loop = [single(tasks.hparams, None, jax.tree.map(lambda x: x[i], tasks.inner_data),
                   jax.tree.map(lambda x: x[i], tasks.outer_data)) for i in range(5)]
    batch = MAML[3](tasks.hparams, None, tasks.inner_data, tasks.outer_data)
    np.testing.assert_allclose(batch.grad, np.mean([o.grad for o in loop], 0), rtol=1e-12)
    np.testing.assert_allclose(batch.value, np.mean([o.value for o in loop]), rtol=1e-12)
    np.testing.assert_allclose(batch.params, np.stack([o.params for o in loop]), rtol=1e-12)
    np.testing.assert_allclose(batch.stats["inner_grad_norm"], [o.stats["inner_grad_norm"] for o in loop], rtol=1e-12)


def test_new_meta_parameter_values_do_not_recompile():
    tasks = blt.QuadraticTasks.sample(4, num_tasks=2, dim=2, max_condition=KAPPA)
    fn = jax.jit(bl.over_tasks(bl.hypergrad(tasks.problem, bl.unroll(optax.sgd(LR), 2))))
    fn(tasks.hparams, None, tasks.inner_data, tasks.outer_data)
    fn(tasks.hparams + 1.0, None, tasks.inner_data, tasks.outer_data)
    assert fn._cache_size() == 1


def test_meta_gradient_of_a_maml_start_is_exact_under_jvp_too():
    tasks = blt.QuadraticTasks.sample(5, num_tasks=1, dim=3, max_condition=KAPPA)
    respond = bl.response(tasks.problem, bl.unroll(optax.sgd(LR), 3))
    inner = jax.tree.map(lambda x: x[0], tasks.inner_data)
    v = jnp.array([1.0, -2.0, 0.5])
    _, tangent = jax.jvp(lambda h: respond(h, None, inner), (tasks.hparams,), (v,))
    A = np.asarray(inner[0])
    M = np.linalg.matrix_power(np.eye(3) - LR * A, 3)
    np.testing.assert_allclose(tangent, M @ np.asarray(v), rtol=1e-10)


# --- what is refused, and why -------------------------------------------------------------

TASK = lambda w, h, b: 0.5 * jnp.sum((w - b) ** 2)      # noqa: E731
START = bl.Problem(TASK, TASK, start=lambda h: h)


@pytest.mark.parametrize("method, needle", [
    (bl.implicit(bl.unroll(optax.sgd(0.1), 5), bl.cg()), "anchored"),
    (bl.implicit(bl.unroll(optax.sgd(0.1), 5), bl.cg()), "fixed point"),
    (bl.truncate(bl.unroll(optax.sgd(0.1), 5), last=2), "last 2 of 5"),
    (bl.forward_mode(bl.unroll(optax.sgd(0.1), 5)), "start point"),
])
def test_methods_that_would_drop_the_start_point_refuse_it(method, needle):
    with pytest.raises(TypeError, match=needle):
        bl.hypergrad(START, method)
    with pytest.raises(TypeError, match=needle):
        bl.response(START, method)


def test_a_start_problem_refuses_params0():
    hg = bl.hypergrad(START, bl.unroll(optax.sgd(0.1), 5))
    with pytest.raises(TypeError, match="params0 must be None"):
        hg(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), jnp.ones(3))


def test_drivers_that_ignore_the_start_point_refuse_it():
    with pytest.raises(TypeError, match="Problem\\(start=...\\)"):
        bl.soba(START, 0.1, optax.sgd(0.1))
    with pytest.raises(TypeError, match="Problem\\(start=...\\)"):
        bl.hyperopt(START, bl.unroll(optax.sgd(0.1), 5), optax.sgd(0.1))
    with pytest.raises(TypeError, match="Problem\\(start=...\\)"):
        bl.online(START, optax.sgd(0.1), optax.sgd(0.1))


def test_problem_start_must_be_callable():
    with pytest.raises(TypeError, match="start=lambda h: h"):
        bl.Problem(TASK, TASK, start=3.0)


def test_first_order_refuses_an_inner_loss_that_depends_on_the_hyperparameters():
    ridge = bl.Problem(lambda w, h, b: TASK(w, h, b) + h * jnp.sum(w ** 2), TASK)
    hg = bl.hypergrad(ridge, bl.first_order(bl.unroll(optax.sgd(0.1), 5)))
    with pytest.raises(TypeError, match="exactly zero"):
        hg(jnp.asarray(0.1), jnp.zeros(3), jnp.ones(3), jnp.ones(3))
    with pytest.raises(TypeError, match="requires an unrolled method"):
        bl.first_order(bl.implicit(bl.unroll(optax.sgd(0.1), 5), bl.cg()))


@pytest.mark.parametrize("inner, outer, needle", [
    (jnp.ones((4, 3)), jnp.ones((5, 3)), "inner_batches: 4, outer_batches: 5"),
    ((jnp.ones((4, 3)), jnp.ones((3, 3))), jnp.ones((4, 3)), "same number of tasks"),
    (jnp.ones(()), jnp.ones(()), "is a scalar"),
    (None, None, "both empty"),
])
def test_mismatched_task_batches_are_refused(inner, outer, needle):
    meta = bl.over_tasks(bl.hypergrad(START, bl.unroll(optax.sgd(0.1), 2)))
    with pytest.raises(ValueError, match=needle):
        meta(jnp.zeros(3), None, inner, outer)
    with pytest.raises(TypeError, match="bilevel.hypergrad"):
        bl.over_tasks(3)


@pytest.mark.parametrize("strength", [0.0, -1.0, float("nan"), True, "1"])
def test_anchored_refuses_a_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        bl.anchored(TASK, strength)


def test_anchored_names_a_centre_of_the_wrong_tree_and_bad_arguments():
    inner = bl.anchored(TASK, 1.0)
    with pytest.raises(ValueError, match="tree of the parameters"):
        inner(jnp.zeros(3), {"init": jnp.zeros(3), "lr": 0.1}, jnp.ones(3))
    picked = bl.anchored(TASK, 1.0, center=lambda h: h["init"])
    assert float(picked(jnp.zeros(3), {"init": jnp.ones(3), "lr": 0.1}, jnp.zeros(3))) == pytest.approx(1.5)
    with pytest.raises(TypeError, match="loss"):
        bl.anchored(3, 1.0)
    with pytest.raises(TypeError, match="center"):
        bl.anchored(TASK, 1.0, center=3)


def test_per_parameter_sgd_refuses_rates_of_another_tree():
    opt = bl.per_parameter_sgd({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="tree of the parameters"):
        opt.update({"b": jnp.ones(2)}, opt.init(None))


@pytest.mark.parametrize("call, error, needle", [
    (lambda: blt.QuadraticTasks.sample(-1), ValueError, "seed >= 0"),
    (lambda: blt.QuadraticTasks.sample(0, num_tasks=0), ValueError, "num_tasks >= 1"),
    (lambda: blt.QuadraticTasks.sample(0, dim=2.5), TypeError, "integer dim"),
    (lambda: blt.QuadraticTasks.sample(0, max_condition=0.5), ValueError, "max_condition"),
    (lambda: blt.QuadraticTasks.sample(0).adapted(np.zeros(3), -0.1, 2), ValueError, "lr > 0"),
    (lambda: blt.QuadraticTasks.sample(0).maml_grad(np.zeros(3), 0.1, -1), ValueError, "steps >= 0"),
    (lambda: blt.QuadraticTasks.sample(0).imaml_grad(np.zeros(3), 0.0), ValueError, "strength"),
    (lambda: bst.quadratic_meta_tasks(min_tasks=3, max_tasks=2), ValueError, "min_tasks <= max_tasks"),
])
def test_quadratic_tasks_refuse_bad_arguments(call, error, needle):
    with pytest.raises(error, match=needle):
        call()


def test_a_nan_in_one_task_makes_the_meta_gradient_nan_not_zero():
    tasks = blt.QuadraticTasks.sample(6, num_tasks=3, dim=2, max_condition=KAPPA)
    B, d = tasks.outer_data
    bad = (B, d.at[1, 0].set(jnp.nan))
    for fn in (MAML[3], FOMAML, IMAML["cg"]):
        p0 = None if fn is not IMAML["cg"] else jnp.zeros(2)
        out = fn(tasks.hparams, p0, tasks.inner_data, bad)
        assert np.all(np.isnan(out.grad)) and np.isnan(out.value)
