"""Grid and random search: every candidate's value against a separate evaluation, the product
grid, chunking, divergence, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

EXACT = blt.Ridge.sample(4, dim=5, max_condition=5.0)
CLOSED = bl.solver(lambda h, w0, batch: EXACT.response(h))
PER = blt.RidgePerCoordinate.sample(1, dim=2, max_condition=5.0)
PER_CLOSED = bl.solver(lambda h, w0, batch: PER.response(h))


def search_grid(grid, chunk_size=64, exact=EXACT, method=CLOSED):
    return bl.grid_search(exact.problem, method, grid, exact.params0, exact.inner_batch,
                          exact.outer_batch, chunk_size=chunk_size)


def test_grid_values_are_the_closed_form_validation_losses():
    grid = jnp.linspace(-4.0, 2.0, 25)
    result = search_grid(grid)
    expected = np.array([float(EXACT.value(g)) for g in grid])
    np.testing.assert_allclose(result.values, expected, rtol=1e-10)
    i = int(np.argmin(expected))
    assert result.best_index == i and float(result.best) == float(grid[i])
    assert float(result.best_value) == pytest.approx(expected[i], rel=1e-10)
    np.testing.assert_allclose(result.best_params, EXACT.response(grid[i]), rtol=1e-10)
    assert result.wall_time > 0


def test_trained_candidates_match_one_call_each_and_chunking_does_not_matter():
    method = bl.unroll(optax.sgd(0.2), steps=40)
    grid = jnp.linspace(-3.0, 1.0, 11)
    one = jax.jit(bl.response(EXACT.problem, method))
    expected = [float(EXACT.problem.outer(one(g, EXACT.params0, EXACT.inner_batch), g, EXACT.outer_batch))
                for g in grid]
    for chunk in (1, 4, 11, 64):   # 4 does not divide 11: a remainder chunk
        result = search_grid(grid, chunk, method=method)
        np.testing.assert_allclose(result.values, expected, rtol=1e-12)


def test_grid_is_the_cartesian_product_over_leaves():
    problem = bl.Problem(
        inner=lambda w, h, b: PER.problem.inner(w, jnp.stack([h["a"], h["b"]]), b),
        outer=lambda w, h, b: PER.problem.outer(w, jnp.stack([h["a"], h["b"]]), b),
    )
    method = bl.solver(lambda h, w0, b: PER.response(jnp.stack([h["a"], h["b"]])))
    grid = {"a": jnp.linspace(-2.0, 1.0, 3), "b": jnp.linspace(-3.0, 0.0, 4)}
    result = bl.grid_search(problem, method, grid, PER.params0, PER.inner_batch, PER.outer_batch)
    a, b = np.meshgrid(np.asarray(grid["a"]), np.asarray(grid["b"]), indexing="ij")
    np.testing.assert_array_equal(result.candidates["a"], a.ravel())
    np.testing.assert_array_equal(result.candidates["b"], b.ravel())
    expected = [float(PER.value(jnp.array([x, y]))) for x, y in zip(a.ravel(), b.ravel())]
    np.testing.assert_allclose(result.values, expected, rtol=1e-10)


def test_a_vector_leaf_takes_whole_candidate_values():
    grid = jnp.array([[-1.0, -1.0], [0.0, -2.0], [1.0, 0.5]])          # 3 candidates of shape (2,)
    result = search_grid(grid, exact=PER, method=PER_CLOSED)
    np.testing.assert_allclose(result.values, [float(PER.value(g)) for g in grid], rtol=1e-10)
    assert result.candidates.shape == (3, 2)


def test_random_search_draws_from_sample_and_is_reproducible():
    sample = lambda k: jax.random.uniform(k, (), minval=-4.0, maxval=2.0)  # noqa: E731
    go = lambda key: bl.random_search(EXACT.problem, CLOSED, sample, EXACT.params0,  # noqa: E731
                                      EXACT.inner_batch, EXACT.outer_batch, num=33, key=key, chunk_size=8)
    result = go(jax.random.key(3))
    drawn = jax.vmap(sample)(jax.random.split(jax.random.key(3), 33))
    np.testing.assert_array_equal(result.candidates, drawn)
    np.testing.assert_allclose(result.values, [float(EXACT.value(h)) for h in drawn], rtol=1e-10)
    assert result.best_index == int(np.argmin(result.values))
    np.testing.assert_array_equal(go(jax.random.key(3)).values, result.values)
    assert not np.array_equal(go(jax.random.key(4)).candidates, result.candidates)
    legacy = go(jax.random.PRNGKey(0))   # old-style uint32 keys are accepted too
    assert legacy.values.shape == (33,)


def test_random_search_finds_the_grid_optimum_region():
    """n uniform draws on [lo, hi] around an interior optimum λ*: none lands within t of λ* with
    probability (1 − 2t/(hi − lo))ⁿ, so with t chosen to make that 1e-6 the best draw's value
    is within ½ max f''·t² of the optimum's, for every key but one in a million (measured over
    300 keys: at most 0.25 of that bound). No draw beats the 0.01-fine grid's best by more than
    the value's drop over half a grid cell."""
    exact = blt.Ridge.sample(0, dim=5, noise=1.0, n_train=6)
    closed = bl.solver(lambda h, w0, batch: exact.response(h))
    lo, hi, n, p = -4.0, 3.0, 256, 1e-6
    grid = search_grid(jnp.linspace(lo, hi, 701), exact=exact, method=closed)
    t = (hi - lo) / 2 * (1 - p ** (1 / n))                              # 0.18
    assert lo + t < float(grid.best) < hi - t                           # interior, t from both ends
    curvature = jax.jit(jax.vmap(jax.grad(jax.grad(exact.value))))(jnp.linspace(grid.best - t, grid.best + t, 101))
    above = 0.5 * float(curvature.max()) * t**2                         # 7e-3 (values span 1.1)
    below = 0.5 * float(curvature.max()) * 0.005**2
    for seed in range(4):
        rand = bl.random_search(exact.problem, closed, lambda k: jax.random.uniform(k, (), minval=lo, maxval=hi),
                                exact.params0, exact.inner_batch, exact.outer_batch, num=n,
                                key=jax.random.key(seed))
        gap = float(rand.best_value) - float(grid.best_value)
        assert -below <= gap <= above, (seed, gap, below, above)


def test_diverged_candidates_are_never_best():
    method = bl.unroll(optax.sgd(0.5), steps=200)
    grid = jnp.array([0.0, 40.0, -1.0])           # e^40: SGD with lr 0.5 diverges
    result = search_grid(grid, method=method)
    assert np.isinf(result.values[1]) and result.best_index != 1
    with pytest.raises(FloatingPointError, match="every one of the 1 candidates"):
        search_grid(jnp.array([40.0]), method=method)


@pytest.mark.parametrize("grid, error, match", [
    (jnp.asarray(0.5), ValueError, "leading axis"),
    (jnp.zeros((0,)), ValueError, "leading axis"),
    (jnp.arange(3), TypeError, "floating-point"),
    ({}, ValueError, "at least one"),
])
def test_bad_grids(grid, error, match):
    with pytest.raises(error, match=match):
        search_grid(grid)


def test_bad_search_arguments():
    ok = lambda k: jax.random.normal(k, ())  # noqa: E731
    args = (EXACT.params0, EXACT.inner_batch, EXACT.outer_batch)
    with pytest.raises(ValueError, match="chunk_size"):
        search_grid(jnp.linspace(0.0, 1.0, 3), chunk_size=0)
    with pytest.raises(TypeError, match="bilevel.Problem"):
        bl.grid_search(None, CLOSED, jnp.ones(2), *args)
    with pytest.raises(ValueError, match="num"):
        bl.random_search(EXACT.problem, CLOSED, ok, *args, num=0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="PRNG key"):
        bl.random_search(EXACT.problem, CLOSED, ok, *args, num=4, key=0)
    with pytest.raises(TypeError, match="sample"):
        bl.random_search(EXACT.problem, CLOSED, "uniform", *args, num=4, key=jax.random.key(0))
    with pytest.raises(TypeError, match="floating-point"):
        bl.random_search(EXACT.problem, CLOSED, lambda k: jax.random.randint(k, (), 0, 3), *args,
                         num=4, key=jax.random.key(0))
    with pytest.raises(TypeError, match="sample\\(key\\) failed"):
        bl.random_search(EXACT.problem, CLOSED, lambda k, extra: k, *args, num=4, key=jax.random.key(0))
