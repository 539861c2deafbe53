"""One hyperparameter per parameter (H = P): no object of size P × H in any hypergradient step.

The check reads the traced program: every intermediate of the step's jaxpr (sub-programs
of scans, loops, conditionals and custom derivatives included) must be far smaller than
P × H. The same check finds the P × H Jacobian that forward mode carries by design, so it
can fail. Then a tiny run of benchmarks/million_hparams.py (the issue's million-hyperparameter
benchmark) on digits.
"""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl

pytestmark = pytest.mark.usefixtures("quick_compilation")

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"
FEATURES, HIDDEN, ROWS, BATCH = 64, 40, 64, 16


def _sizes(jaxpr):
    """The element count of every intermediate of a jaxpr, its sub-jaxprs' included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield math.prod(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _sizes(sub)


def largest_intermediate(fn, *args) -> int:
    return max(_sizes(jax.make_jaxpr(fn)(*args).jaxpr))


def _mlp(params, X):
    W1, b1, W2, b2 = params
    return jnp.tanh(X @ W1 + b1) @ W2 + b2


def _xent(params, batch):
    X, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_mlp(params, X), y))


PROBLEM = bl.Problem(
    inner=lambda w, lam, b: _xent(w, b) + 0.5 * sum(jnp.sum(jnp.exp(l) * p**2) for p, l in zip(w, lam)),
    outer=lambda w, lam, b: _xent(w, b))


@pytest.fixture(scope="module")
def setting():
    k = jax.random.split(jax.random.key(0), 4)
    params = (0.1 * jax.random.normal(k[0], (FEATURES, HIDDEN)), jnp.zeros(HIDDEN),
              0.1 * jax.random.normal(k[1], (HIDDEN, 10)), jnp.zeros(10))
    hparams = tuple(jnp.full(p.shape, -4.0) for p in params)
    data = [(jax.random.normal(kk, (ROWS, FEATURES)), jax.random.randint(kk, (ROWS,), 0, 10)) for kk in k[2:]]
    P = sum(p.size for p in params)
    # the legitimate objects: P-sized trees, the data, SABA's tables (ROWS / BATCH rows of P)
    assert max(P, ROWS * FEATURES, ROWS // BATCH * P) * 20 < P * P
    return params, hparams, data, P


DRIVERS = {
    "soba": lambda: bl.soba(PROBLEM, 0.1, optax.adam(0.01)),
    "saba": lambda: bl.saba(PROBLEM, 0.1, optax.adam(0.01)),
    "stocbio": lambda: bl.stocbio(PROBLEM, 0.1, 0.01, inner_steps=2, neumann_terms=3, neumann_lr=0.1),
    "amigo": lambda: bl.amigo(PROBLEM, 0.1, 0.01, inner_steps=2, linear_steps=3, linear_lr=0.1),
    "f2sa": lambda: bl.f2sa(PROBLEM, 0.1, 0.01, penalty0=1.0, penalty_growth=0.01),
    "bome": lambda: bl.bome(PROBLEM, 0.1, inner_steps=2, eta=0.5),
}


@pytest.mark.parametrize("name", list(DRIVERS))
def test_stochastic_step_forms_nothing_of_size_p_times_h(setting, name):
    _, _, (train, val), P = setting
    driver = DRIVERS[name]()
    inner, outer = bl.sampler(train, BATCH), bl.sampler(val, BATCH)
    state = _init(name, driver, setting, inner, outer)
    biggest = largest_intermediate(lambda s: driver.step(s, inner, outer), state)
    assert FEATURES * HIDDEN <= biggest < P * P / 20, (name, biggest, P)


def _init(name, driver, setting, inner, outer):
    params, hparams, _, _ = setting
    key = jax.random.key(1)
    if name == "saba":
        return driver.init(key, hparams, params, inner=inner, outer=outer)
    return driver.init(key, hparams, params)


@pytest.mark.parametrize("name", ["soba", "f2sa", "bome"])  # the three `run` methods
def test_run_without_history_keeps_the_scalars_and_stacks_nothing_per_hyperparameter(setting, name):
    _, _, (train, val), _ = setting
    driver = DRIVERS[name]()
    inner, outer = bl.sampler(train, BATCH), bl.sampler(val, BATCH)
    state0 = _init(name, driver, setting, inner, outer)
    full_state, full = driver.run(state0, inner, outer, 4)
    state, infos = driver.run(state0, inner, outer, 4, history=False)
    assert infos.hypergrad is None and infos.hparams is None
    assert jax.tree_util.tree_leaves(full.hypergrad)[0].shape[0] == 4
    np.testing.assert_allclose(infos.value, full.value, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(full_state)):
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    # 50 steps stack 50 × H numbers per tree with the history, nothing of that size without it
    steps, leaf = 50, FEATURES * HIDDEN
    with_history = largest_intermediate(lambda s: driver.run(s, inner, outer, steps)[1], state0)
    without = largest_intermediate(lambda s: driver.run(s, inner, outer, steps, history=False)[1], state0)
    assert with_history >= steps * leaf and without < 10 * leaf
    with pytest.raises(TypeError, match="`history` to be True"):
        driver.run(state0, inner, outer, 4, history="no")


@pytest.mark.parametrize("method", ["implicit_cg", "implicit_neumann", "unroll"])
def test_hypergradient_methods_form_nothing_of_size_p_times_h(setting, method):
    params, hparams, (train, val), P = setting
    forward = bl.unroll(optax.sgd(0.1), steps=3)
    methods = {"implicit_cg": bl.implicit(forward, bl.cg(maxiter=3)),
               "implicit_neumann": bl.implicit(forward, bl.neumann(3, 0.1)), "unroll": forward}
    hypergrad = bl.hypergrad(PROBLEM, methods[method])
    biggest = largest_intermediate(lambda h: hypergrad(h, params, train, val).grad, hparams)
    assert FEATURES * HIDDEN <= biggest < P * P / 20, (method, biggest, P)


def test_the_check_finds_forward_modes_jacobian(setting):
    """Forward mode carries dw/dλ, P × H numbers by design: the walker must see it."""
    params, hparams, (train, val), P = setting
    hypergrad = bl.hypergrad(PROBLEM, bl.forward_mode(bl.unroll(optax.sgd(0.1), steps=2)))
    biggest = largest_intermediate(lambda h: hypergrad(h, params, train, val).grad, hparams)
    assert biggest >= FEATURES * HIDDEN * P  # the Jacobian of the first layer's weights alone


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_million_hparams_benchmark_quick_run_writes_every_row(tmp_path):
    script = _load("million_hparams")
    doc = script.main(["--quick", "--out", str(tmp_path), "--assets", str(tmp_path)])
    saved = json.loads((tmp_path / "million_hparams.json").read_text())
    assert saved["P"] == doc["P"] == script.count(script.init_cnn(jax.random.key(0), 8, (2, 4, 16)))
    rows = saved["rows"]
    assert list(rows) == ["no decay", "decay 1e-04 (untuned)", "scalar grid", "scalar SOBA", "per-parameter SOBA"]
    assert rows["per-parameter SOBA"]["H"] == saved["P"] and rows["scalar SOBA"]["H"] == 1
    for name, row in rows.items():
        assert all(np.isfinite(row["curve"][k]).all() for k in ("val_loss", "test_loss")), name
        assert 0.0 <= row["final"]["test_accuracy"] <= 1.0 and row["seconds"] > 0, name
        assert row["memory"]["total"] > 0 and row["p_times_h_bytes"] == saved["P"] * row["H"] * 4, name
    # the grid row is its best member, chosen by validation loss
    grid = rows["scalar grid"]["grid"]
    assert rows["scalar grid"]["final"]["val_loss"] == min(g["val_loss"] for g in grid.values())
    learned = rows["per-parameter SOBA"]["hparams"]
    assert sum(layer["size"] for layer in learned.values()) == saved["P"]
    markdown = (tmp_path / "million_hparams.md").read_text()
    assert markdown.count("\n| ") == 2 + 5 + 8  # two header rows, 5 methods, 8 layers
    assert (tmp_path / "million_hparams.png").stat().st_size > 0
    # more SOBA seeds beside the main run's: seed 0's accuracies are the main run's own
    seeds = script.main(["--quick", "--soba-seeds", "1", "--out", str(tmp_path)])
    assert seeds["seeds"] == [0, 1]
    for name in ("scalar SOBA", "per-parameter SOBA"):
        accs = seeds["test_accuracy"][name]
        assert len(accs) == 2 and accs[0] == rows[name]["final"]["test_accuracy"], name
    assert "| per-parameter SOBA |" in (tmp_path / "million_hparams_seeds.md").read_text()
