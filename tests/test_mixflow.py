"""MixFlow-MG (`bl.mixflow`): an unroll's exact hypergradient with a forward-over-reverse backward pass.

Exact values: mixflow computes the same derivative as plain reverse mode through the
unroll, by a different rule (the stored iterates and one forward-over-reverse product per
step instead of the stored intermediates of every step's gradient). `bl.unroll`'s
hypergradient, JAX's own reverse-over-reverse autodiff of the same steps, is the
independent reference: they must agree to rounding (float64, rtol 1e-10).

Nearly all the time of these tests is XLA compiling small programs, so they compile with
`jax_disable_most_optimizations` (as tests/test_docs_pages.py does): the same programs and
values, fewer backend optimisations. The memory test compiles normally, since its numbers
are those of XLA's optimised memory plan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
from bilevel._mixflow import MixFlow, mixflow


@pytest.fixture(autouse=True)
def quick_compilation(request):
    """Compile with few optimisations, except for the memory test; restore the setting after."""
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, "memory" not in request.node.name)
    yield
    jax.config.update(name, previous)


def _net(w, x):
    return jnp.tanh(x @ w["W1"] + w["b1"]) @ w["W2"]


def _mse(w, b):
    return jnp.mean((_net(w, b[0]) - b[1]) ** 2)


def _mlp(n: int = 24, dim: int = 3, width: int = 8, seed: int = 0):
    """An MLP regression whose inner loss has a weight decay exp(h['wd']) (a λ in the loss)."""
    problem = bl.Problem(
        inner=lambda w, h, b: _mse(w, b) + jnp.exp(h["wd"]) * (jnp.sum(w["W1"] ** 2) + jnp.sum(w["W2"] ** 2)),
        outer=lambda w, h, b: _mse(w, b),
    )
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (n, dim))
    data = (x, jnp.sin(x[:, :1]) + 0.1 * x[:, 1:2])
    w0 = {"W1": 0.5 * jax.random.normal(k[1], (dim, width)), "b1": jnp.zeros(width),
          "W2": 0.3 * jax.random.normal(k[2], (width, 1))}
    return problem, w0, data


OPTIMIZERS = {
    "sgd": lambda h: optax.sgd(h["lr"]),
    "momentum": lambda h: optax.sgd(h["lr"], momentum=0.8),
    "adam": lambda h: optax.adam(h["lr"]),
}
H = {"wd": jnp.asarray(-3.0), "lr": jnp.asarray(0.05)}


def _assert_same(out, ref):
    for key in ref.grad:
        np.testing.assert_allclose(out.grad[key], ref.grad[key], rtol=1e-10, atol=1e-14)
    for key in ref.params:
        np.testing.assert_allclose(out.params[key], ref.params[key], rtol=1e-12, atol=1e-15)


def _hypergrad(problem, method, *args):
    return jax.jit(bl.hypergrad(problem, method))(*args)


# checkpoint=7 does not divide 30 steps: stored segment starts, recomputed segments and a tail
@pytest.mark.parametrize("name,checkpoint", [("sgd", None), ("momentum", 7), ("adam", 7)])
def test_mixflow_equals_unroll_on_an_mlp_with_the_learning_rate_as_hyperparameter(name, checkpoint):
    problem, w0, data = _mlp()
    method = bl.unroll(OPTIMIZERS[name], steps=30, checkpoint=checkpoint)
    ref = _hypergrad(problem, method, H, w0, data, data)
    out = _hypergrad(problem, mixflow(method), H, w0, data, data)
    _assert_same(out, ref)
    assert abs(float(ref.grad["wd"])) > 1e-6 and abs(float(ref.grad["lr"])) > 1e-3   # both paths used
    np.testing.assert_allclose(out.stats["inner_grad_norm"], ref.stats["inner_grad_norm"], rtol=1e-12)


@pytest.mark.parametrize("checkpoint", [None, 4])   # 4 does not divide 10 steps
def test_mixflow_with_per_step_minibatches_and_a_start_point_equals_unroll(checkpoint):
    # MAML: the start point is the hyperparameter "w0" itself, and the inner data change every step.
    problem, w0, (x, y) = _mlp(n=10 * 8)
    steps = 10
    batches = bl.per_step((x.reshape(steps, 8, -1), y.reshape(steps, 8, -1)))
    maml = bl.Problem(inner=problem.inner, outer=problem.outer, start=lambda h: h["w0"])
    h = {**H, "w0": w0}
    opt = OPTIMIZERS["adam" if checkpoint else "momentum"]
    method = bl.unroll(opt, steps=steps, checkpoint=checkpoint)
    ref = _hypergrad(maml, method, h, None, batches, (x, y))
    out = _hypergrad(maml, mixflow(method), h, None, batches, (x, y))
    for key in ("wd", "lr"):
        np.testing.assert_allclose(out.grad[key], ref.grad[key], rtol=1e-10)
    for key in w0:
        np.testing.assert_allclose(out.grad["w0"][key], ref.grad["w0"][key], rtol=1e-10, atol=1e-14)
    assert float(jnp.abs(ref.grad["w0"]["W1"]).max()) > 1e-4   # the start point's path is not zero


@pytest.mark.slow   # ~10 s alone: reverse mode over both backward passes
def test_mixflow_hyper_hessian_by_reverse_mode_equals_unroll():
    problem, w0, data = _mlp()
    method = bl.unroll(lambda h: optax.sgd(h["lr"], momentum=0.5), steps=6, checkpoint=4)

    def hessian_row(m):   # the λ-gradient of ∂f/∂wd + ∂f/∂lr: one more reverse pass
        grad = bl.hypergrad(problem, m)
        return jax.jit(jax.grad(lambda h: sum(jax.tree_util.tree_leaves(grad(h, w0, data, data).grad))))(H)

    ref, out = hessian_row(method), hessian_row(mixflow(method))
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-9)


def test_mixflow_composes_with_jit_vmap_and_does_not_retrace():
    problem, w0, data = _mlp()
    method = bl.unroll(lambda h: optax.sgd(h["lr"], momentum=0.5), steps=8)
    traces = []

    def run(wd):
        traces.append(1)
        return bl.hypergrad(problem, mixflow(method))({"wd": wd, "lr": H["lr"]}, w0, data, data).grad["wd"]

    def ref(wd):
        return bl.hypergrad(problem, method)({"wd": wd, "lr": H["lr"]}, w0, data, data).grad["wd"]

    wds = jnp.array([-4.0, -3.0, -2.0])
    jitted = jax.jit(run)
    expected = jax.vmap(ref)(wds)
    for wd, e in zip(wds, expected):
        np.testing.assert_allclose(jitted(wd), e, rtol=1e-10)
    assert len(traces) == 1
    np.testing.assert_allclose(jax.vmap(run)(wds), expected, rtol=1e-10)


def test_mixflow_refusals():
    problem, w0, data = _mlp()
    with pytest.raises(TypeError, match=r"mixflow\(method\) requires an unrolled method.*got Implicit"):
        mixflow(bl.implicit(bl.unroll(optax.sgd(0.1), steps=5), bl.cg()))
    with pytest.raises(TypeError, match="mixflow"):
        MixFlow(bl.drmad(bl.unroll(optax.sgd(0.1), steps=5)))
    method = mixflow(bl.unroll(optax.sgd(0.1), steps=5))
    with pytest.raises(TypeError, match="forward-mode autodiff"):   # reverse mode only
        jax.jvp(lambda h: bl.response(problem, method)(h, w0, data)["W2"], (H,), (H,))
    with pytest.raises(TypeError, match="complex"):
        bl.hypergrad(problem, method)(H, jax.tree_util.tree_map(lambda a: a.astype(complex), w0), data, data)
    with pytest.raises(ValueError, match="per_step"):   # wrong number of per-step batches
        bl.hypergrad(problem, method)(H, w0, bl.per_step(jax.tree_util.tree_map(lambda a: a[None], data)), data)


def test_mixflow_nan_in_the_data_gives_nan():
    problem, w0, (x, y) = _mlp()
    method = mixflow(bl.unroll(optax.sgd(0.05), steps=5))
    out = bl.hypergrad(problem, method)(H, w0, (x, y), (x, y.at[0, 0].set(jnp.nan)))
    assert bool(jnp.isnan(out.grad["wd"]))


def test_mixflow_stores_the_iterates_where_reverse_mode_stores_every_steps_activations():
    # Per step, plain reverse mode keeps the intermediates of the gradient computation, at
    # least the n × width hidden activations (n = 256, width = 32: 64 KiB in float64), while
    # mixflow keeps only the iterate w_t (16·32 + 32 + 32 = 576 parameters, 4.5 KiB) and
    # recomputes the rest. So the memory XLA plans grows per step by at least one activation
    # matrix for unroll, and by about one copy of the parameters for mixflow.
    n, width, dim = 256, 32, 16
    problem, w0, data = _mlp(n=n, dim=dim, width=width)
    item = 8
    activation_bytes = n * width * item
    param_bytes = sum(a.size for a in jax.tree_util.tree_leaves(w0)) * item

    def temp_bytes(method):
        compiled = jax.jit(bl.hypergrad(problem, method)).lower(H, w0, data, data).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    opt = OPTIMIZERS["sgd"]
    unroll = {T: temp_bytes(bl.unroll(opt, steps=T)) for T in (50, 150)}
    mixed = {T: temp_bytes(mixflow(bl.unroll(opt, steps=T))) for T in (50, 150)}
    unroll_per_step = (unroll[150] - unroll[50]) / 100
    mixed_per_step = (mixed[150] - mixed[50]) / 100
    assert unroll_per_step >= activation_bytes, unroll_per_step
    assert mixed_per_step <= 1.5 * param_bytes, (mixed_per_step, param_bytes)
    assert mixed[150] < unroll[150] / 10     # activations / parameters ≈ 14 per step here


def test_mixflow_python_float_hyperparameter_gets_its_hypergradient():
    # A Python float (not an array) as the hyperparameter must be differentiated, not dropped.
    problem, w0, data = _mlp()
    scalar = bl.Problem(inner=lambda w, h, b: problem.inner(w, {"wd": h}, b), outer=problem.outer)
    method = bl.unroll(optax.sgd(0.05), steps=5)
    ref = bl.hypergrad(scalar, method)(-3.0, w0, data, data)
    out = bl.hypergrad(scalar, mixflow(method))(-3.0, w0, data, data)
    assert abs(float(ref.grad)) > 1e-6
    np.testing.assert_allclose(out.grad, ref.grad, rtol=1e-10)
