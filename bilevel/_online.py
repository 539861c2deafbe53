"""The online joint dynamics of Online Hyper-parameter Optimization: parameters, their Jacobian and hyperparameters move together.

At every inner step t the driver

1. takes one optimizer step on the training loss, θ_{t+1} = step(θ_t, λ_t), and the same step
   of the Jacobian y = dθ/dλ (`bilevel.forward_mode`'s recursion, shared code), projected on
   the ball of radius r when `clip=r`; with `first_order=True` instead y_{t+1} = −∂g_T/∂λ(θ_t);
2. estimates the hypergradient ĝ = ⟨∇_θ L_V(θ_{t+1}), y_{t+1}⟩ + ∂L_V/∂λ;
3. when t ≥ warmup and (no window, or t + 1 is a multiple of the window K) moves λ with the
   hyper-optimizer on ĝ; with a window, y is then reset to 0.

Everything is a pure function of a `NamedTuple` state, so a run is one `lax.scan` and a
population of runs one `vmap`. The settings `window`, `clip` and `warmup` may be arrays
(traced), so runs of different variants can share one compiled, vmapped call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._base import inner_grad, tree_norm
from ._forward import hparam_basis, initial_tangents, project, pullback, tangent_step
from ._problem import (PerStep, Problem, canonical, check_hparams, check_loss, check_params0, check_per_step,
                       refuse_start)
from ._unroll import OptimizerLike, check_optimizer, optimizer_at

PyTree = Any


class OnlineState(NamedTuple):
    """The state of the joint system (a pytree: scan it, vmap it, checkpoint it).

    **Fields:**

    - `params`: the inner parameters θ_t.
    - `opt_state`: the inner optimizer's state.
    - `jacobian`: `(dθ/dλ, d opt_state/dλ)`, each leaf with a leading axis of size n, the
      number of scalar hyperparameters.
    - `hparams`: the hyperparameters λ_t.
    - `hyper_state`: the hyper-optimizer's state.
    - `step`: the number of inner steps taken, an int32 scalar.
    """

    params: PyTree
    opt_state: PyTree
    jacobian: tuple
    hparams: PyTree
    hyper_state: PyTree
    step: jax.Array


class OnlineInfo(NamedTuple):
    """What one step of `Online.step` reports (stacked over steps by `Online.run`).

    **Fields:**

    - `value`: the validation loss L_V(θ_{t+1}, λ_t).
    - `hypergrad`: the hypergradient estimate ĝ (same tree as the hparams).
    - `hparams`: λ_{t+1}, the hyperparameters after the step.
    - `jacobian_norm`: ‖dθ_{t+1}/dλ‖ after projection (before a window reset).
    - `clipped`: whether the projection clipped at this step.
    - `updated`: whether λ moved at this step.
    """

    value: jax.Array
    hypergrad: PyTree
    hparams: PyTree
    jacobian_norm: jax.Array
    clipped: jax.Array
    updated: jax.Array


def _concrete(x):
    """`x` as a numpy value when it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_setting(value, name: str, ok, requirement: str, example: str) -> None:
    concrete = _concrete(value)
    if concrete is None:
        return
    try:
        good = concrete.shape == () and bool(ok(concrete))
    except TypeError:  # e.g. a string
        good = False
    if not good:
        raise ValueError(
            f"online(problem, optimizer, hyper_optimizer, ...) requires `{name}` {requirement}; "
            f"got {name}={value!r}. {example}"
        )


_WINDOW = "to be None or an int K >= 1 (reset y and update λ every K steps)"
_WINDOW_FIX = "Pass e.g. window=5 for Unroll5, or None to carry y across updates."


def _is_int(x) -> bool:
    return np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_)


class Online(eqx.Module):
    """The joint online dynamics of Online Hyper-parameter Optimization as an `init`/`step`/`run` driver. See `bilevel.online`."""

    problem: Problem = eqx.field(static=True)
    optimizer: OptimizerLike = eqx.field(static=True)
    hyper_optimizer: optax.GradientTransformation = eqx.field(static=True)
    window: int | jax.Array
    clip: float | jax.Array
    warmup: int | jax.Array
    first_order: bool = eqx.field(static=True)

    def __check_init__(self):
        where = "online(problem, optimizer, hyper_optimizer, ...)"
        if not isinstance(self.problem, Problem):
            raise TypeError(
                f"{where} requires a bilevel.Problem as first argument; got "
                f"{type(self.problem).__name__}. Build one with bilevel.Problem(inner=..., outer=...)."
            )
        refuse_start(self.problem, where)
        check_optimizer(self.optimizer, "optimizer", where)
        if not isinstance(self.hyper_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{where} requires `hyper_optimizer` to be an optax.GradientTransformation for "
                f"the hyperparameters, e.g. optax.sgd(1e-4); got "
                f"{type(self.hyper_optimizer).__name__} {self.hyper_optimizer!r}."
            )
        _check_setting(self.window, "window", lambda k: _is_int(k) and k >= 0, _WINDOW, _WINDOW_FIX)
        _check_setting(self.clip, "clip", lambda r: r > 0,
                       "to be None or a radius r > 0", "Pass e.g. clip=5.0 for Clip5.")
        _check_setting(self.warmup, "warmup", lambda w: _is_int(w) and w >= 0,
                       "to be an int >= 0 (steps before λ first moves)", "Pass e.g. warmup=1000.")
        window, clip = _concrete(self.window), _concrete(self.clip)
        if self.first_order and ((window is not None and window != 0) or
                                 (clip is not None and clip != np.inf)):
            raise ValueError(
                f"{where} with first_order=True (Unroll1-gTgV) uses y = −∂g_T/∂λ afresh at every "
                "step, so `window` and `clip` do not apply; got window="
                f"{self.window!r}, clip={self.clip!r}. Drop them, or use first_order=False."
            )

    def _optimizer(self, hparams) -> optax.GradientTransformation:
        return optimizer_at(self.optimizer, hparams)

    def init(self, hparams, params) -> OnlineState:
        """The state at step 0: y = 0 (and d opt_state/dλ at init), the hyper-optimizer at λ_0.

        **Arguments:**

        - `hparams`: the initial hyperparameters λ_0 (floating-point pytree).
        - `params`: the initial inner parameters θ_0.

        **Returns:**

        An `OnlineState`.
        """
        check_hparams(hparams, "Online.init(hparams, params)")
        check_params0(params, "Online.init(hparams, params)", allow_complex=False)
        hparams, params = canonical((hparams, params))
        basis = hparam_basis(hparams)
        opt_state, jacobian = initial_tangents(self._optimizer, hparams, params, basis)
        return OnlineState(params, opt_state, jacobian, hparams,
                           self.hyper_optimizer.init(hparams), jnp.zeros((), jnp.int32))

    def _inner_step(self, state: OnlineState, batch, basis):
        """θ_{t+1}, the optimizer state and the Jacobian, projected; and whether it clipped."""
        if not self.first_order:
            params, opt_state, jac = tangent_step(self.problem, self._optimizer, state.hparams, state.params,
                                                  state.opt_state, state.jacobian, batch, basis)
            jac, clipped = project(jac, self.clip)
            return params, opt_state, jac, clipped
        grad = inner_grad(self.problem)
        g, lin = jax.linearize(lambda h: grad(state.params, h, batch), state.hparams)
        cross = jax.vmap(lin)(basis)
        updates, opt_state = self._optimizer(state.hparams).update(g, state.opt_state, state.params)
        jac = (jax.tree_util.tree_map(jnp.negative, cross), state.jacobian[1])
        return optax.apply_updates(state.params, updates), opt_state, jac, jnp.asarray(False)

    def step(self, state: OnlineState, inner_batch, outer_batch) -> tuple[OnlineState, OnlineInfo]:
        """One inner step of the joint system, and a hyperparameter step when one is due.

        **Arguments:**

        - `state`: an `OnlineState` from `init` or a previous `step`.
        - `inner_batch`: the training batch for this step (or `None`).
        - `outer_batch`: the validation batch for this step (or `None`).

        **Returns:**

        `(state, info)`: the next `OnlineState` and an `OnlineInfo`.
        """
        if not isinstance(state, OnlineState):
            raise TypeError(
                "Online.step(state, inner_batch, outer_batch) requires the OnlineState returned "
                f"by Online.init or Online.step; got {type(state).__name__}."
            )
        check_loss(self.problem.inner, "inner", state.params, state.hparams, inner_batch)
        check_loss(self.problem.outer, "outer", state.params, state.hparams, outer_batch)
        basis = hparam_basis(state.hparams)
        params, opt_state, jac, clipped = self._inner_step(state, inner_batch, basis)
        value, (g_w, g_h) = jax.value_and_grad(self.problem.outer, argnums=(0, 1))(
            params, state.hparams, outer_batch)
        estimate = jax.tree_util.tree_map(jnp.add, pullback(jac[0], g_w, state.hparams), g_h)
        t = state.step
        window = jnp.asarray(self.window)
        at_window_end = (t + 1) % jnp.maximum(window, 1) == 0
        update = at_window_end & (t >= self.warmup)
        updates, hyper_state = self.hyper_optimizer.update(estimate, state.hyper_state, state.hparams)
        moved = optax.apply_updates(state.hparams, updates)
        hparams, hyper_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(update, new, old),
            (moved, hyper_state), (state.hparams, state.hyper_state))
        jac_norm = tree_norm(jac[0])
        reset = (window > 0) & at_window_end
        jac = jax.tree_util.tree_map(lambda y: jnp.where(reset, jnp.zeros_like(y), y), jac)
        info = OnlineInfo(value, estimate, hparams, jac_norm, clipped, update)
        return OnlineState(params, opt_state, jac, hparams, hyper_state, t + 1), info

    def run(self, state: OnlineState, inner_data, outer_data, steps: int):
        """`steps` calls of `step` in one compiled `lax.scan`.

        Compiled on first use (and reused for the same driver settings, shapes and `steps`);
        it can also be called inside your own `jax.jit` or `jax.vmap`. Called with a concrete
        state, it checks that the warm-up ends within the run.

        **Arguments:**

        - `state`: an `OnlineState`.
        - `inner_data`, `outer_data`: one batch used at every step, `bilevel.per_step(stacked)`
          with a leading axis of size `steps`, or `None`.
        - `steps`: the number of inner steps, a positive Python int.

        **Returns:**

        `(state, infos)`: the final state and the `OnlineInfo`s stacked along a leading axis
        (inside your own `jax.jit`, fields you do not use are not kept).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"Online.run(state, inner_data, outer_data, steps) requires steps to be a Python "
                f"int >= 1; got {steps!r}."
            )
        start, warmup = _concrete(state.step), _concrete(self.warmup)
        if start is not None and warmup is not None and warmup >= start + steps:
            raise ValueError(
                f"Online.run: the warm-up ({int(warmup)} steps) is not shorter than the run "
                f"(steps {int(start)} to {int(start) + steps}), so the hyperparameters would never "
                "move. Use a shorter warmup or a longer run (to go through the warm-up in "
                "pieces, call Online.step, or Online.run inside your own jax.jit)."
            )
        check_per_step(inner_data, steps, "inner_data of Online.run")
        check_per_step(outer_data, steps, "outer_data of Online.run")
        return _scan(self, state, inner_data, outer_data, steps)


@eqx.filter_jit
def _scan(driver: Online, state: OnlineState, inner_data, outer_data, steps: int):
    def body(state, xs):
        inner, outer = xs
        inner = inner if isinstance(inner_data, PerStep) else inner_data
        outer = outer if isinstance(outer_data, PerStep) else outer_data
        return driver.step(state, inner, outer)

    xs = tuple(d.batches if isinstance(d, PerStep) else None for d in (inner_data, outer_data))
    return jax.lax.scan(body, state, xs, length=steps)


def online(
    problem: Problem,
    optimizer: OptimizerLike,
    hyper_optimizer: optax.GradientTransformation,
    *,
    window: int | None = None,
    clip: float | None = None,
    warmup: int = 0,
    first_order: bool = False,
) -> Online:
    """The joint online dynamics of Online Hyper-parameter Optimization: θ, y = dθ/dλ and λ all move at every inner step.

    The variants of the paper are settings of one driver:

    | paper | settings | y | λ moves |
    |---|---|---|---|
    | UnrollK (Franceschi et al.) | `window=K` | carried K steps, then reset to 0 | every K steps |
    | Unroll1 | `window=1` | `−η ∂g_T/∂λ` (SGD) | every step |
    | Unroll1-gTgV (Luketina et al.) | `first_order=True` | `−∂g_T/∂λ` (no η) | every step |
    | Clip-r (Algorithm 1) | `clip=r, warmup=W` | carried, projected on the ball of radius r | every step after W |

    The hypergradient estimate at step t is `⟨∇_θ L_V(θ_{t+1}), y_{t+1}⟩ + ∂L_V/∂λ`, the
    derivative of `L_V(θ_{t+1})` through the carried Jacobian (Algorithm 1 writes `y_t` beside
    `g_V`; using the pair at t + 1 makes Unroll1 exactly Franceschi et al. with K = 1). The
    hyper-optimizer is applied to it: Algorithm 1's `λ ← λ − cη g_V y` is
    `hyper_optimizer=optax.sgd(c * eta)`.

    `window`, `clip` and `warmup` may also be JAX arrays (`window=0` and `clip=inf` mean
    none), so different variants can run in one `vmap`.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `optimizer`: the inner optax optimizer, or a function `hparams -> optimizer`.
    - `hyper_optimizer`: the optax optimizer applied to the hypergradient estimate.
    - `window`: K >= 1 to reset y and update λ every K steps, or `None`.
    - `clip`: the projection radius r > 0 for y, or `None`.
    - `warmup`: inner steps before λ first moves (y moves from the start), int >= 0.
    - `first_order`: Unroll1-gTgV; excludes `window` and `clip`.

    **Returns:**

    An `Online` driver with `init(hparams, params)`, `step(state, inner_batch, outer_batch)`
    and `run(state, inner_data, outer_data, steps)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl
    import bilevel.testing as blt

    exact = blt.Quadratic004.sample(0, dim=20)
    driver = bl.online(exact.problem, optax.sgd(1e-2), optax.sgd(1e-3), clip=5.0, warmup=100)
    state = driver.init(jnp.asarray(0.0), exact.params0)
    state, infos = driver.run(state, exact.inner_batch, exact.outer_batch, 5000)
    print(state.hparams, exact.optimal_hparams())
    ```
    """
    if window is not None:  # an explicit window must be K >= 1 (0 only encodes None in arrays)
        _check_setting(window, "window", lambda k: _is_int(k) and k >= 1, _WINDOW, _WINDOW_FIX)
    window = 0 if window is None else window
    clip = float("inf") if clip is None else clip
    return Online(problem, optimizer, hyper_optimizer, window, clip, warmup, first_order)
