"""Problem, per_step, and the argument checks of response/hypergrad."""

import jax.numpy as jnp
import optax
import pytest

import bilevel as bl

METHODS = [
    bl.unroll(optax.sgd(0.1), 5),
    bl.truncate(bl.unroll(optax.sgd(0.1), 5), last=2),
    bl.implicit(bl.unroll(optax.sgd(0.1), 5), bl.cg()),
]


def _inner(w, lam, batch):
    return 0.5 * jnp.sum((w["a"] - 1.0) ** 2) + 0.5 * lam * jnp.sum(w["a"] ** 2)


def _outer(w, lam, batch):
    return 0.5 * jnp.sum(w["a"] ** 2)


GOOD = bl.Problem(_inner, _outer)
W0 = {"a": jnp.zeros(3)}


def test_problem_requires_callables():
    with pytest.raises(TypeError, match=r"inner.*callable.*got int"):
        bl.Problem(inner=3, outer=_outer)
    with pytest.raises(TypeError, match=r"outer.*callable"):
        bl.Problem(inner=_inner, outer=None)


def test_problem_is_immutable_and_hashable():
    p = bl.Problem(_inner, _outer)
    assert hash(p) == hash(bl.Problem(_inner, _outer))
    with pytest.raises(Exception):
        p.inner = _outer


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_non_scalar_inner_loss(method):
    p = bl.Problem(lambda w, lam, b: (w["a"] - lam) ** 2, _outer)
    with pytest.raises(TypeError, match=r"inner loss must return a scalar; it returned \(3,\)"):
        bl.hypergrad(p, method)(jnp.asarray(0.1), W0, None, None)


def test_non_scalar_outer_loss():
    p = bl.Problem(_inner, lambda w, lam, b: w["a"])
    with pytest.raises(TypeError, match=r"outer loss must return a scalar.*jnp.mean"):
        bl.hypergrad(p, METHODS[0])(jnp.asarray(0.1), W0, None, None)


def test_integer_loss():
    p = bl.Problem(lambda w, lam, b: jnp.sum(b), _outer)
    with pytest.raises(TypeError, match=r"floating-point scalar; it returned dtype int"):
        bl.hypergrad(p, METHODS[0])(jnp.asarray(0.1), W0, jnp.arange(3), None)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_integer_hparams(method):
    with pytest.raises(TypeError, match=r"floating-point hyperparameters.*int.*jnp.asarray"):
        bl.hypergrad(GOOD, method)(jnp.asarray(1), W0, None, None)
    with pytest.raises(TypeError, match=r"floating-point hyperparameters"):
        bl.response(GOOD, method)({"lam": jnp.asarray(1)}, W0, None)


def test_empty_hparams():
    with pytest.raises(ValueError, match="at least one floating-point array leaf"):
        bl.hypergrad(GOOD, METHODS[0])({}, W0, None, None)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_params0_tree_mismatch(method):
    with pytest.raises(Exception, match=r"Check that params0 has the tree the loss expects"):
        bl.hypergrad(GOOD, method)(jnp.asarray(0.1), (jnp.zeros(3),), None, None)
    with pytest.raises(Exception, match=r"params had structure"):
        bl.response(GOOD, method)(jnp.asarray(0.1), {"b": jnp.zeros(3)}, None)


def test_compile_requires_problem_and_method():
    with pytest.raises(TypeError, match="bilevel.Problem"):
        bl.hypergrad(_inner, METHODS[0])
    with pytest.raises(TypeError, match=r"requires a method such as bilevel.unroll"):
        bl.response(GOOD, optax.sgd(0.1))


def test_per_step_requires_arrays_with_step_axis():
    with pytest.raises(ValueError, match="at least one array leaf"):
        bl.per_step(None)
    with pytest.raises(ValueError, match="leading step axis"):
        bl.per_step({"x": jnp.asarray(1.0)})


def test_solver_with_non_array_params_leaves_rejected():
    import equinox as eqx

    class Model(eqx.Module):
        a: jnp.ndarray
        act: object

    p = bl.Problem(lambda m, lam, b: _inner({"a": m.a}, lam, b), lambda m, lam, b: _outer({"a": m.a}, lam, b))
    method = bl.implicit(bl.solver(lambda h, w0, b: w0), bl.cg())
    with pytest.raises(TypeError, match=r"(?s)non-array leaves.*static"):
        bl.hypergrad(p, method)(jnp.asarray(0.1), Model(jnp.zeros(3), jnp.tanh), None, None)
