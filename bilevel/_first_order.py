"""First-order stochastic bilevel methods: F2SA and BOME as `init`/`step`/`run` drivers.

Both use gradients of the two losses only (no Hessian- or Jacobian-vector products), and
neither computes the exact hypergradient:

- F2SA (Kwon, Kwon, Wright & Nowak, 2023) follows the gradient of a penalised Lagrangian,
  whose bias against the hypergradient is O(1/μ) for a penalty μ that grows during the run;
- BOME (Liu, Ye, Wright, Stone & Liu, 2022) descends the outer loss under a value-function
  constraint, moving the hyperparameters and the inner parameters together.

Minibatches are drawn inside the compiled step from two `bilevel.Sampler`s, one stream of
indices for the training data and one for the validation data (`bilevel._drivers`), with a
fresh draw for every gradient evaluation, as benchmark_bilevel's solvers do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._base import tree_norm, tree_vdot
from ._drivers import (
    StepSize,
    check_history,
    check_key,
    check_outer_optimizer,
    check_problem,
    check_sampler,
    check_step_size,
    check_steps,
    scan_run,
    step_size,
    stream_keys,
)
from ._problem import Problem, canonical, check_hparams, check_loss, check_params0
from ._sampler import Sampler

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Small shared pieces.
# ----------------------------------------------------------------------------------------------


def _descend(tree, grad, lr):
    """`tree − lr·grad`, leaf by leaf, keeping each leaf's dtype (a schedule may return float64)."""
    return jax.tree_util.tree_map(lambda x, g: x - (lr * g).astype(x.dtype), tree, grad)


def _axpy(a, x, y):
    """`a·x + y` over pytrees."""
    return jax.tree_util.tree_map(lambda u, v: (a * u).astype(v.dtype) + v, x, y)


def _check_number(value, name: str, where: str, *, allow_zero: bool, meaning: str, example: str) -> float:
    """A finite Python number > 0 (or >= 0 with `allow_zero`), else a clear error."""
    concrete = not isinstance(value, jax.core.Tracer)
    if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0 and concrete:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} requires `{name}` to be a number ({meaning}); got "
                        f"{type(value).__name__} {value!r}. Pass e.g. {name}={example}.")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{where} requires `{name}` {bound} and finite ({meaning}); got "
                         f"{name}={value}. Pass e.g. {name}={example}.")
    return float(value)


def _check_inner_steps(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{where} requires `inner_steps` to be a Python int >= 1 (gradient steps on the "
            f"inner problem per outer step); got inner_steps={value!r}."
        )
    return int(value)


def _check_call(driver: str, state, state_type, inner, outer, where: str) -> None:
    if not isinstance(state, state_type):
        raise TypeError(f"{where} requires the {state_type.__name__} returned by {driver}.init or "
                        f"{driver}.step; got {type(state).__name__}.")
    check_sampler(inner, "inner", where)
    check_sampler(outer, "outer", where)


def _check_losses(problem: Problem, params, hparams, inner: Sampler, outer: Sampler) -> None:
    check_loss(problem.inner, "inner", params, hparams, inner.batch(0))
    check_loss(problem.outer, "outer", params, hparams, outer.batch(0))


def _init_checks(key, hparams, params, where: str):
    key = check_key(key, where)
    check_hparams(hparams, where)
    check_params0(params, where, allow_complex=False)
    hparams, params = canonical((hparams, params))
    return key, hparams, params


class _Draws(NamedTuple):
    """The minibatch indices of one step: draw i of a stream is its draw `per_step·k + i`.

    All indices of a step are drawn together (one vectorised draw per stream, which
    compiles much faster than one draw per gradient); `inner(i)` / `outer(i)` give the
    minibatch of draw i.
    """

    inner_sampler: Sampler
    outer_sampler: Sampler
    inner_index: jax.Array
    outer_index: jax.Array

    def inner(self, i):
        return self.inner_sampler.batch(self.inner_index[i])

    def outer(self, i):
        return self.outer_sampler.batch(self.outer_index[i])


def _draws(key, step, inner: Sampler, outer: Sampler, inner_per_step: int, outer_per_step: int) -> _Draws:
    inner_key, outer_key = stream_keys(key, 2)

    def indices(sampler, key, n):
        return jax.vmap(lambda i: sampler.index(key, n * step + i))(jnp.arange(n))

    return _Draws(inner, outer, indices(inner, inner_key, inner_per_step),
                  indices(outer, outer_key, outer_per_step))


# ----------------------------------------------------------------------------------------------
# F2SA.
# ----------------------------------------------------------------------------------------------


class F2SAState(NamedTuple):
    """The state of `bilevel.f2sa` (a pytree: scan it, vmap it, checkpoint it).

    **Fields:**

    - `y`: the inner parameters that minimise the penalised problem `F + μ G` (they
      approach w*(λ) as μ grows; use them as the trained model).
    - `z`: the inner parameters that minimise the training loss G alone.
    - `penalty`: the penalty μ_k the next step uses, a scalar.
    - `outer_state`: the outer optimizer's state.
    - `hparams`: the hyperparameters λ_k.
    - `key`: the PRNG key the minibatch streams are folded from (fixed for the run).
    - `step`: the number of steps taken, an int32 scalar.
    """

    y: PyTree
    z: PyTree
    penalty: jax.Array
    outer_state: PyTree
    hparams: PyTree
    key: jax.Array
    step: jax.Array


class F2SAInfo(NamedTuple):
    """What one step of `F2SA.step` reports (stacked over steps by `F2SA.run`).

    **Fields:**

    - `value`: the outer loss F(y_{k+1}, λ_k) on the outer minibatch of the λ-gradient.
    - `hypergrad`: the direction D_λ given to the outer optimizer (an O(1/μ)-biased
      estimate of the hypergradient, not the hypergradient).
    - `hparams`: λ_{k+1}, the hyperparameters after the step.
    - `penalty`: the penalty μ_k this step used.
    - `inner_index`: the training minibatches drawn, shape `(2·inner_steps + 2,)`: for
      each inner step the one for y then the one for z, then those of ∇_λG at y and at z
      (the same index twice with `common_batch=True`, which draws `2·inner_steps + 1`).
    - `outer_index`: the validation minibatches drawn, shape `(inner_steps + 1,)`: one per
      inner step (∇_w F at y), then the one of ∇_λF.
    - `oracle_calls`: minibatch gradient evaluations this step, `3·inner_steps + 3`.
    """

    value: jax.Array
    hypergrad: PyTree
    hparams: PyTree
    penalty: jax.Array
    inner_index: jax.Array
    outer_index: jax.Array
    oracle_calls: jax.Array


class F2SA(eqx.Module):
    """F2SA, the fully first-order stochastic approximation method, as an `init`/`step`/`run` driver. See `bilevel.f2sa`.

    **Example:**

    ```python
    import bilevel as bl, bilevel.testing as blt

    exact = blt.Ridge.sample(0, dim=4)
    driver = bl.f2sa(exact.problem, 0.1, 0.05, penalty0=1.0, penalty_growth=0.0)
    assert isinstance(driver, bl.F2SA)
    ```
    """

    problem: Problem = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    penalized_lr: StepSize = eqx.field(static=True)
    outer_optimizer: optax.GradientTransformation = eqx.field(static=True)
    penalty0: float = eqx.field(static=True)
    penalty_growth: float | Callable = eqx.field(static=True)
    inner_steps: int = eqx.field(static=True)
    common_batch: bool = eqx.field(static=True)

    def init(self, key, hparams, params) -> F2SAState:
        """The state at step 0: y = z = params, μ = penalty0, the outer optimizer at λ_0.

        **Arguments:**

        - `key`: a PRNG key, e.g. `jax.random.key(0)`; the run's minibatches are drawn from it.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters, the start of both y and z.

        **Returns:**

        An `F2SAState`.
        """
        key, hparams, params = _init_checks(key, hparams, params, "F2SA.init(key, hparams, params)")
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(hparams))
        return F2SAState(params, params, jnp.asarray(self.penalty0, dtype),
                         self.outer_optimizer.init(hparams), hparams, key, jnp.zeros((), jnp.int32))

    def step(self, state: F2SAState, inner: Sampler, outer: Sampler) -> tuple[F2SAState, F2SAInfo]:
        """One step: `inner_steps` steps on z and y, then one on λ, then μ grows.

        **Arguments:**

        - `state`: an `F2SAState` from `init` or a previous `step`.
        - `inner`: the training data as a `bilevel.Sampler` (G = `problem.inner`).
        - `outer`: the validation data as a `bilevel.Sampler` (F = `problem.outer`).

        **Returns:**

        `(state, info)`: the next `F2SAState` and an `F2SAInfo`.
        """
        _check_call("F2SA", state, F2SAState, inner, outer, "F2SA.step(state, inner, outer)")
        _check_losses(self.problem, state.y, state.hparams, inner, outer)
        T, k, lam, mu = self.inner_steps, state.step, state.hparams, state.penalty
        draws = _draws(state.key, k, inner, outer, 2 * T + 2 - self.common_batch, T + 1)
        gamma, alpha = step_size(self.inner_lr, k), step_size(self.penalized_lr, k)
        grad_G, grad_F = jax.grad(self.problem.inner), jax.grad(self.problem.outer)

        def inner_step(carry, t):
            y, z = carry
            y_new = _descend(y, _axpy(mu, grad_G(y, lam, draws.inner(2 * t)),
                                      grad_F(y, lam, draws.outer(t))), alpha)
            z_new = _descend(z, grad_G(z, lam, draws.inner(2 * t + 1)), gamma)
            return (y_new, z_new), None

        (y, z), _ = jax.lax.scan(inner_step, (state.y, state.z), jnp.arange(T))
        value, d_f = jax.value_and_grad(self.problem.outer, argnums=1)(y, lam, draws.outer(T))
        d_gy = jax.grad(self.problem.inner, argnums=1)(y, lam, draws.inner(2 * T))
        d_gz = jax.grad(self.problem.inner, argnums=1)(
            z, lam, draws.inner(2 * T if self.common_batch else 2 * T + 1))
        direction = _axpy(mu, jax.tree_util.tree_map(jnp.subtract, d_gy, d_gz), d_f)
        updates, outer_state = self.outer_optimizer.update(direction, state.outer_state, lam)
        hparams = optax.apply_updates(lam, updates)
        growth = step_size(self.penalty_growth, k).astype(mu.dtype)
        inner_index = draws.inner_index
        if self.common_batch:                   # report the shared draw for both λ-gradients
            inner_index = jnp.concatenate([inner_index, inner_index[-1:]])
        info = F2SAInfo(value, direction, hparams, mu, inner_index, draws.outer_index,
                        jnp.asarray(3 * T + 3, jnp.int32))
        return F2SAState(y, z, mu + growth, outer_state, hparams, state.key, k + 1), info

    def run(self, state: F2SAState, inner: Sampler, outer: Sampler, steps: int, *,
            history: bool = True):
        """`steps` calls of `step` in one compiled `lax.scan`.

        Compiled on first use and reused for the same driver, shapes and `steps` (new
        hyperparameter values or keys do not recompile); it can also be called inside your
        own `jax.jit` or `jax.vmap` (e.g. over keys, for a population of seeds).

        **Arguments:**

        - `state`: an `F2SAState`.
        - `inner`, `outer`: the training and validation `bilevel.Sampler`s.
        - `steps`: the number of steps, a Python int >= 1.
        - `history`: `True` (default) stacks every field of every step's info; `False` sets
          the tree-valued fields `hypergrad` and `hparams` to `None` and keeps the scalars.
          The stacked trees hold `2 × steps × |hparams|` numbers: with a million float32
          hyperparameters, 3,000 steps would take 24 GB.

        **Returns:**

        `(state, infos)`: the final state and the `F2SAInfo`s stacked along a leading axis.
        """
        where = "F2SA.run(state, inner, outer, steps, *, history=True)"
        check_steps(steps, where)
        _check_call("F2SA", state, F2SAState, inner, outer, where)
        return scan_run(self, state, inner, outer, steps, check_history(history, where))


def f2sa(
    problem: Problem,
    inner_lr: StepSize,
    outer_optimizer: optax.GradientTransformation | StepSize,
    *,
    penalty0: float,
    penalty_growth: float | Callable,
    inner_steps: int = 1,
    penalized_lr: StepSize | None = None,
    common_batch: bool = False,
) -> F2SA:
    """F2SA (Kwon, Kwon, Wright & Nowak, 2023, *A fully first-order method for stochastic bilevel optimization*): a penalty method that uses gradients only.

    With G = `problem.inner` (training loss), F = `problem.outer` (validation loss), λ the
    hyperparameters and μ_k the penalty, step k draws fresh minibatches for every gradient
    and does

        repeat inner_steps times:
            y ← y − α_k (∇_w F(y, λ_k) + μ_k ∇_w G(y, λ_k))    (y tracks argmin_w F + μ_k G)
            z ← z − γ_k ∇_w G(z, λ_k)                          (z tracks argmin_w G)
        D_λ = ∇_λ F(y, λ_k) + μ_k (∇_λ G(y, λ_k) − ∇_λ G(z, λ_k))
        λ_{k+1} = outer_optimizer step on D_λ
        μ_{k+1} = μ_k + δ_k

    D_λ is the gradient of the penalised value function
    min_y F(y, λ) + μ (G(y, λ) − min_z G(z, λ)); with y and z at their minimisers it differs
    from the hypergradient by O(1/μ) (for a strongly convex training loss), which is why
    μ grows. **It is not the exact hypergradient**: at any finite μ the run converges to a
    biased point, and with independent minibatches the noise of D_λ grows like μ, so the
    step sizes must shrink as μ grows (see `common_batch` below).

    **Step sizes and schedules.** Every step size is a positive number or a schedule
    `k -> size` called with the step count k (0, 1, ...); the same α_k, γ_k serve all inner
    steps of step k. The y-update is a gradient step on F + μ_k G, stable only while
    α_k (L_F + μ_k L_G) < 2 (L: smoothness constants), so with a growing penalty use a
    decaying α_k or pick α for the final μ. The paper's analysis uses polynomial schedules
    α_k ∝ (k + k_0)^{-a}, γ_k ∝ (k + k_0)^{-c} and a polynomially growing μ_k;
    benchmark_bilevel's F2SA defaults (`solvers/f2sa.py`) are, in this API,

        inner_lr=lambda k: 0.01 / (k + 1) ** (4 / 7)               # γ (z)
        penalized_lr=lambda k: 0.01 / (k + 1) ** (5 / 7)           # α (y)
        outer_optimizer=optax.sgd(lambda k: 0.01 / (k + 1) ** (4 / 7))
        penalty0=1.0, penalty_growth=lambda k: 0.1 / (k + 1) ** (1 / 7), inner_steps=10

    with minibatches of 64 rows. `penalty_growth=δ` (a number) is the linear schedule
    μ_k = μ_0 + δk; `penalty_growth=0.0` keeps μ fixed (a fixed-penalty method).

    **Minibatch noise and `common_batch`.** By default (as in benchmark_bilevel) the two
    terms of μ_k (∇_λG(y) − ∇_λG(z)) get independent minibatches, so their noise is
    multiplied by μ_k: with a growing penalty the outer step size must shrink faster than
    μ_k grows, or λ performs a random walk that can blow up (the noise of a λ-dependent
    ∇_λG is multiplicative). `common_batch=True` evaluates both on one minibatch (common
    random numbers): when each row's ∇_λG is Lipschitz in w, that noise scales with
    ‖y − z‖ = O(1/μ), and μ_k times it stays bounded. We recommend it whenever the training
    loss is a mean over rows (on a small quadratic in our tests, a benchmark-like schedule
    diverged with independent minibatches and stayed stable with `common_batch=True`).

    **Where this differs from benchmark_bilevel.** The outer update is any optax optimizer
    (a number β means `optax.sgd(β)`, the paper's update); `common_batch` is an addition.
    Otherwise the step is theirs, draw for draw: one stream of training minibatches and
    one of validation minibatches (fixed blocks of rows visited in a random order each
    epoch, by `bilevel.Sampler`), drawn in the order listed in `F2SAInfo`; the schedules'
    step count k starts at 0, so theirs, `c / (i + 1)^e`, reads `c / (k + 1)^e` above.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `inner_lr`: γ, the step size of z on G; also α for y unless `penalized_lr` is given.
    - `outer_optimizer`: an optax optimizer for λ, or a step size β for plain SGD.
    - `penalty0`: μ_0 > 0, the initial penalty.
    - `penalty_growth`: δ >= 0 (μ grows by δ per step) or a schedule `k -> δ_k` (>= 0).
    - `inner_steps`: gradient steps on y and z per step, a Python int >= 1.
    - `penalized_lr`: α, the step size of y on F + μG (default: `inner_lr`).
    - `common_batch`: evaluate ∇_λG(y, λ) and ∇_λG(z, λ) on one training minibatch
      instead of two (see above).

    **Returns:**

    An `F2SA` driver with `init(key, hparams, params)`, `step(state, inner, outer)` and
    `run(state, inner, outer, steps)`, where `inner` and `outer` are `bilevel.Sampler`s.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl, bilevel.testing as blt

    exact = blt.Ridge.sample(4, dim=4, n_train=40, n_val=40)      # optimum λ* ≈ −1.26
    inner = bl.sampler(exact.inner_batch, batch_size=10)
    outer = bl.sampler(exact.outer_batch, batch_size=10)
    driver = bl.f2sa(exact.problem, 0.05, 0.5, penalty0=1.0, penalty_growth=0.02, inner_steps=2,
                     penalized_lr=lambda k: 0.05 / (1.0 + 0.02 * k),   # α_k μ_k stays 0.05
                     common_batch=True)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), exact.params0)
    state, infos = driver.run(state, inner, outer, 1000)
    print(state.hparams, infos.penalty[-1], exact.hypergrad(state.hparams))
    ```
    """
    where = "f2sa(problem, inner_lr, outer_optimizer, ...)"
    check_problem(problem, where)
    inner_lr = check_step_size(inner_lr, "inner_lr", where)
    penalized_lr = inner_lr if penalized_lr is None else check_step_size(penalized_lr, "penalized_lr", where)
    outer_optimizer = check_outer_optimizer(outer_optimizer, where)
    penalty0 = _check_number(penalty0, "penalty0", where, allow_zero=False,
                             meaning="the initial penalty μ_0 on the training loss", example="1.0")
    if not callable(penalty_growth):
        penalty_growth = _check_number(penalty_growth, "penalty_growth", where, allow_zero=True,
                                       meaning="the penalty's increase per step, or a schedule k -> δ_k",
                                       example="0.1")
    inner_steps = _check_inner_steps(inner_steps, where)
    if not isinstance(common_batch, bool):
        raise TypeError(f"{where} requires `common_batch` to be True or False; got {common_batch!r}.")
    return F2SA(problem, inner_lr, penalized_lr, outer_optimizer, penalty0, penalty_growth,
                inner_steps, common_batch)


# ----------------------------------------------------------------------------------------------
# BOME.
# ----------------------------------------------------------------------------------------------


class BOMEState(NamedTuple):
    """The state of `bilevel.bome` (a pytree: scan it, vmap it, checkpoint it).

    **Fields:**

    - `params`: the inner parameters w_k (they move with λ, not to convergence).
    - `hparams`: the hyperparameters λ_k.
    - `key`: the PRNG key the minibatch streams are folded from (fixed for the run).
    - `step`: the number of steps taken, an int32 scalar.
    """

    params: PyTree
    hparams: PyTree
    key: jax.Array
    step: jax.Array


class BOMEInfo(NamedTuple):
    """What one step of `BOME.step` reports (stacked over steps by `BOME.run`).

    **Fields:**

    - `value`: the outer loss F(w_k, λ_k) on the outer minibatch.
    - `hypergrad`: the λ-part of the direction, ∇_λF + ρ∇_λq (a value-function direction,
      not the hypergradient).
    - `hparams`: λ_{k+1}, the hyperparameters after the step.
    - `rho`: the multiplier ρ_k (0 when ‖∇q‖ = 0).
    - `grad_q_norm`: ‖∇q‖ over (λ, w) together.
    - `inner_index`: the training minibatches drawn, shape `(inner_steps + 2,)`: one per
      inner gradient step, then the one of ∇G(w, λ), then the one of ∇_λG(θ̂, λ).
    - `outer_index`: the validation minibatch drawn (a scalar: one per step).
    - `oracle_calls`: minibatch gradient evaluations this step, `inner_steps + 3`.
    """

    value: jax.Array
    hypergrad: PyTree
    hparams: PyTree
    rho: jax.Array
    grad_q_norm: jax.Array
    inner_index: jax.Array
    outer_index: jax.Array
    oracle_calls: jax.Array


class BOME(eqx.Module):
    """BOME, the value-function first-order method, as an `init`/`step`/`run` driver. See `bilevel.bome`.

    **Example:**

    ```python
    import bilevel as bl, bilevel.testing as blt

    driver = bl.bome(blt.Ridge.sample(0, dim=4).problem, 0.05, inner_steps=10, eta=0.5)
    assert isinstance(driver, bl.BOME)
    ```
    """

    problem: Problem = eqx.field(static=True)
    lr: StepSize = eqx.field(static=True)
    inner_lr: StepSize = eqx.field(static=True)
    inner_steps: int = eqx.field(static=True)
    eta: float = eqx.field(static=True)

    def init(self, key, hparams, params) -> BOMEState:
        """The state at step 0.

        **Arguments:**

        - `key`: a PRNG key, e.g. `jax.random.key(0)`; the run's minibatches are drawn from it.
        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters w_0.

        **Returns:**

        A `BOMEState`.
        """
        key, hparams, params = _init_checks(key, hparams, params, "BOME.init(key, hparams, params)")
        return BOMEState(params, hparams, key, jnp.zeros((), jnp.int32))

    def step(self, state: BOMEState, inner: Sampler, outer: Sampler) -> tuple[BOMEState, BOMEInfo]:
        """One step: θ̂ by `inner_steps` gradient steps from w, then (λ, w) move together.

        **Arguments:**

        - `state`: a `BOMEState` from `init` or a previous `step`.
        - `inner`: the training data as a `bilevel.Sampler` (G = `problem.inner`).
        - `outer`: the validation data as a `bilevel.Sampler` (F = `problem.outer`).

        **Returns:**

        `(state, info)`: the next `BOMEState` and a `BOMEInfo`.
        """
        _check_call("BOME", state, BOMEState, inner, outer, "BOME.step(state, inner, outer)")
        _check_losses(self.problem, state.params, state.hparams, inner, outer)
        T, k, w, lam = self.inner_steps, state.step, state.params, state.hparams
        draws = _draws(state.key, k, inner, outer, T + 2, 1)
        alpha, xi = step_size(self.inner_lr, k), step_size(self.lr, k)
        grad_G = jax.grad(self.problem.inner)

        def inner_step(theta, t):
            return _descend(theta, grad_G(theta, lam, draws.inner(t)), alpha), None

        theta, _ = jax.lax.scan(inner_step, w, jnp.arange(T))
        theta = jax.lax.stop_gradient(theta)            # θ̂ is a constant in q
        outer_grad = jax.value_and_grad(self.problem.outer, argnums=(0, 1))
        value, (f_w, f_lam) = outer_grad(w, lam, draws.outer(0))
        q_w, g_lam = jax.grad(self.problem.inner, argnums=(0, 1))(w, lam, draws.inner(T))
        g_lam_hat = jax.grad(self.problem.inner, argnums=1)(theta, lam, draws.inner(T + 1))
        q_lam = jax.tree_util.tree_map(jnp.subtract, g_lam, g_lam_hat)
        grad_q, grad_f = (q_w, q_lam), (f_w, f_lam)
        sq = tree_vdot(grad_q, grad_q)
        positive = sq > 0
        rho = jnp.where(positive, jnp.maximum(self.eta * sq - tree_vdot(grad_f, grad_q), 0.0)
                        / jnp.where(positive, sq, 1.0), 0.0)
        d_w, d_lam = _axpy(rho, grad_q, grad_f)
        params, hparams = _descend(w, d_w, xi), _descend(lam, d_lam, xi)
        info = BOMEInfo(value, d_lam, hparams, rho, tree_norm(grad_q), draws.inner_index,
                        draws.outer_index[0], jnp.asarray(T + 3, jnp.int32))
        return BOMEState(params, hparams, state.key, k + 1), info

    def run(self, state: BOMEState, inner: Sampler, outer: Sampler, steps: int, *,
            history: bool = True):
        """`steps` calls of `step` in one compiled `lax.scan`.

        Compiled on first use and reused for the same driver, shapes and `steps` (new
        hyperparameter values or keys do not recompile); it can also be called inside your
        own `jax.jit` or `jax.vmap` (e.g. over keys, for a population of seeds).

        **Arguments:**

        - `state`: a `BOMEState`.
        - `inner`, `outer`: the training and validation `bilevel.Sampler`s.
        - `steps`: the number of steps, a Python int >= 1.
        - `history`: `True` (default) stacks every field of every step's info; `False` sets
          the tree-valued fields `hypergrad` and `hparams` to `None` and keeps the scalars.
          The stacked trees hold `2 × steps × |hparams|` numbers: with a million float32
          hyperparameters, 3,000 steps would take 24 GB.

        **Returns:**

        `(state, infos)`: the final state and the `BOMEInfo`s stacked along a leading axis.
        """
        where = "BOME.run(state, inner, outer, steps, *, history=True)"
        check_steps(steps, where)
        _check_call("BOME", state, BOMEState, inner, outer, where)
        return scan_run(self, state, inner, outer, steps, check_history(history, where))


def bome(
    problem: Problem,
    lr: StepSize,
    *,
    inner_steps: int,
    eta: float,
    inner_lr: StepSize | None = None,
) -> BOME:
    """BOME (Liu, Ye, Wright, Stone & Liu, 2022, *BOME! Bilevel Optimization Made Easy*): a value-function method that uses gradients only.

    BOME solves the value-function reformulation min_{λ,w} F(w, λ) subject to
    q(λ, w) = G(w, λ) − min_θ G(θ, λ) <= 0 (G = `problem.inner`, F = `problem.outer`). At
    step k, with a fresh minibatch for every gradient,

        θ̂ = inner_steps gradient steps on G(·, λ_k) from w_k, step size α_k (θ̂ then held constant)
        ∇q = (∇_λ G(w_k, λ_k) − ∇_λ G(θ̂, λ_k),  ∇_w G(w_k, λ_k))
        ρ_k = max(η‖∇q‖² − ⟨∇F, ∇q⟩, 0) / ‖∇q‖²       (ρ_k = 0 when ∇q = 0)
        (λ, w)_{k+1} = (λ, w)_k − ξ_k (∇F + ρ_k ∇q)

    where ∇F = (∇_λ F, ∇_w F) at (w_k, λ_k) and norms and inner products run over (λ, w)
    together. ρ_k is the smallest multiplier for which the step decreases q at least at
    rate η‖∇q‖² (to first order), the paper's dynamic barrier with φ = η‖∇q‖² (the choice
    benchmark_bilevel uses). **The direction is not the hypergradient**: BOME moves λ and w
    together along a value-function direction and reaches only approximately stationary
    points, with an error that depends on η, the step size and `inner_steps`.

    **Why step sizes and not an optax optimizer.** ρ_k is chosen for the joint (λ, w)
    direction as given; a preconditioned or momentum optimizer (Adam, ...) would move along
    a different direction, for which the guarantee on q no longer holds. `lr` (ξ) and
    `inner_lr` (α) are each a positive number or a schedule `k -> size`.

    **Minibatches.** BOME's analysis is deterministic. With minibatches ∇q is noisy: the
    minibatch gradient ∇_w G(w, λ) is not zero even at w = w*(λ), so ‖∇q‖² has a noise
    floor and the barrier no longer holds w near w*(λ). On the small quadratic problems of
    our tests, minibatch runs stalled with w well away from w*(λ) and λ at a biased point,
    where full-batch runs reach a small neighbourhood of the optimum: prefer full or large
    batches.

    **Where this differs from benchmark_bilevel.** benchmark_bilevel runs BOME on the full
    batch; here each gradient gets its own minibatch from the samplers (pass
    `batch_size` = all rows for the deterministic method). benchmark_bilevel steps w with its
    inner step size and λ with `step_size / outer_ratio` (default ratio 1, so both equal);
    here (λ, w) share ξ = `lr`, as in the paper, and α = `inner_lr` (default `lr`) is the
    step of the inner gradient steps only. ρ_k = 0 when ∇q = 0 (benchmark_bilevel divides
    by zero there). The paper's other choice φ = η q is not offered.
    benchmark_bilevel's defaults are `lr=0.1, inner_steps=10, eta=0.5`.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `lr`: ξ, the step size of the joint (λ, w) update.
    - `inner_steps`: gradient steps on G that give θ̂ ≈ argmin_θ G(θ, λ), a Python int >= 1.
    - `eta`: η > 0, the barrier coefficient.
    - `inner_lr`: α, the step size of those inner gradient steps (default: `lr`).

    **Returns:**

    A `BOME` driver with `init(key, hparams, params)`, `step(state, inner, outer)` and
    `run(state, inner, outer, steps)`, where `inner` and `outer` are `bilevel.Sampler`s.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl, bilevel.testing as blt

    exact = blt.Ridge.sample(4, dim=4, n_train=40, n_val=40)      # optimum λ* ≈ −1.26
    inner = bl.sampler(exact.inner_batch, batch_size=40)          # full batch (see above)
    outer = bl.sampler(exact.outer_batch, batch_size=40)
    driver = bl.bome(exact.problem, 0.1, inner_steps=10, eta=0.5)
    state = driver.init(jax.random.key(0), jnp.asarray(0.0), exact.params0)
    state, infos = driver.run(state, inner, outer, 1000)
    print(state.hparams, infos.rho[-1], exact.hypergrad(state.hparams))
    ```
    """
    where = "bome(problem, lr, inner_steps=..., eta=...)"
    check_problem(problem, where)
    lr = check_step_size(lr, "lr", where)
    inner_lr = lr if inner_lr is None else check_step_size(inner_lr, "inner_lr", where)
    inner_steps = _check_inner_steps(inner_steps, where)
    eta = _check_number(eta, "eta", where, allow_zero=False,
                        meaning="the barrier coefficient of the value-function constraint",
                        example="0.5")
    return BOME(problem, lr, inner_lr, inner_steps, eta)
