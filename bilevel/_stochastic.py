"""Stochastic bilevel drivers with a second-order linear-system variable: SOBA, SABA, StocBiO, AmIGO.

All four estimate the hypergradient ∇h(λ) = ∇_λF + ∇²_λw G v with v ≈ −H⁻¹∇_w F
(H = ∇²_ww G, G = `problem.inner`, F = `problem.outer`) from minibatches, and differ in how
they track w ≈ w*(λ) and v:

| driver | per step | v |
|---|---|---|
| `soba` | one SGD step on w, v and λ together | one SGD step on ½vᵀHv + vᵀ∇_wF |
| `saba` | SOBA with SAGA variance reduction of every direction | as SOBA |
| `stocbio` | `inner_steps` SGD steps on w, then λ | a stochastic Neumann series, afresh |
| `amigo` | `inner_steps` SGD steps on w, `linear_steps` on v, then λ | warm-started SGD |

Each is an optax-style `init`/`step`/`run` driver over a `StochasticState`; minibatches are
drawn inside the compiled step from two `bilevel.Sampler`s (see `bilevel._drivers`), so a run
is one `lax.scan` and a population of seeds one `vmap` over keys. Hessian-vector products are
forward-over-reverse (`jax.jvp` of `jax.grad`) and cross products ∇²_λw G v a `jax.vjp` of the
w-gradient with respect to λ: no Hessian or Jacobian is ever formed.

Every driver stores v with SOBA's sign, v ≈ −H⁻¹∇_wF, so a v carried from one driver to
another (`init(..., v=state.v)`) means the same thing.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._drivers import (
    StepSize,
    check_history,
    check_key,
    check_like,
    check_outer_optimizer,
    check_problem,
    check_sampler,
    check_step_size,
    check_steps,
    scan_run,
    step_size,
    stream_keys,
)
from ._linear_solvers import _check_count, _py
from ._problem import (
    Problem,
    canonical,
    check_hparams,
    check_loss,
    check_params0,
    tree_summary,
)
from ._sampler import Sampler

PyTree = Any


# --- state and info ----------------------------------------------------------------------


class SABAMemory(NamedTuple):
    """SABA's SAGA tables: the last direction computed on each minibatch, and their means.

    **Fields:**

    - `inner`: `(∇_w G_i, ∇²_ww G_i v, ∇²_λw G_i v)`, each leaf with a leading axis of size
      `inner.num_batches` (entry i: the values the last time minibatch i was drawn).
    - `outer`: `(∇_w F_j, ∇_λ F_j)`, leading axis `outer.num_batches`.
    - `inner_mean`, `outer_mean`: the means of the tables over their leading axis (kept up
      to date at every step rather than recomputed).
    - `inner_pending`, `inner_pending_index`, `outer_pending`, `outer_pending_index`: the
      rows the last step computed and the minibatch indices they belong to. A step writes
      them into the tables at its start, before it reads its own rows, so `inner` and
      `outer` lag one step behind; `flushed()` returns the up-to-date tables. (Reading a
      row and then writing the same table within one step makes XLA copy the whole table
      every step; written one step late, the update is in place.)
    """

    inner: tuple
    outer: tuple
    inner_mean: tuple
    outer_mean: tuple
    inner_pending: tuple
    inner_pending_index: jax.Array
    outer_pending: tuple
    outer_pending_index: jax.Array

    def flushed(self) -> "SABAMemory":
        """The memory with the pending rows written into the tables (the up-to-date tables).

        **Returns:**

        A `SABAMemory` whose `inner` and `outer` hold every minibatch's latest rows; the
        pending rows are kept (writing them again changes nothing).

        **Example:**

        ```python
        import jax, jax.numpy as jnp, optax
        import bilevel as bl

        X = jnp.linspace(-1.0, 1.0, 24).reshape(12, 2)
        y = X @ jnp.array([1.0, -2.0])
        inner = lambda w, lam, b: jnp.mean((b[0] @ w - b[1]) ** 2) + jnp.exp(lam) * w @ w
        outer = lambda w, lam, b: jnp.mean((b[0] @ w - b[1]) ** 2)
        train, val = bl.sampler((X, y), 4), bl.sampler((X, y), 6)
        driver = bl.saba(bl.Problem(inner, outer), 0.1, optax.sgd(0.01))
        state = driver.init(jax.random.key(0), jnp.array(0.0), jnp.zeros(2), inner=train, outer=val)
        state, _ = driver.run(state, train, val, 5)
        tables = state.memory.flushed().inner[0]        # ∇_w G_i for each of the 3 minibatches
        assert jnp.allclose(tables.mean(0), state.memory.inner_mean[0])
        ```
        """
        return self._replace(inner=_write_rows(self.inner, self.inner_pending, self.inner_pending_index),
                             outer=_write_rows(self.outer, self.outer_pending, self.outer_pending_index))


def _write_rows(table, rows, index):
    return jax.tree_util.tree_map(
        lambda x, a: jax.lax.dynamic_update_index_in_dim(x, a, index, 0), table, rows)


class StochasticState(NamedTuple):
    """The state of `soba`, `saba`, `stocbio` and `amigo` (a pytree: scan it, vmap it, checkpoint it).

    (The first-order drivers `f2sa` and `bome` have states of their own.)

    **Fields:**

    - `params`: the inner parameters w.
    - `v`: the linear-system variable, v ≈ −H⁻¹∇_w F (same tree as `params`).
    - `hparams`: the hyperparameters λ.
    - `outer_state`: the outer optimizer's state.
    - `key`: the PRNG key the minibatch streams are folded from (fixed for the run).
    - `step`: the number of steps taken, an int32 scalar.
    - `memory`: `SABAMemory` for `saba`, `None` for the other drivers.
    """

    params: PyTree
    v: PyTree
    hparams: PyTree
    outer_state: PyTree
    key: jax.Array
    step: jax.Array
    memory: SABAMemory | None = None


class StochasticInfo(NamedTuple):
    """What one `step` of `soba`, `saba`, `stocbio` or `amigo` reports (stacked over steps by `run`).

    **Fields:**

    - `value`: the outer loss on the outer minibatch at the point the hypergradient is
      estimated at (before λ moves).
    - `hypergrad`: the hypergradient estimate D_λ the outer optimizer was given (tree of hparams).
    - `hparams`: the hyperparameters after the step.
    - `inner_index`: the inner minibatch index drawn (int32), or for drivers that draw
      several per step (`stocbio`, `amigo`) an int32 array of them in the order drawn.
    - `outer_index`: the outer minibatch index drawn (int32).
    - `oracle_calls`: the minibatch oracle evaluations of the step (int32): each gradient
      of G, gradient of F (with respect to w and λ together, one reverse pass),
      Hessian-vector product and cross product counts 1.
    """

    value: jax.Array
    hypergrad: PyTree
    hparams: PyTree
    inner_index: jax.Array
    outer_index: jax.Array
    oracle_calls: jax.Array


# --- oracles on one minibatch --------------------------------------------------------------


def _inner_grad(problem: Problem, w, lam, batch):
    """∇_w G(w, λ; batch)."""
    return jax.grad(problem.inner)(w, lam, batch)


def _hvp(problem: Problem, w, lam, v, batch):
    """`(∇_w G, ∇²_ww G v)`: forward-over-reverse, one jvp of the w-gradient."""
    return jax.jvp(lambda x: _inner_grad(problem, x, lam, batch), (w,), (v,))


def _cross(problem: Problem, w, lam, v, batch):
    """∇²_λw G v: the vjp of the w-gradient with respect to λ, with cotangent v."""
    _, pullback = jax.vjp(lambda h: _inner_grad(problem, w, h, batch), lam)
    return pullback(v)[0]


def _inner_oracles(problem: Problem, w, lam, v, batch) -> tuple:
    """`(∇_w G, ∇²_ww G v, ∇²_λw G v)` on one minibatch."""
    g, hv = _hvp(problem, w, lam, v, batch)
    return g, hv, _cross(problem, w, lam, v, batch)


def _outer_grads(problem: Problem, w, lam, batch):
    """`(F, (∇_w F, ∇_λ F))` on one minibatch, one reverse pass."""
    return jax.value_and_grad(problem.outer, argnums=(0, 1))(w, lam, batch)


# --- small tree helpers --------------------------------------------------------------------


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _sgd(x, lr, direction):
    """x − lr·direction, leaf by leaf, keeping x's dtype."""
    return jax.tree_util.tree_map(lambda p, d: p - (lr * d).astype(p.dtype), x, direction)


def _scale(a, tree):
    return jax.tree_util.tree_map(lambda x: (a * x).astype(x.dtype), tree)


def _count(n: int) -> jax.Array:
    return jnp.asarray(n, jnp.int32)


# --- argument checks -----------------------------------------------------------------------


def _check_params(params, where: str) -> None:
    check_params0(params, where, allow_complex=False)
    for leaf in jax.tree_util.tree_leaves(params):
        if not hasattr(leaf, "dtype"):
            raise TypeError(
                f"{where} requires `params` to be a pytree of floating-point arrays (w and v "
                f"are updated leaf by leaf); got a leaf {type(leaf).__name__} {leaf!r} in "
                f"{tree_summary(params)}. For an equinox model, split it with "
                "eqx.partition(model, eqx.is_inexact_array) and close over the static part in the losses."
            )


def _spec(sampler: Sampler):
    """The shapes and dtypes of one minibatch (to check a loss at trace time without ops)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), sampler.batches)


def _count_setting(value, name: str, where: str, minimum: int) -> int:
    return _check_count(_py(value), name, where, minimum)


# --- the drivers ---------------------------------------------------------------------------


class _StochasticDriver(eqx.Module):
    """What the four drivers share: `init`'s checks, the outer update and `run`. Not public."""

    @abc.abstractmethod
    def init(self, key, hparams, params, v=None) -> StochasticState:
        """The state at step 0."""

    @abc.abstractmethod
    def step(self, state: StochasticState, inner: Sampler, outer: Sampler):
        """One step: `(state, info)`."""

    def _outer(self) -> optax.GradientTransformation:
        opt = self.outer_optimizer
        return opt if isinstance(opt, optax.GradientTransformation) else optax.sgd(opt)

    def _name(self) -> str:
        return type(self).__name__

    def _init(self, key, hparams, params, v) -> StochasticState:
        where = f"{self._name()}.init(key, hparams, params, v=None)"
        key = check_key(key, where)
        check_hparams(hparams, where)
        _check_params(params, where)
        hparams, params = canonical((hparams, params))
        if v is None:
            v = jax.tree_util.tree_map(jnp.zeros_like, params)
        else:
            check_like(v, params, "v", where)
            v = canonical(v)
        return StochasticState(params, v, hparams, self._outer().init(hparams), key,
                               jnp.zeros((), jnp.int32), None)

    def _check_step(self, state, inner, outer) -> None:
        where = f"{self._name()}.step(state, inner, outer)"
        if not isinstance(state, StochasticState):
            raise TypeError(
                f"{where} requires the StochasticState returned by {self._name()}.init or "
                f"{self._name()}.step; got {type(state).__name__}."
            )
        check_sampler(inner, "inner", where)
        check_sampler(outer, "outer", where)
        check_loss(self.problem.inner, "inner", state.params, state.hparams, _spec(inner))
        check_loss(self.problem.outer, "outer", state.params, state.hparams, _spec(outer))

    def _update_hparams(self, state: StochasticState, direction):
        updates, outer_state = self._outer().update(direction, state.outer_state, state.hparams)
        return optax.apply_updates(state.hparams, updates), outer_state

    def run(self, state: StochasticState, inner: Sampler, outer: Sampler, steps: int, *,
            history: bool = True):
        """`steps` calls of `step` in one compiled `lax.scan`.

        Compiled on first use and reused for the same driver, shapes and `steps` (new
        hyperparameter values, keys or data do not recompile); it can also be called inside
        your own `jax.jit` or `jax.vmap` (e.g. over keys, for a population of seeds).

        **Arguments:**

        - `state`: a `StochasticState` from `init` or a previous `step`/`run`.
        - `inner`, `outer`: the `bilevel.Sampler`s of the training and validation rows.
        - `steps`: the number of steps, a Python int >= 1.
        - `history`: `True` (default) stacks every field of every step's info; `False` sets
          the tree-valued fields `hypergrad` and `hparams` to `None` and keeps the scalars.
          The stacked trees hold `2 × steps × |hparams|` numbers: with a million float32
          hyperparameters, 3,000 steps would take 24 GB.

        **Returns:**

        `(state, infos)`: the final state and the `StochasticInfo`s stacked along a leading axis.
        """
        where = f"{self._name()}.run(state, inner, outer, steps, *, history=True)"
        check_steps(steps, where)
        check_sampler(inner, "inner", where)
        check_sampler(outer, "outer", where)
        return scan_run(self, state, inner, outer, steps, check_history(history, where))


def _check_common(driver, where: str) -> None:
    check_problem(driver.problem, where)
    check_step_size(driver.inner_lr, "inner_lr", where)
    check_outer_optimizer(driver.outer_optimizer, where)


def _draw_one(state: StochasticState, inner: Sampler, outer: Sampler):
    """The single-loop drivers' draws: minibatch `index(stream key, t)` of each sampler."""
    k_in, k_out = stream_keys(state.key, 2)
    return inner.draw(k_in, state.step), outer.draw(k_out, state.step)


def _single_loop_update(driver, state: StochasticState, d_w, d_v, d_lam, memory):
    """SOBA's joint update: all three directions were evaluated at (w_t, v_t, λ_t)."""
    t = state.step
    params = _sgd(state.params, step_size(driver.inner_lr, t), d_w)
    v = _sgd(state.v, step_size(driver.linear_lr, t), d_v)
    hparams, outer_state = driver._update_hparams(state, d_lam)
    return StochasticState(params, v, hparams, outer_state, state.key, t + 1, memory)


class SOBA(_StochasticDriver):
    """SOBA as an `init`/`step`/`run` driver. See `bilevel.soba`."""

    problem: Problem = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    outer_optimizer: Any = eqx.field(static=True)
    linear_lr: StepSize = eqx.field(static=True)

    def __check_init__(self):
        where = "soba(problem, inner_lr, outer_optimizer, *, linear_lr=None)"
        _check_common(self, where)
        check_step_size(self.linear_lr, "linear_lr", where)

    def init(self, key, hparams, params, v=None) -> StochasticState:
        """The state at step 0.

        **Arguments:**

        - `key`: a PRNG key (e.g. `jax.random.key(0)`): the seed of the minibatch draws.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters w_0 (pytree of floating-point arrays).
        - `v`: the initial linear-system variable (tree of `params`), e.g. the `v` of an
          earlier run of the same problem; `None` starts from zero.

        **Returns:**

        A `StochasticState`.
        """
        return self._init(key, hparams, params, v)

    def step(self, state: StochasticState, inner: Sampler, outer: Sampler):
        """One SOBA step: draw one inner and one outer minibatch, move w, v and λ together.

        **Arguments:**

        - `state`: a `StochasticState`.
        - `inner`, `outer`: the `bilevel.Sampler`s of the training and validation rows.

        **Returns:**

        `(state, info)`: the next `StochasticState` and a `StochasticInfo`.
        """
        self._check_step(state, inner, outer)
        (i, bi), (j, bj) = _draw_one(state, inner, outer)
        w, v, lam = state.params, state.v, state.hparams
        g, hv, cross = _inner_oracles(self.problem, w, lam, v, bi)
        value, (fw, fl) = _outer_grads(self.problem, w, lam, bj)
        d_lam = _add(cross, fl)
        new = _single_loop_update(self, state, g, _add(hv, fw), d_lam, None)
        return new, StochasticInfo(value, d_lam, new.hparams, i, j, _count(4))


def _saga(table, mean, new, index, n: int):
    """SAGA: estimate new − table[i] + mean, and the mean once table[i] ← new.

    The write itself is left to the caller (`SABAMemory`'s pending rows, written at the start
    of the next step): a read and a write of one table in the same step make XLA copy it."""
    old = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                                 table)
    estimate = jax.tree_util.tree_map(lambda a, b, m: a - b + m, new, old, mean)
    mean = jax.tree_util.tree_map(lambda m, a, b: m + (a - b) / n, mean, new, old)
    return estimate, mean


@eqx.filter_jit
def _fill_memory(problem: Problem, w, lam, v, inner: Sampler, outer: Sampler) -> SABAMemory:
    """The full pass at the initial point: every minibatch's directions (vmapped)."""
    check_loss(problem.inner, "inner", w, lam, _spec(inner))      # at trace time only
    check_loss(problem.outer, "outer", w, lam, _spec(outer))
    inner_tab = jax.vmap(lambda b: _inner_oracles(problem, w, lam, v, b))(inner.batches)
    outer_tab = jax.vmap(lambda b: _outer_grads(problem, w, lam, b)[1])(outer.batches)
    mean = lambda tab: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), tab)
    first = lambda tab: jax.tree_util.tree_map(lambda x: x[0], tab)      # a no-op pending write
    zero = jnp.zeros((), jnp.int32)
    return SABAMemory(inner_tab, outer_tab, mean(inner_tab), mean(outer_tab),
                      first(inner_tab), zero, first(outer_tab), zero)


def _table_rows(tables) -> int:
    return jax.tree_util.tree_leaves(tables)[0].shape[0]


class SABA(_StochasticDriver):
    """SABA as an `init`/`step`/`run` driver. See `bilevel.saba`."""

    problem: Problem = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    outer_optimizer: Any = eqx.field(static=True)
    linear_lr: StepSize = eqx.field(static=True)

    def __check_init__(self):
        where = "saba(problem, inner_lr, outer_optimizer, *, linear_lr=None)"
        _check_common(self, where)
        check_step_size(self.linear_lr, "linear_lr", where)

    def init(self, key, hparams, params, v=None, *, inner: Sampler = None,
             outer: Sampler = None) -> StochasticState:
        """The state at step 0, with the SAGA tables filled by a full pass at (w_0, v_0, λ_0).

        The full pass evaluates every inner minibatch's gradient, Hessian-vector product and
        cross product and every outer minibatch's gradient once (vmapped over the minibatches).

        **Arguments:**

        - `key`: a PRNG key (e.g. `jax.random.key(0)`): the seed of the minibatch draws.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters w_0 (pytree of floating-point arrays).
        - `v`: the initial linear-system variable (tree of `params`); `None` starts from zero.
        - `inner`, `outer`: the `bilevel.Sampler`s the run will draw from (required: the
          tables hold one entry per minibatch).

        **Returns:**

        A `StochasticState` whose `memory` is a `SABAMemory`.
        """
        where = "SABA.init(key, hparams, params, v=None, *, inner, outer)"
        if inner is None or outer is None:
            raise TypeError(
                f"{where} requires the samplers as keywords, to fill its memory tables (one "
                "entry per minibatch) at the initial point: write "
                "driver.init(key, hparams, params, inner=inner_sampler, outer=outer_sampler)."
            )
        check_sampler(inner, "inner", where)
        check_sampler(outer, "outer", where)
        state = self._init(key, hparams, params, v)
        memory = _fill_memory(self.problem, state.params, state.hparams, state.v, inner, outer)
        return state._replace(memory=memory)

    def step(self, state: StochasticState, inner: Sampler, outer: Sampler):
        """One SABA step: SOBA's directions on one inner and one outer minibatch, variance-reduced.

        **Arguments:**

        - `state`: a `StochasticState` from `SABA.init` (with its memory tables).
        - `inner`, `outer`: the samplers the tables were filled from.

        **Returns:**

        `(state, info)`: the next `StochasticState` and a `StochasticInfo`.
        """
        self._check_step(state, inner, outer)
        memory = state.memory
        if not isinstance(memory, SABAMemory):
            raise TypeError(
                "SABA.step(state, inner, outer) requires a state from SABA.init (it carries the "
                f"SAGA tables); got memory={type(memory).__name__}. Build the state with "
                "saba(...).init(key, hparams, params, inner=..., outer=...)."
            )
        for name, sampler, tables in (("inner", inner, memory.inner), ("outer", outer, memory.outer)):
            if _table_rows(tables) != sampler.num_batches:
                raise ValueError(
                    f"SABA.step(state, inner, outer): the memory holds {_table_rows(tables)} "
                    f"{name} minibatches but the {name} sampler has {sampler.num_batches}. "
                    "Step with the samplers the state was initialised with."
                )
        (i, bi), (j, bj) = _draw_one(state, inner, outer)
        w, v, lam = state.params, state.v, state.hparams
        new_inner = _inner_oracles(self.problem, w, lam, v, bi)
        value, new_outer = _outer_grads(self.problem, w, lam, bj)
        memory = memory.flushed()                   # last step's rows, written before this step reads
        (g, hv, cross), inner_mean = _saga(memory.inner, memory.inner_mean, new_inner, i,
                                           inner.num_batches)
        (fw, fl), outer_mean = _saga(memory.outer, memory.outer_mean, new_outer, j, outer.num_batches)
        d_lam = _add(cross, fl)
        memory = SABAMemory(memory.inner, memory.outer, inner_mean, outer_mean,
                            new_inner, jnp.asarray(i, jnp.int32), new_outer, jnp.asarray(j, jnp.int32))
        new = _single_loop_update(self, state, g, _add(hv, fw), d_lam, memory)
        return new, StochasticInfo(value, d_lam, new.hparams, i, j, _count(4))


def _inner_sgd(problem: Problem, w, lam, lr, inner: Sampler, key, counts):
    """SGD steps on w, one fresh inner minibatch per step (draw counts `counts`)."""
    def body(w, c):
        i, batch = inner.draw(key, c)
        return _sgd(w, lr, _inner_grad(problem, w, lam, batch)), i

    return jax.lax.scan(body, w, counts)


def _counts(start, n: int) -> jax.Array:
    return start + jnp.arange(n, dtype=jnp.int32)


class StocBiO(_StochasticDriver):
    """StocBiO as an `init`/`step`/`run` driver. See `bilevel.stocbio`."""

    problem: Problem = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    outer_optimizer: Any = eqx.field(static=True)
    inner_steps: int = eqx.field(static=True)
    neumann_terms: int = eqx.field(static=True)
    neumann_lr: StepSize = eqx.field(static=True)

    def __check_init__(self):
        where = "stocbio(problem, inner_lr, outer_optimizer, *, inner_steps, neumann_terms, neumann_lr)"
        _check_common(self, where)
        _check_count(self.inner_steps, "inner_steps", where, 1)
        _check_count(self.neumann_terms, "neumann_terms", where, 0)
        check_step_size(self.neumann_lr, "neumann_lr", where)

    def init(self, key, hparams, params, v=None) -> StochasticState:
        """The state at step 0.

        **Arguments:**

        - `key`: a PRNG key (e.g. `jax.random.key(0)`): the seed of the minibatch draws.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters w_0 (pytree of floating-point arrays).
        - `v`: accepted for a common interface (tree of `params`, or `None`); StocBiO
          recomputes v from scratch at every step, so it is only reported back until then.

        **Returns:**

        A `StochasticState`.
        """
        return self._init(key, hparams, params, v)

    def step(self, state: StochasticState, inner: Sampler, outer: Sampler):
        """One StocBiO outer step: `inner_steps` SGD steps on w, the Neumann v, then λ.

        The inner stream draws `inner_steps + neumann_terms + 1` minibatches per step, in
        this order: the SGD steps, the Neumann terms, the cross product; the outer stream
        draws one (used for both ∇_wF and ∇_λF).

        **Arguments:**

        - `state`: a `StochasticState`.
        - `inner`, `outer`: the `bilevel.Sampler`s of the training and validation rows.

        **Returns:**

        `(state, info)`: the next `StochasticState` and a `StochasticInfo`.
        """
        self._check_step(state, inner, outer)
        T, Q, t, lam = self.inner_steps, self.neumann_terms, state.step, state.hparams
        k_in, k_out = stream_keys(state.key, 2)
        start = (T + Q + 1) * t
        w, idx_w = _inner_sgd(self.problem, state.params, lam, step_size(self.inner_lr, t),
                              inner, k_in, _counts(start, T))
        j, bj = outer.draw(k_out, t)
        value, (fw, fl) = _outer_grads(self.problem, w, lam, bj)
        eta = step_size(self.neumann_lr, t)

        def term(carry, c):          # r ← (I − η H_B) r with a fresh minibatch B; s ← s + r
            r, s = carry
            i, batch = inner.draw(k_in, c)
            r = _sgd(r, eta, _hvp(self.problem, w, lam, r, batch)[1])
            return (r, _add(s, r)), i

        (_, total), idx_v = jax.lax.scan(term, (fw, fw), _counts(start + T, Q))
        v = _scale(-eta, total)      # −η Σ_{q=0}^{Q} ∏ (I − η H_B) ∇_wF ≈ −H⁻¹∇_wF
        i_c, bc = inner.draw(k_in, start + T + Q)
        d_lam = _add(fl, _cross(self.problem, w, lam, v, bc))
        hparams, outer_state = self._update_hparams(state, d_lam)
        new = StochasticState(w, v, hparams, outer_state, state.key, t + 1, None)
        index = jnp.concatenate([idx_w, idx_v, i_c[None]])
        return new, StochasticInfo(value, d_lam, hparams, index, j, _count(T + Q + 2))


class AmIGO(_StochasticDriver):
    """AmIGO as an `init`/`step`/`run` driver. See `bilevel.amigo`."""

    problem: Problem = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    outer_optimizer: Any = eqx.field(static=True)
    inner_steps: int = eqx.field(static=True)
    linear_steps: int = eqx.field(static=True)
    linear_lr: StepSize = eqx.field(static=True)

    def __check_init__(self):
        where = "amigo(problem, inner_lr, outer_optimizer, *, inner_steps, linear_steps, linear_lr)"
        _check_common(self, where)
        _check_count(self.inner_steps, "inner_steps", where, 1)
        _check_count(self.linear_steps, "linear_steps", where, 1)
        check_step_size(self.linear_lr, "linear_lr", where)

    def init(self, key, hparams, params, v=None) -> StochasticState:
        """The state at step 0.

        **Arguments:**

        - `key`: a PRNG key (e.g. `jax.random.key(0)`): the seed of the minibatch draws.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters w_0 (pytree of floating-point arrays).
        - `v`: the initial linear-system variable (tree of `params`), warm-started from
          there; `None` starts from zero.

        **Returns:**

        A `StochasticState`.
        """
        return self._init(key, hparams, params, v)

    def step(self, state: StochasticState, inner: Sampler, outer: Sampler):
        """One AmIGO outer step: `inner_steps` SGD steps on w, `linear_steps` on v, then λ.

        The inner stream draws `inner_steps + linear_steps + 1` minibatches per step, in
        this order: the w steps, the v steps, the cross product; the outer stream draws one
        (∇_wF and ∇_λF at the new w).

        **Arguments:**

        - `state`: a `StochasticState`.
        - `inner`, `outer`: the `bilevel.Sampler`s of the training and validation rows.

        **Returns:**

        `(state, info)`: the next `StochasticState` and a `StochasticInfo`.
        """
        self._check_step(state, inner, outer)
        T, M, t, lam = self.inner_steps, self.linear_steps, state.step, state.hparams
        k_in, k_out = stream_keys(state.key, 2)
        start = (T + M + 1) * t
        w, idx_w = _inner_sgd(self.problem, state.params, lam, step_size(self.inner_lr, t),
                              inner, k_in, _counts(start, T))
        j, bj = outer.draw(k_out, t)
        value, (fw, fl) = _outer_grads(self.problem, w, lam, bj)
        beta = step_size(self.linear_lr, t)

        def linear(v, c):            # SGD on ½vᵀH_B v + vᵀ∇_wF: v ← v − β(H_B v + ∇_wF)
            i, batch = inner.draw(k_in, c)
            return _sgd(v, beta, _add(_hvp(self.problem, w, lam, v, batch)[1], fw)), i

        v, idx_v = jax.lax.scan(linear, state.v, _counts(start + T, M))
        i_c, bc = inner.draw(k_in, start + T + M)
        d_lam = _add(fl, _cross(self.problem, w, lam, v, bc))
        hparams, outer_state = self._update_hparams(state, d_lam)
        new = StochasticState(w, v, hparams, outer_state, state.key, t + 1, None)
        index = jnp.concatenate([idx_w, idx_v, i_c[None]])
        return new, StochasticInfo(value, d_lam, hparams, index, j, _count(T + M + 2))


# --- builders ------------------------------------------------------------------------------


def _outer_setting(value, where: str):
    """A validated outer optimizer; a number is kept as a float (built as optax.sgd in `step`)."""
    if isinstance(value, optax.GradientTransformation):
        return value
    return check_step_size(value, "outer_optimizer", where)


def soba(problem: Problem, inner_lr: StepSize, outer_optimizer, *, linear_lr: StepSize | None = None) -> SOBA:
    """SOBA (Dagréou, Ablin, Vaiter & Moreau 2022): w, v and λ each take one stochastic step per step.

    At step t, with one inner minibatch i and one outer minibatch j, all three directions are
    evaluated at the same (w_t, v_t, λ_t):

    - D_w = ∇_w G_i(w, λ)
    - D_v = ∇²_ww G_i(w, λ) v + ∇_w F_j(w, λ)
    - D_λ = ∇²_λw G_i(w, λ) v + ∇_λ F_j(w, λ)

    and then w ← w − ρ_t D_w, v ← v − ρ'_t D_v, and λ moves by the outer optimizer on D_λ
    (a number γ means `optax.sgd(γ)`: λ ← λ − γ D_λ, the paper's update). v tracks
    −H⁻¹∇_wF, the solution of the linear system of the implicit function theorem. Each step
    costs 4 oracle calls (gradient, Hessian-vector product and cross product of G on
    minibatch i, gradient of F on minibatch j).

    Compared with benchopt's benchmark_bilevel (solvers/soba.py): the step sizes may be any
    schedule `step -> size` (there: constant or polynomially decaying); v's step size ρ' may
    differ from w's (there and in the paper ρ' = ρ, our default); the iterates are not
    projected on a ball after each step (there: the oracle's `prox`).

    **Arguments:**

    - `problem`: a `bilevel.Problem`; both losses are means over the rows of their batch.
    - `inner_lr`: ρ, w's step size: a positive number or a schedule `step -> size`.
    - `outer_optimizer`: an optax optimizer for λ, or a positive number γ for `optax.sgd(γ)`.
    - `linear_lr`: ρ', v's step size (number or schedule); `None` uses `inner_lr`.

    **Returns:**

    A `SOBA` driver with `init(key, hparams, params, v=None)`, `step(state, inner, outer)`
    and `run(state, inner, outer, steps)`; `inner` and `outer` are `bilevel.Sampler`s.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.array([1.0, -1.0, 0.5])
    problem = bl.Problem(
        inner=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2))
    train, val = bl.sampler((X[:20], y[:20]), 5), bl.sampler((X[20:], y[20:]), 5)
    driver = bl.soba(problem, inner_lr=0.1, outer_optimizer=0.05)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), jnp.zeros(3))
    state, infos = driver.run(state, train, val, 200)
    print(state.hparams, infos.value[-1])
    ```
    """
    where = "soba(problem, inner_lr, outer_optimizer, *, linear_lr=None)"
    check_problem(problem, where)
    inner_lr = check_step_size(inner_lr, "inner_lr", where)
    linear_lr = inner_lr if linear_lr is None else check_step_size(linear_lr, "linear_lr", where)
    return SOBA(problem, inner_lr, _outer_setting(outer_optimizer, where), linear_lr)


def saba(problem: Problem, inner_lr: StepSize, outer_optimizer, *, linear_lr: StepSize | None = None) -> SABA:
    """SABA (Dagréou, Ablin, Vaiter & Moreau 2022): SOBA with SAGA variance reduction of every direction.

    SOBA's five minibatch quantities — ∇_w G_i, ∇²_ww G_i v, ∇²_λw G_i v on the inner
    minibatch i and ∇_w F_j, ∇_λ F_j on the outer minibatch j — are each replaced by the
    SAGA estimate `new_i − memory_i + mean(memory)`, after which `memory_i ← new_i`. The
    tables hold one entry per minibatch of the inner and outer samplers, filled by a full
    pass at the initial point in `init` (which therefore takes the samplers). D_w, D_v, D_λ
    and the updates are then SOBA's. With constant step sizes SABA converges to a stationary
    point of the full-data problem (not just to a noise ball), at the cost of memory:
    `inner.num_batches × (2·|params| + |hparams|) + outer.num_batches × (|params| + |hparams|)`
    numbers in the state (`state.memory`, a `SABAMemory`). Each step costs 4 oracle calls;
    `init` costs one pass over all minibatches.

    Compared with benchopt's benchmark_bilevel (solvers/saba.py): the tables are filled at the
    initial point (there, by default `init_memory="zero"`: empty tables and zero means; its
    `"full"` option is the pass done here); step sizes may be schedules and ρ' may differ
    from ρ (there: one constant step size for w and v).

    **Arguments:**

    - `problem`: a `bilevel.Problem`; both losses are means over the rows of their batch.
    - `inner_lr`: ρ, w's step size: a positive number or a schedule `step -> size`.
    - `outer_optimizer`: an optax optimizer for λ, or a positive number γ for `optax.sgd(γ)`.
    - `linear_lr`: ρ', v's step size (number or schedule); `None` uses `inner_lr`.

    **Returns:**

    A `SABA` driver with `init(key, hparams, params, v=None, *, inner, outer)`,
    `step(state, inner, outer)` and `run(state, inner, outer, steps)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.array([1.0, -1.0, 0.5])
    problem = bl.Problem(
        inner=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2))
    train, val = bl.sampler((X[:20], y[:20]), 5), bl.sampler((X[20:], y[20:]), 5)
    driver = bl.saba(problem, inner_lr=0.1, outer_optimizer=0.05)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), jnp.zeros(3), inner=train, outer=val)
    state, infos = driver.run(state, train, val, 200)
    print(state.hparams, state.memory.inner[0].shape)   # one gradient per inner minibatch: (4, 3)
    ```
    """
    where = "saba(problem, inner_lr, outer_optimizer, *, linear_lr=None)"
    check_problem(problem, where)
    inner_lr = check_step_size(inner_lr, "inner_lr", where)
    linear_lr = inner_lr if linear_lr is None else check_step_size(linear_lr, "linear_lr", where)
    return SABA(problem, inner_lr, _outer_setting(outer_optimizer, where), linear_lr)


def stocbio(problem: Problem, inner_lr: StepSize, outer_optimizer, *, inner_steps: int,
            neumann_terms: int, neumann_lr: StepSize) -> StocBiO:
    """StocBiO (Ji, Yang & Liang 2021, Algorithm 2): warm-started SGD on w, a stochastic Neumann series for v.

    Each outer step t:

    1. `inner_steps` (D) SGD steps on w from the previous w, each on a fresh inner minibatch:
       w ← w − α ∇_w G_B(w, λ).
    2. One outer minibatch j: ∇_wF_j and ∇_λF_j at the new w.
    3. The Neumann series of the paper's eq. (9) with Q = `neumann_terms` fresh inner
       minibatches B_1..B_Q: r_0 = ∇_wF_j, r_q = (I − η ∇²_ww G_{B_q}) r_{q−1}, and
       v = −η Σ_{q=0}^{Q} r_q ≈ −H⁻¹∇_wF (the paper's v_Q with SOBA's sign; the paper
       names the q-th batch used B_{Q+1−q}, the same independent draws). Q Hessian-vector
       products; Q = 0 gives v = −η∇_wF.
    4. One more fresh inner minibatch for the cross product:
       D_λ = ∇_λF_j + ∇²_λw G(w, λ) v (the paper's ∇_xF − ∇_x∇_yG v_Q), and λ moves by the
       outer optimizer on D_λ.

    So the inner stream draws D + Q + 1 minibatches per step and each step costs D + Q + 2
    oracle calls. v is recomputed from ∇_wF at every step (not warm-started); `state.v`
    reports the last one.

    Compared with benchopt's benchmark_bilevel (solvers/stocbio.py): there λ is updated
    first and the D SGD steps follow (with D extra steps before the first outer step); here
    the steps follow the paper's order, w first. There α, η and the outer step size are
    tied (η = α); here they are separate and may be schedules (evaluated at the outer step t).

    **Arguments:**

    - `problem`: a `bilevel.Problem`; both losses are means over the rows of their batch.
    - `inner_lr`: α, the inner SGD step size: a positive number or a schedule `step -> size`.
    - `outer_optimizer`: an optax optimizer for λ, or a positive number γ for `optax.sgd(γ)`.
    - `inner_steps`: D >= 1, SGD steps on w per outer step.
    - `neumann_terms`: Q >= 0, the Hessian-vector products (fresh minibatches) of the series.
    - `neumann_lr`: η, the series' step; it converges for η < 1/L (L: the largest Hessian
      eigenvalue of a minibatch).

    **Returns:**

    A `StocBiO` driver with `init(key, hparams, params, v=None)`, `step(state, inner, outer)`
    and `run(state, inner, outer, steps)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.array([1.0, -1.0, 0.5])
    problem = bl.Problem(
        inner=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2))
    train, val = bl.sampler((X[:20], y[:20]), 5), bl.sampler((X[20:], y[20:]), 5)
    driver = bl.stocbio(problem, 0.1, 0.05, inner_steps=5, neumann_terms=10, neumann_lr=0.1)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), jnp.zeros(3))
    state, infos = driver.run(state, train, val, 50)
    print(state.hparams, infos.inner_index.shape, infos.oracle_calls[0])   # (50, 16) 17
    ```
    """
    where = "stocbio(problem, inner_lr, outer_optimizer, *, inner_steps, neumann_terms, neumann_lr)"
    check_problem(problem, where)
    return StocBiO(problem, check_step_size(inner_lr, "inner_lr", where), _outer_setting(outer_optimizer, where),
                   _count_setting(inner_steps, "inner_steps", where, 1),
                   _count_setting(neumann_terms, "neumann_terms", where, 0),
                   check_step_size(neumann_lr, "neumann_lr", where))


def amigo(problem: Problem, inner_lr: StepSize, outer_optimizer, *, inner_steps: int,
          linear_steps: int, linear_lr: StepSize) -> AmIGO:
    """AmIGO (Arbel & Mairal 2022): warm-started SGD on w and on the linear system for v.

    Each outer step t:

    1. `inner_steps` (T) SGD steps on w from the previous w, each on a fresh inner minibatch.
    2. One outer minibatch j: ∇_wF_j and ∇_λF_j at the new w.
    3. `linear_steps` (M) SGD steps on the quadratic ½vᵀHv + vᵀ∇_wF_j from the previous v,
       each with the Hessian of a fresh inner minibatch: v ← v − β(∇²_ww G_B v + ∇_wF_j).
       Its minimiser is v = −H⁻¹∇_wF (the paper's z, SOBA's v).
    4. One more fresh inner minibatch for the cross product: D_λ = ∇_λF_j + ∇²_λw G v, and
       λ moves by the outer optimizer on D_λ.

    The inner stream draws T + M + 1 minibatches per step and each step costs T + M + 2
    oracle calls. Warm-starting both w and v (amortisation) is what lets T and M stay small.

    Compared with benchopt's benchmark_bilevel (solvers/amigo.py): there λ is updated first
    and the T SGD steps on w follow (with T extra steps before the first outer step; its JAX
    version runs those steps at the λ the call started from, not the updated one); here the
    paper's order, w first, at the current λ. There the v steps reuse the inner step size and
    M = T; here `linear_lr` and `linear_steps` are separate and step sizes may be schedules
    (evaluated at the outer step t).

    **Arguments:**

    - `problem`: a `bilevel.Problem`; both losses are means over the rows of their batch.
    - `inner_lr`: the inner SGD step size: a positive number or a schedule `step -> size`.
    - `outer_optimizer`: an optax optimizer for λ, or a positive number γ for `optax.sgd(γ)`.
    - `inner_steps`: T >= 1, SGD steps on w per outer step.
    - `linear_steps`: M >= 1, SGD steps on v per outer step.
    - `linear_lr`: β, the step size of the v steps (number or schedule).

    **Returns:**

    An `AmIGO` driver with `init(key, hparams, params, v=None)`, `step(state, inner, outer)`
    and `run(state, inner, outer, steps)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.array([1.0, -1.0, 0.5])
    problem = bl.Problem(
        inner=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2))
    train, val = bl.sampler((X[:20], y[:20]), 5), bl.sampler((X[20:], y[20:]), 5)
    driver = bl.amigo(problem, 0.1, 0.05, inner_steps=5, linear_steps=5, linear_lr=0.1)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), jnp.zeros(3))
    state, infos = driver.run(state, train, val, 50)
    print(state.hparams, state.v)
    ```
    """
    where = "amigo(problem, inner_lr, outer_optimizer, *, inner_steps, linear_steps, linear_lr)"
    check_problem(problem, where)
    return AmIGO(problem, check_step_size(inner_lr, "inner_lr", where), _outer_setting(outer_optimizer, where),
                 _count_setting(inner_steps, "inner_steps", where, 1),
                 _count_setting(linear_steps, "linear_steps", where, 1),
                 check_step_size(linear_lr, "linear_lr", where))
