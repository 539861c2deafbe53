"""DrMAD (Fu et al. 2016): reverse mode over a linearly interpolated trajectory, `bilevel.drmad`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._base import AbstractMethod, grad_norm_stats, inner_grad, zero_cotangent
from ._problem import PerStep, Problem
from ._unroll import Unroll, _last_batch


def _interpolate(carry0, carry_T, fraction):
    """θ_0 + f (θ_T − θ_0) leaf by leaf; integer leaves (step counters) are rounded, so a
    counter that grows by one per step is exact."""

    def leaf(a, b):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return a + fraction.astype(a.dtype) * (b - a)
        mid = a.astype(jnp.float32) + fraction.astype(jnp.float32) * (b - a).astype(jnp.float32)
        return jnp.round(mid).astype(a.dtype)

    return jax.tree_util.tree_map(leaf, carry0, carry_T)


def _drmad_response(problem: Problem, unroll: Unroll):
    """`(hparams, params0, batch) -> w_T` whose vector-Jacobian product is DrMAD's."""
    steps = unroll.steps

    def init(h, p0):
        return p0, unroll._optimizer(h).init(p0)

    def step(carry, h, b):
        params, state = carry
        updates, state = unroll._optimizer(h).update(inner_grad(problem)(params, h, b), state, params)
        return optax.apply_updates(params, updates), state

    def forward(h, p0, batch):
        carry0 = init(h, p0)
        return carry0, unroll._scan(problem, unroll._optimizer(h), h, carry0, batch, steps)

    @jax.custom_vjp
    def respond(h, p0, batch):
        return forward(h, p0, batch)[1][0]

    def respond_fwd(h, p0, batch):
        carry0, carry_T = forward(h, p0, batch)
        return carry_T[0], (h, p0, batch, carry0, carry_T)

    def respond_bwd(res, cotangent):
        h, p0, batch, carry0, carry_T = res
        per_step = isinstance(batch, PerStep)

        def differentiable(tree):
            return eqx.filter(tree, eqx.is_inexact_array)

        def back(acc, xs):
            adjoint, h_bar = acc
            tau, b = xs
            point = _interpolate(carry0, carry_T, tau / steps)
            diff, fixed = eqx.partition(point, eqx.is_inexact_array)
            run = lambda d, hh: differentiable(step(eqx.combine(d, fixed), hh, b if per_step else batch))  # noqa: E731
            _, pullback = jax.vjp(run, diff, h)
            adjoint, h_step = pullback(adjoint)
            return (adjoint, jax.tree_util.tree_map(jnp.add, h_bar, h_step)), None

        adjoint_T = (cotangent, jax.tree_util.tree_map(jnp.zeros_like, differentiable(carry_T[1])))
        h_bar = jax.tree_util.tree_map(jnp.zeros_like, h)
        taus = jnp.arange(steps, dtype=jnp.result_type(float))
        (adjoint_0, h_bar), _ = jax.lax.scan(back, (adjoint_T, h_bar),
                                             (taus, batch.batches if per_step else None), reverse=True)
        _, pullback = jax.vjp(lambda hh, pp: differentiable(init(hh, pp)), h, p0)
        h_init, p0_bar = pullback(adjoint_0)
        h_bar = jax.tree_util.tree_map(jnp.add, h_bar, h_init)
        return h_bar, p0_bar, jax.tree_util.tree_map(zero_cotangent, batch)

    respond.defvjp(respond_fwd, respond_bwd)
    return respond


class DrMAD(AbstractMethod):
    """An unroll differentiated backwards along a straight path. See `bilevel.drmad`."""

    method: Unroll

    def __check_init__(self):
        if not isinstance(self.method, Unroll):
            raise TypeError(
                "drmad(method) requires an unrolled method, bilevel.unroll(...); got "
                f"{type(self.method).__name__}. DrMAD replaces the stored trajectory of an "
                "unroll by the straight line from its start to its end: write "
                "bilevel.drmad(bilevel.unroll(optimizer, steps))."
            )

    def _check_batch(self, inner_batch) -> None:
        self.method._check_batch(inner_batch)

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        params = _drmad_response(problem, self.method)(hparams, params0, batch)
        stats = grad_norm_stats(problem, params, hparams, _last_batch(batch))
        return params, {**stats, "drmad": jnp.asarray(True)}

    def _start_refusal(self) -> str | None:
        return None


def drmad(method: Unroll) -> DrMAD:
    """DrMAD (Fu et al. 2016): reverse mode through an unroll along a straight-line trajectory.

    The forward pass is the unroll's `steps` optimizer steps, and it stores only the start
    and the end. The backward pass walks the steps in reverse, as exact reverse mode does,
    but evaluates step τ's vector-Jacobian product at the interpolated point

        θ_τ = θ_0 + (τ / T) (θ_T − θ_0)

    instead of the stored iterate (parameters and optimizer state alike; integer step
    counters are rounded, so they are exact). Memory is independent of `steps`: two copies
    of the parameters and optimizer state, where `unroll` keeps T of them (or O(√T) with
    `checkpoint`). Reverse mode only: `jax.jvp` through it raises.

    An approximation, not the exact derivative of the T-step run: it is exact when each
    step's Jacobians do not depend on where they are evaluated (gradient descent, with or
    without momentum, on a quadratic whose λ-derivative of the gradient does not depend on
    w), and otherwise its error grows with how far the real trajectory bends away from the
    straight line. With Adam it is unusable: the interpolated second moments are far from
    the real ones (on an MLP, relative error 1.2 at T = 100 and NaN at T = 1,000; see the
    "Memory at depth" guide); DrMAD was designed for SGD with momentum. Compare it with
    `bilevel.unroll` on your problem before trusting it (the
    Guarantees page reports both on the `bilevel.testing` problems). The stats add `drmad`
    (True) beside `inner_grad_norm`. Second derivatives differentiate DrMAD's backward
    pass: they are neither the true hyper-Hessian nor tested.

    **Arguments:**

    - `method`: a method built by `bilevel.unroll` (its optimizer and steps are used; a
      `checkpoint` setting has nothing to do, since no trajectory is stored).

    **Returns:**

    A method to pass to `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(   # gradient descent on a quadratic: DrMAD equals reverse mode
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - lam) ** 2) + 0.05 * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    lam, w0 = jnp.array([1.0, -1.0, 2.0]), jnp.zeros(3)
    method = bl.unroll(optax.sgd(0.1, momentum=0.5), steps=300)
    exact = bl.hypergrad(problem, method)(lam, w0, None, None)
    approx = bl.hypergrad(problem, bl.drmad(method))(lam, w0, None, None)
    assert jnp.allclose(approx.grad, exact.grad, rtol=1e-4) and approx.stats["drmad"]
    ```
    """
    return DrMAD(method)
