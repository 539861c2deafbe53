"""Forward-mode hypergradients: carry the Jacobian y_t = dw_t/dλ along the steps.

Following Online Hyper-parameter Optimization.

An unroll's steps form the dynamical system `(w, s)_{t+1} = step((w, s)_t, λ)` (parameters
`w`, optimizer state `s`). Differentiating it with respect to λ gives the linear system

    Y_{t+1} = ∂step/∂(w, s) · Y_t + ∂step/∂λ,        Y_0 = (0, d init(w_0; λ)/dλ),

one column per scalar hyperparameter. `forward_mode` runs both together in one `lax.scan`:
each step is linearised once (`jax.linearize`) and the linear map is applied to all columns
at once (`jax.vmap`), so the cost is one step plus one batched JVP per step, and the memory is
the carry — independent of the number of steps. With `clip=r` the parameter block of `Y` is
projected on the ball of radius `r` after every step (Online Hyper-parameter Optimization,
eq. 9); the optimizer-state block is scaled by the same factor so the carried tangent stays
one consistent, rescaled sensitivity.

The derivative reaches JAX as a `custom_jvp` whose tangent is the contraction `Y_T · dλ`: the
scan depends on primal values only, so reverse mode (`jax.grad`) computes `Y_T` in the forward
pass and transposes only the final contraction — nothing per step is stored.

`tangent_step`, `initial_tangents` and `project` are shared with the online driver.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ._base import AbstractMethod, grad_norm_stats, inner_grad, tree_norm, tree_vdot, vary_like
from ._implicit import _all_zero, _instantiate
from ._problem import PerStep, Problem
from ._unroll import Unroll, _last_batch

PyTree = Any


def _is_state_leaf(x) -> bool:
    """Optimizer-state leaves that carry a tangent (floating arrays; not step counters)."""
    return eqx.is_inexact_array(x)


def hparam_basis(hparams) -> PyTree:
    """The unit directions of the hyperparameters: hparams' tree with a leading axis of size n."""
    flat, unravel = ravel_pytree(hparams)
    return jax.vmap(unravel)(jnp.eye(flat.size, dtype=flat.dtype))


def contract(jac: PyTree, direction) -> PyTree:
    """`Y · v`: the response's tangent in the hyperparameter direction `v` (a hparams tree)."""
    flat = ravel_pytree(direction)[0]
    return jax.tree_util.tree_map(lambda y: jnp.tensordot(flat.astype(y.dtype), y, axes=1), jac)


def pullback(jac: PyTree, cotangent: PyTree, hparams) -> PyTree:
    """`Yᵀ g`: a parameter cotangent `g` pulled back to a hparams tree."""
    columns = jax.vmap(lambda y: tree_vdot(y, cotangent))(jac)
    return ravel_pytree(hparams)[1](columns)


def initial_tangents(optimizer_fn, hparams, params0, basis):
    """The optimizer state at `params0` and the Jacobian `Y_0` (zero for w, d init/dλ for s)."""

    def init(h):
        return eqx.partition(optimizer_fn(h).init(params0), _is_state_leaf)

    diff, lin, rest = jax.linearize(init, hparams, has_aux=True)
    n = jax.tree_util.tree_leaves(basis)[0].shape[0]
    jac_w = jax.tree_util.tree_map(lambda p: jnp.zeros((n,) + jnp.shape(p), jnp.result_type(p)),
                                   params0)
    return eqx.combine(diff, rest), (jac_w, jax.vmap(lin)(basis))


def tangent_step(problem: Problem, optimizer_fn, hparams, params, opt_state, jac, batch, basis):
    """One optimizer step and the same step of its Jacobian: `(params, opt_state, jac)`."""
    grad = inner_grad(problem)
    diff, rest = eqx.partition(opt_state, _is_state_leaf)

    def step(w, d, h):
        g = grad(w, h, batch)
        updates, state = optimizer_fn(h).update(g, eqx.combine(d, rest), w)
        new_d, new_rest = eqx.partition(state, _is_state_leaf)
        return (optax.apply_updates(w, updates), new_d), new_rest

    (params, diff), lin, rest = jax.linearize(step, params, diff, hparams, has_aux=True)
    jac = jax.vmap(lin)(jac[0], jac[1], basis)
    return params, eqx.combine(diff, rest), jac


def project(jac, radius):
    """Project the parameter block of `Y` on the ball of radius `radius`; scale s's block alike.

    Returns the projected Jacobian and whether it was clipped. `radius` may be traced, and
    `inf` never clips.
    """
    norm = tree_norm(jac[0])
    clipped = norm > radius
    scale = jnp.where(clipped, radius / jnp.where(clipped, norm, 1.0), 1.0)
    jac = jax.tree_util.tree_map(lambda y: y * scale.astype(y.dtype), jac)
    return jac, clipped


class ForwardMode(AbstractMethod):
    """An unroll differentiated by carrying dw_t/dλ forward. See `bilevel.forward_mode`."""

    method: Unroll
    clip: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.method, Unroll):
            raise TypeError(
                "forward_mode(method, clip=...) requires an unrolled method, "
                f"bilevel.unroll(optimizer, steps); got {type(self.method).__name__}. Forward "
                "mode carries the Jacobian along the optimizer's steps, so there must be steps: "
                "write bilevel.forward_mode(bilevel.unroll(optimizer, steps), clip=r)."
            )
        if self.clip is not None:
            ok = isinstance(self.clip, (int, float)) and not isinstance(self.clip, bool)
            if not ok or not self.clip > 0:
                raise ValueError(
                    "forward_mode(method, clip=r) requires a radius r > 0 (a Python float) or "
                    f"None for no projection; got clip={self.clip!r}. Online Hyper-parameter "
                    "Optimization uses r between 2 and 20, e.g. clip=5.0."
                )

    def _check_batch(self, inner_batch) -> None:
        self.method._check_batch(inner_batch)

    def _allows_complex(self) -> bool:
        return False

    def _trajectory(self, problem, hparams, params0, batch):
        """Run the steps and the Jacobian together: `(params, Y_w, stats)`."""
        unroll, per_step = self.method, isinstance(batch, PerStep)
        basis = vary_like(hparam_basis(hparams), hparams)
        state, jac = initial_tangents(unroll._optimizer, hparams, params0, basis)

        def step(carry, b):
            params, state, jac, clipped = carry
            params, state, jac = tangent_step(problem, unroll._optimizer, hparams, params,
                                              state, jac, b if per_step else batch, basis)
            if self.clip is not None:
                jac, c = project(jac, self.clip)
                clipped = clipped + c.astype(clipped.dtype)
            return (params, state, jac, clipped), None

        carry = vary_like((params0, state, jac, jnp.zeros((), jnp.int32)), hparams, params0, batch)
        xs = batch.batches if per_step else None
        params, _, jac, clipped = jax.lax.scan(step, carry, xs, length=unroll.steps)[0]
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
        stats = grad_norm_stats(problem, params, hparams, _last_batch(batch))
        stats["jacobian_norm"] = tree_norm(jac[0]).astype(dtype)
        stats["clip_fraction"] = clipped.astype(dtype) / unroll.steps
        return params, jac[0], stats

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        return _forward_response(self, problem)(hparams, params0, batch)


_NO_PARAMS0_OR_DATA = (
    "forward_mode carries dw/dλ only: it cannot differentiate with respect to params0 or the "
    "inner batch, and a derivative with respect to them was requested (e.g. jax.grad over "
    "params0, or a jvp with a non-zero batch tangent). Use bilevel.unroll for derivatives with "
    "respect to the initialisation or the data."
)


def _forward_response(method: ForwardMode, problem: Problem):
    """`respond(hparams, params0, batch) -> (params, stats)` with the rule dw = Y dλ at every order.

    The custom JVP is on the whole trajectory `(params, Y, stats)`. Its rule computes the
    primal by calling itself, so enclosing derivatives (`jax.grad` of the value, a Hessian)
    apply the same rule: the derivative of w is always the carried, projected Y, and
    `jax.grad` of the value equals the reported `grad`. The tangent of Y is ordinary forward
    autodiff through the steps (dead code, removed by XLA, unless a second derivative uses
    it): without clipping Y = dw/dλ and every order is exact; with clipping the second
    derivative is that of the projected Jacobian, an approximation (`clip_fraction` > 0).
    """

    def trajectory(hparams, params0, batch):
        return method._trajectory(problem, hparams, params0, batch)

    @jax.custom_jvp
    def run(hparams, params0, batch):
        return trajectory(hparams, params0, batch)

    def run_jvp(primals, tangents):
        hparams, params0, batch = primals
        d_hparams, d_params0, d_batch = tangents
        if not _all_zero((d_params0, d_batch)):
            raise ValueError(_NO_PARAMS0_OR_DATA)
        out = run(hparams, params0, batch)
        params, jac, stats = out
        zeros = jax.tree_util.tree_map(jnp.zeros_like, out)
        if _all_zero(d_hparams):
            return out, zeros
        d_hparams = jax.tree_util.tree_map(
            _instantiate, d_hparams, hparams,
            is_leaf=lambda x: isinstance(x, jax.custom_derivatives.SymbolicZero))
        _, d_jac = jax.jvp(lambda h: trajectory(h, params0, batch)[1], (hparams,), (d_hparams,))
        return out, (contract(jac, d_hparams), d_jac, zeros[2])

    run.defjvp(run_jvp, symbolic_zeros=True)

    def respond(hparams, params0, batch):
        params, _, stats = run(hparams, params0, batch)
        return params, stats

    return respond


def forward_mode(method: Unroll, *, clip: float | None = None) -> ForwardMode:
    """Differentiate an unroll in forward mode, carrying dw_t/dλ along the steps.

    The Jacobian `y_t = dw_t/dλ` (and the tangent of the optimizer state) is updated with
    every optimizer step, `y_{t+1} = P(y_t − η(∂g_T/∂w · y_t + ∂g_T/∂λ))` for SGD and the
    exact linearisation of the step for any other optax optimizer; `y_T` is the derivative
    of the response. Memory does not grow with the number of steps (nothing is stored per
    step); the cost of each step grows with the number of scalar hyperparameters `n` (one
    batched Jacobian-vector product with `n` columns). Prefer it to `unroll` for long runs
    with few hyperparameters.

    With `clip=None`, `P` is the identity and the derivative equals `unroll`'s exactly.
    With `clip=r`, `P` projects `y` on the ball of radius `r`,
    `P(y) = r / max(‖y‖, r) · y`, where `‖·‖` is the norm of the whole Jacobian pytree
    (Online Hyper-parameter Optimization, eq. 9); the optimizer-state tangent is scaled by
    the same factor. Clipping shortens the memory of early, unconverged steps, so the
    estimate is biased but stable.

    Differentiable with respect to `hparams` only (`jax.grad`, `jax.jvp`, `jax.jacfwd`, and
    again for hyper-Hessians); asking for a derivative with respect to `params0` or the inner
    batch raises. Every order of differentiation uses the same rule dw = y_T dλ, so
    `jax.grad` of the returned value equals the reported `grad`. Without `clip` all orders
    are exact. With `clip=r`, once the projection is active (`clip_fraction` > 0) the first
    derivative is the projected estimate (by design) and second derivatives differentiate
    that estimate's Jacobian: an approximation of the true hyper-Hessian, not tested
    against it. The unroll's `checkpoint` setting is not used (there is nothing to store).
    Stats: `inner_grad_norm`, `jacobian_norm` (‖y_T‖ after projection) and `clip_fraction`
    (the fraction of steps at which the projection clipped; 0 with `clip=None`).

    **Arguments:**

    - `method`: a method built by `bilevel.unroll`.
    - `clip`: the projection radius `r > 0`, or `None` for the exact forward-mode derivative.

    **Returns:**

    A method to pass to `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    hg = bl.hypergrad(problem, bl.forward_mode(bl.unroll(optax.sgd(0.1), steps=10_000), clip=5.0))
    out = hg(jnp.asarray(0.3), jnp.zeros(3), None, None)
    print(out.grad, out.stats["clip_fraction"])
    ```
    """
    return ForwardMode(method, clip)
