"""Learning-rate and momentum schedules as hyperparameters (Maclaurin, Duvenaud & Adams 2015):
`scheduled_sgd`, gradient descent with one rate and one momentum per step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class ScheduledSGDState(NamedTuple):
    """The state of `bilevel.scheduled_sgd`: the step count and the velocity.

    - `count`: the number of updates done so far (int32); update `t` uses entry `t` of the
      schedules.
    - `velocity`: `v_t`, a tree shaped like the parameters (`None` without momenta).
    """

    count: Array
    velocity: Any


def _schedule(x, name: str, length: int | None = None) -> Array:
    """`x` as a 1-D floating array, or an error naming what was wrong and how to fix it."""
    where = "scheduled_sgd(learning_rates, momenta=None)"
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(
            f"{where} requires `{name}` to be a 1-D float array with one entry per step; got "
            f"{type(x).__name__} {x!r}. Pass e.g. {name}=jnp.full(100, 0.1)."
        ) from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{where} requires `{name}` to be a real floating array (one value per step); got "
            f"dtype {arr.dtype}. Pass floats, e.g. jnp.asarray({name}, jnp.float32)."
        )
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(
            f"{where} requires `{name}` to be 1-D with at least one entry (entry t is step t's "
            f"value); got shape {arr.shape}. For a constant schedule over T steps pass "
            f"jnp.full(T, value)."
        )
    if length is not None and arr.shape[0] != length:
        raise ValueError(
            f"{where} requires `momenta` to have the length of `learning_rates` (one pair per "
            f"step); got {arr.shape[0]} momenta for {length} learning rates. Pass two "
            "schedules of the same length T."
        )
    return arr


def _at(schedule: Array, t: Array) -> Array:
    """`schedule[t]`, or NaN once `t` is past the schedule's end (never a reused value)."""
    n = schedule.shape[0]
    value = schedule[jnp.clip(t, 0, n - 1)]
    return jnp.where(t < n, value, jnp.nan)


def scheduled_sgd(learning_rates, momenta=None) -> optax.GradientTransformation:
    """Gradient descent with a learning rate and a momentum for every step.

    Step `t` (counted from 0) uses the rate `α_t = learning_rates[t]` and the momentum
    `γ_t = momenta[t]`, in the parametrisation of Maclaurin, Duvenaud & Adams (2015,
    "Gradient-based hyperparameter optimization through reversible learning"):

        v_{t+1} = γ_t v_t − (1 − γ_t) g_t          w_{t+1} = w_t + α_t v_{t+1}

    from `v_0 = 0`, with `g_t` the gradient at `w_t`. Without momenta (`momenta=None`) it is
    plain gradient descent, `w_{t+1} = w_t − α_t g_t` (the same as `γ_t = 0`), and no
    velocity is stored. (With constant `α, γ` this is heavy-ball momentum with step
    `α(1 − γ)` and momentum `γ`.)

    With `bilevel.unroll(lambda h: scheduled_sgd(h["lr"], h["momentum"]), steps=T)` the
    whole schedules are hyperparameters: `bilevel.hypergrad` returns the derivative of the
    validation loss with respect to every step's rate and momentum, in reverse or forward
    mode, under `jit` and `vmap`, and new schedule values do not retrace. To keep the rates
    positive and the momenta in (0, 1), optimise unconstrained values and map them, e.g.
    `lambda h: scheduled_sgd(jnp.exp(h["log_lr"]), jax.nn.sigmoid(h["logit_m"]))`.

    **Past the end.** An update beyond the schedules' length (update `t >= T`) is NaN, so
    running more steps than the schedule has values shows up as NaN parameters instead of
    silently reusing the last value. The values themselves are not checked (they may be
    traced); a NaN rate or momentum gives NaN updates.

    **Arguments:**

    - `learning_rates`: the rates `α_0 … α_{T−1}`, a 1-D floating array of length `T >= 1`.
    - `momenta`: the momenta `γ_0 … γ_{T−1}`, a 1-D floating array of the same length, or
      `None` for no momentum.

    **Returns:**

    An `optax.GradientTransformation` whose state is a `ScheduledSGDState(count, velocity)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    opt = bl.scheduled_sgd(jnp.array([0.5, 0.1]), jnp.array([0.0, 0.9]))
    w = jnp.array(1.0)
    state = opt.init(w)
    u, state = opt.update(jnp.array(2.0), state)         # v1 = −2,          w1 = 1 − 0.5·2
    w = optax.apply_updates(w, u)
    u, state = opt.update(jnp.array(4.0), state)         # v2 = 0.9·(−2) − 0.1·4 = −2.2
    w = optax.apply_updates(w, u)
    assert jnp.allclose(w, 0.0 + 0.1 * -2.2)
    ```
    """
    rates = _schedule(learning_rates, "learning_rates")
    moms = None if momenta is None else _schedule(momenta, "momenta", rates.shape[0])

    def init(params):
        velocity = None if moms is None else jax.tree_util.tree_map(jnp.zeros_like, params)
        return ScheduledSGDState(jnp.zeros((), jnp.int32), velocity)

    def update(grads, state, params=None):
        del params
        t = state.count
        alpha = _at(rates, t)
        count = optax.safe_int32_increment(t)
        if moms is None:
            updates = jax.tree_util.tree_map(lambda g: (-alpha * g).astype(g.dtype), grads)
            return updates, ScheduledSGDState(count, None)
        gamma = _at(moms, t)
        velocity = jax.tree_util.tree_map(
            lambda v, g: (gamma * v - (1 - gamma) * g).astype(v.dtype), state.velocity, grads)
        updates = jax.tree_util.tree_map(lambda v: (alpha * v).astype(v.dtype), velocity)
        return updates, ScheduledSGDState(count, velocity)

    return optax.GradientTransformation(init, update)
