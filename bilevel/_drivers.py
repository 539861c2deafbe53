"""Pieces shared by the stochastic drivers (SOBA, SABA, StocBiO, AmIGO, F2SA, BOME).

Each driver is an optax-style `init`/`step` pair over a NamedTuple state that holds a PRNG
key and a step counter; `step(state, inner, outer)` draws its minibatches from two
`bilevel.Sampler`s with per-stream keys folded from the state's key (`stream_keys`), so a run is a pure function of
`(state, inner, outer)`: one `lax.scan`, and a population of seeds one `vmap` over keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._problem import Problem, refuse_start
from ._sampler import Sampler

PyTree = Any
StepSize = float | Callable


def check_problem(problem, where: str) -> None:
    if not isinstance(problem, Problem):
        raise TypeError(
            f"{where} requires a bilevel.Problem as first argument; got "
            f"{type(problem).__name__}. Build one with bilevel.Problem(inner=..., outer=...)."
        )
    refuse_start(problem, where)


def check_step_size(value, name: str, where: str) -> StepSize:
    """A positive finite Python number, or a schedule `step -> step size` (e.g. from optax)."""
    if callable(value):
        return value
    if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where} requires `{name}` to be a positive number or a schedule step -> size "
            f"(e.g. optax.exponential_decay(...)); got {type(value).__name__} {value!r}."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{where} requires `{name}` > 0 and finite; got {name}={value}. A step size of zero "
            "or less never moves (or ascends); pass e.g. 0.01."
        )
    return float(value)


def step_size(value: StepSize, t) -> jax.Array:
    """The step size at step `t` (a schedule is called with the int32 step count)."""
    return jnp.asarray(value(t)) if callable(value) else jnp.asarray(value)


def check_outer_optimizer(value, where: str) -> optax.GradientTransformation:
    """An optax optimizer for λ; a positive number γ means `optax.sgd(γ)`, the papers' update."""
    if isinstance(value, optax.GradientTransformation):
        return value
    return optax.sgd(check_step_size(value, "outer_optimizer", where))


def check_sampler(value, name: str, where: str) -> Sampler:
    if not isinstance(value, Sampler):
        raise TypeError(
            f"{where} requires `{name}` to be a bilevel.Sampler, which the driver draws "
            f"minibatches from inside the compiled step; got {type(value).__name__}. Wrap the "
            f"rows with bilevel.sampler(data, batch_size) (batch_size = all rows for full batch)."
        )
    return value


def check_steps(steps, where: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where} requires steps to be a Python int >= 1; got {steps!r}.")
    return steps


def check_key(key, where: str) -> jax.Array:
    """A PRNG key (new-style `jax.random.key` or legacy uint32[2])."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.shape == (2,) and key.dtype == jnp.uint32:
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(
        f"{where} requires `key` to be a PRNG key such as jax.random.key(0); got "
        f"{type(key).__name__} {getattr(key, 'shape', '')} {getattr(key, 'dtype', key)!r}."
    )


def check_like(value, template, name: str, where: str) -> None:
    """Raise unless `value` has the tree, shapes and dtypes of `template` (e.g. a carried v)."""
    same = jax.tree_util.tree_structure(value) == jax.tree_util.tree_structure(template) and all(
        np.shape(a) == np.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(template)))
    if not same:
        from ._problem import typed_summary
        raise ValueError(
            f"{where} requires `{name}` to have the tree, shapes and dtypes of the inner params "
            f"{typed_summary(template)}; got {typed_summary(value)}. It must come from a run of "
            "the same problem (or pass None to start from zero)."
        )


def stream_keys(key, count: int) -> tuple:
    """`count` independent keys, one per minibatch stream, fixed for the whole run.

    Stream `i` draws `sampler.index(stream_keys(key, n)[i], c)` at its c-th draw (a driver
    that draws d minibatches per step from one stream uses c = d·step + k), so epochs
    without replacement are kept across steps.
    """
    return tuple(jax.random.fold_in(key, i) for i in range(count))


def check_history(history, where: str) -> bool:
    if not isinstance(history, (bool, np.bool_)):
        raise TypeError(
            f"{where} requires `history` to be True (stack every step's info) or False (keep "
            f"the scalars, drop the per-step `hypergrad` and `hparams` trees); got "
            f"{type(history).__name__} {history!r}."
        )
    return bool(history)


@eqx.filter_jit
def scan_run(driver, state, inner: Sampler, outer: Sampler, steps: int, history: bool = True):
    """`steps` calls of `driver.step` in one compiled `lax.scan`: `(state, infos)`.

    With `history=False` the infos' `hypergrad` and `hparams` (trees of the size of the
    hyperparameters) are `None`, so nothing of size steps × |hparams| is stacked.
    """
    def body(s, _):
        s, info = driver.step(s, inner, outer)
        return s, (info if history else info._replace(hypergrad=None, hparams=None))

    return jax.lax.scan(body, state, None, length=steps)
