"""Search baselines: train from scratch at each candidate, all candidates in one compiled call."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import AbstractMethod
from ._compile import _check_problem_method, response
from ._problem import Problem, check_hparams, tree_summary

PyTree = Any


class SearchResult(NamedTuple):
    """What `bilevel.grid_search` and `bilevel.random_search` return.

    **Fields:**

    - `best`: the candidate hyperparameters with the lowest validation loss.
    - `best_value`: that loss.
    - `best_index`: its row in `candidates`.
    - `best_params`: the inner parameters trained at `best`.
    - `candidates`: every candidate, stacked (leading axis = candidate).
    - `values`: the validation loss of every candidate (`inf` where training diverged).
    - `wall_time`: seconds for the whole search, compilation included.
    """

    best: PyTree
    best_value: jax.Array
    best_index: int
    best_params: PyTree
    candidates: PyTree
    values: jax.Array
    wall_time: float


@eqx.filter_jit
def _values(problem: Problem, method: AbstractMethod, candidates, params0, inner, outer, chunk_size: int):
    respond = response(problem, method)

    def value(h):
        return problem.outer(respond(h, params0, inner), h, outer)

    values = jax.lax.map(value, candidates, batch_size=chunk_size)
    return jnp.where(jnp.isfinite(values), values, jnp.inf)


@eqx.filter_jit
def _respond(problem, method, h, params0, inner):
    return response(problem, method)(h, params0, inner)


def _check_chunk(chunk_size, where: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(
            f"{where} requires chunk_size to be an int >= 1 (candidates trained at once, which "
            f"bounds memory); got {chunk_size!r}."
        )


def _search(where, problem, method, candidates, params0, inner_data, outer_data, chunk_size, began):
    _check_problem_method(problem, method, where)
    _check_chunk(chunk_size, where)
    num = jax.tree_util.tree_leaves(candidates)[0].shape[0]
    values = _values(problem, method, candidates, params0, inner_data, outer_data, min(chunk_size, num))
    index = int(jnp.argmin(values))
    if not np.isfinite(float(values[index])):
        raise FloatingPointError(
            f"{where}: every one of the {num} candidates gave a non-finite validation loss (the "
            "inner training diverged everywhere). Use a smaller inner learning rate or other ranges."
        )
    best = jax.tree_util.tree_map(lambda c: c[index], candidates)
    params = _respond(problem, method, best, params0, inner_data)
    jax.block_until_ready(params)
    return SearchResult(best, values[index], index, params, candidates, values, time.perf_counter() - began)


def _grid_candidates(grid) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(grid)
    check_hparams(grid, "grid_search(..., grid, ...)")
    for leaf in leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] == 0:
            raise ValueError(
                "grid_search(..., grid, ...) requires every leaf of `grid` to have a leading axis of "
                f"candidate values (shape (k, *leaf_shape), k >= 1); got {tree_summary(grid)}. For "
                "a scalar hyperparameter pass a 1-D array, e.g. jnp.linspace(-4.0, 2.0, 13)."
            )
    sizes = [jnp.shape(leaf)[0] for leaf in leaves]
    index = np.indices(sizes).reshape(len(sizes), -1)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf)[i] for leaf, i in zip(leaves, index)])


def grid_search(
    problem: Problem,
    method: AbstractMethod,
    grid: PyTree,
    params0: PyTree,
    inner_data,
    outer_data,
    *,
    chunk_size: int = 64,
) -> SearchResult:
    """Train from scratch at every point of a grid and keep the one with the lowest validation loss.

    All candidates run in one compiled call: `jax.lax.map` over chunks of `chunk_size`
    candidates, each chunk `vmap`ped, so memory stays bounded by one chunk. Each candidate is
    trained by `method`'s forward pass (its derivative rule is not used) from `params0`.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: how the inner parameters are found, e.g. `bilevel.unroll(optax.sgd(0.1), steps=200)`.
    - `grid`: the hyperparameters' tree, each leaf of shape `(k, *leaf_shape)` holding k
      candidate values of that leaf; the candidates are the Cartesian product over leaves.
    - `params0`: the inner parameters every training starts from.
    - `inner_data`: the inner data (a batch, `bilevel.per_step(stacked)`, or `None`).
    - `outer_data`: the validation batch (or `None`).
    - `chunk_size`: how many candidates train at once (bounds memory).

    **Returns:**

    A `SearchResult` (best candidate, its loss and parameters, and the full table).

    **Example:**

    ```python
    import jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.unroll(optax.sgd(0.3), steps=100)
    result = bl.grid_search(problem, method, jnp.linspace(-2.0, 2.0, 41), jnp.zeros(3), None, None)
    print(result.best, result.best_value)   # log λ ≈ 0: λ = 1 gives w = 0.5
    ```
    """
    began = time.perf_counter()
    candidates = _grid_candidates(grid)
    return _search("grid_search(problem, method, grid, ...)", problem, method, candidates, params0,
                   inner_data, outer_data, chunk_size, began)


def _check_key(key) -> None:
    is_typed = jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key) if hasattr(key, "dtype") else False
    legacy = hasattr(key, "shape") and key.shape == (2,) and getattr(key, "dtype", None) == jnp.uint32
    if not (is_typed and key.shape == ()) and not legacy:
        raise TypeError(
            "random_search(...) requires `key` to be one JAX PRNG key, e.g. jax.random.key(0) or "
            f"jax.random.PRNGKey(0); got {type(key).__name__} {getattr(key, 'shape', '')}."
        )


def random_search(
    problem: Problem,
    method: AbstractMethod,
    sample: Callable,
    params0: PyTree,
    inner_data,
    outer_data,
    *,
    num: int,
    key,
    chunk_size: int = 64,
) -> SearchResult:
    """Train from scratch at `num` random hyperparameters and keep the best.

    Candidates are `sample(k)` for `num` keys split from `key`, drawn in one `vmap`; training
    runs as in `bilevel.grid_search` (one compiled call, chunks of `chunk_size`).

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: how the inner parameters are found (its forward pass).
    - `sample`: `sample(key) -> hparams`, one candidate per key, e.g.
      `lambda k: jax.random.uniform(k, (10,), minval=-6.0, maxval=0.0)` for ten log-penalties.
    - `params0`, `inner_data`, `outer_data`: as for `bilevel.grid_search`.
    - `num`: the number of candidates, int >= 1.
    - `key`: a JAX PRNG key.
    - `chunk_size`: how many candidates train at once (bounds memory).

    **Returns:**

    A `SearchResult`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    sample = lambda k: jax.random.uniform(k, (), minval=-2.0, maxval=2.0)
    result = bl.random_search(problem, bl.unroll(optax.sgd(0.3), steps=100), sample,
                              jnp.zeros(3), None, None, num=64, key=jax.random.key(0))
    print(result.best, result.values.shape)
    ```
    """
    began = time.perf_counter()
    where = "random_search(problem, method, sample, ...)"
    if not callable(sample):
        raise TypeError(f"{where} requires `sample` to be a function key -> hparams; got {sample!r}.")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"{where} requires num to be an int >= 1 (the number of candidates); got {num!r}.")
    _check_key(key)
    keys = jax.random.split(key, num)
    try:
        drawn = jax.eval_shape(sample, keys[0])
    except Exception as err:
        raise TypeError(f"{where}: calling sample(key) failed: {err}. It must map one PRNG key to hparams.") from err
    check_hparams(drawn, f"{where}'s sample(key) output")
    candidates = jax.jit(jax.vmap(sample))(keys)
    return _search(where, problem, method, candidates, params0, inner_data, outer_data, chunk_size, began)
