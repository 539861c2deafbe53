"""Mixed-mode backward pass of an unroll (MixFlow-MG, Kemaev et al. 2025), `bilevel.mixflow`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._base import AbstractMethod, grad_norm_stats, inner_grad, zero_cotangent
from ._problem import PerStep, Problem
from ._unroll import Unroll, _last_batch, check_reverse_memory


def _differentiable(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _mixflow_response(problem: Problem, unroll: Unroll):
    """`(hparams, params0, batch) -> w_T` whose vector-Jacobian product is exact reverse mode
    with every Hessian product computed forward-over-reverse."""
    steps = unroll.steps
    k = unroll.checkpoint if unroll.checkpoint is not None and unroll.checkpoint < steps else None
    grad = inner_grad(problem)

    def init(h, p0):
        return p0, unroll._optimizer(h).init(p0)

    def step(carry, h, b):
        params, state = carry
        updates, state = unroll._optimizer(h).update(grad(params, h, b), state, params)
        return optax.apply_updates(params, updates), state

    def run(h, carry, batches, n, per_step, shared):
        """`n` steps from `carry`: the final carry and the `n` carries each step started from."""

        def body(c, b):
            return step(c, h, b if per_step else shared), c

        return jax.lax.scan(body, carry, batches, length=n)

    def step_vjp(h, carry, b, adjoint):
        """The cotangents on the (differentiable part of the) carry and on `h` of one step.

        The elementwise optimizer update is differentiated by ordinary reverse mode; the
        cotangent u it leaves on the gradient g = ∇_w L_T(w, λ) is pulled back through g by
        one forward-over-reverse product, jvp of (∇_w L_T, ∇_λ L_T) in direction u:
        H u on w (H is symmetric, so Hᵀu = Hu) and ∂/∂λ ⟨∇_w L_T, u⟩ = (∂∇_λ L_T/∂w) u on λ.
        """
        params, state = carry
        diff, fixed = eqx.partition((params, state), eqx.is_inexact_array)
        h_diff, h_fixed = eqx.partition(h, eqx.is_inexact_array)

        def update(g, d, hd):
            p, s = eqx.combine(d, fixed)
            updates, s = unroll._optimizer(eqx.combine(hd, h_fixed)).update(g, s, p)
            return _differentiable((optax.apply_updates(p, updates), s))

        def both_grads(w):
            return jax.grad(lambda ww, hd: problem.inner(ww, eqx.combine(hd, h_fixed), b),
                            argnums=(0, 1))(w, h_diff)

        (g, _), product = jax.linearize(both_grads, params)   # residuals of this step only
        _, pullback = jax.vjp(update, g, diff, h_diff)
        g_bar, diff_bar, h_bar = pullback(adjoint)
        hvp, mixed = product(g_bar)
        params_bar, state_bar = diff_bar
        params_bar = _add(params_bar, _differentiable(hvp))
        return (params_bar, state_bar), _add(h_bar, mixed)

    def back(h, carries, batches, per_step, shared, acc):
        """Walk stored carries in reverse, applying each step's mixed-mode VJP."""

        def body(acc, xs):
            adjoint, h_bar = acc
            carry, b = xs
            adjoint, h_step = step_vjp(h, carry, b if per_step else shared, adjoint)
            return (adjoint, _add(h_bar, h_step)), None

        return jax.lax.scan(body, acc, (carries, batches), reverse=True)[0]

    def segmented(batch):
        """Per-step batches as (segments, k, ...) and the tail, or Nones."""
        n_seg, rem = divmod(steps, k)
        if not isinstance(batch, PerStep):
            return n_seg, rem, None, None
        bs = batch.batches
        seg = jax.tree_util.tree_map(lambda x: x[: n_seg * k].reshape((n_seg, k) + x.shape[1:]), bs)
        tail = jax.tree_util.tree_map(lambda x: x[n_seg * k:], bs)
        return n_seg, rem, seg, tail

    def forward(h, p0, batch):
        """The final carry and what the backward pass needs: every carry, or (with a
        checkpoint k) the carry at the start of every segment of k steps and of the tail."""
        per_step = isinstance(batch, PerStep)
        carry0 = init(h, p0)
        if k is None:
            return run(h, carry0, batch.batches if per_step else None, steps, per_step, batch)
        n_seg, rem, seg, tail = segmented(batch)

        def segment(c, b):
            return run(h, c, b, k, per_step, batch)[0], c

        carry, starts = jax.lax.scan(segment, carry0, seg, length=n_seg)
        tail_start = carry
        carry = run(h, carry, tail, rem, per_step, batch)[0]
        return carry, (starts, tail_start)

    @jax.custom_vjp
    def respond(h, p0, batch):
        return forward(h, p0, batch)[0][0]

    def respond_fwd(h, p0, batch):
        h = jax.tree_util.tree_map(jnp.asarray, h)   # a Python float is a differentiable leaf too
        carry_T, stored = forward(h, p0, batch)
        return carry_T[0], (h, p0, batch, carry_T, stored)

    def respond_bwd(res, cotangent):
        h, p0, batch, carry_T, stored = res
        per_step = isinstance(batch, PerStep)
        adjoint = (cotangent, jax.tree_util.tree_map(jnp.zeros_like, _differentiable(carry_T[1])))
        h_bar = jax.tree_util.tree_map(jnp.zeros_like, _differentiable(h))
        acc = (adjoint, h_bar)
        if k is None:
            acc = back(h, stored, batch.batches if per_step else None, per_step, batch, acc)
        else:
            starts, tail_start = stored
            _, rem, seg, tail = segmented(batch)
            if rem:
                carries = run(h, tail_start, tail, rem, per_step, batch)[1]
                acc = back(h, carries, tail, per_step, batch, acc)

            def segment_back(acc, xs):
                start, b = xs
                carries = run(h, start, b, k, per_step, batch)[1]   # recompute k carries
                return back(h, carries, b, per_step, batch, acc), None

            acc = jax.lax.scan(segment_back, acc, (starts, seg), reverse=True)[0]
        adjoint_0, h_bar = acc
        h_diff, h_fixed = eqx.partition(h, eqx.is_inexact_array)
        _, pullback = jax.vjp(lambda hd, pp: _differentiable(init(eqx.combine(hd, h_fixed), pp)), h_diff, p0)
        h_init, p0_bar = pullback(adjoint_0)
        h_bar = _add(h_bar, h_init)
        h_bar = jax.tree_util.tree_map(lambda b, x: zero_cotangent(x) if b is None else b, h_bar, h,
                                       is_leaf=lambda x: x is None)
        return h_bar, p0_bar, jax.tree_util.tree_map(zero_cotangent, batch)

    respond.defvjp(respond_fwd, respond_bwd)
    return respond


class MixFlow(AbstractMethod):
    """An unroll whose backward pass uses forward-over-reverse products. See `bilevel.mixflow`."""

    method: Unroll

    def __check_init__(self):
        if not isinstance(self.method, Unroll):
            raise TypeError(
                "mixflow(method) requires an unrolled method, bilevel.unroll(...); got "
                f"{type(self.method).__name__}. MixFlow-MG changes how the steps of an unroll "
                "are differentiated backwards: write bilevel.mixflow(bilevel.unroll(optimizer, steps))."
            )

    def _check_batch(self, inner_batch) -> None:
        self.method._check_batch(inner_batch)

    def _check_memory(self, hparams, params0) -> None:
        # The same iterates are stored as by reverse mode (all, or one per segment and one segment).
        check_reverse_memory(self.method, hparams, params0, self.method.steps,
                             f"mixflow(unroll(steps={self.method.steps}))")

    def _allows_complex(self) -> bool:
        return False

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        params = _mixflow_response(problem, self.method)(hparams, params0, batch)
        return params, grad_norm_stats(problem, params, hparams, _last_batch(batch))

    def _start_refusal(self) -> str | None:
        return None


def mixflow(method: Unroll) -> MixFlow:
    """Exact reverse mode through an unroll with a mixed-mode backward pass (MixFlow-MG).

    The same derivative as `method` itself (the hypergradient of the T-step run), computed
    with less memory. Plain reverse mode through an unroll differentiates each step's
    gradient ∇_w L_T(w_t, λ) by reverse-over-reverse, so it keeps the intermediates of
    every step's gradient computation (the activations of the network and of its backward
    pass, for every step). `mixflow` keeps only the iterates — the parameters and optimizer
    state before every step, or with the unroll's `checkpoint=k` only every k-th, the
    segments being recomputed — and walks the steps backwards: the elementwise optimizer
    update is differentiated by ordinary reverse mode, and the cotangent u it leaves on the
    gradient is pulled back by one forward-over-reverse product (Kemaev et al. 2025,
    "Scalable meta-learning via mixed-mode differentiation"),

        w̄ += H u,   λ̄ += (∂²L_T/∂λ∂w) u,   both from jvp of (∇_w L_T, ∇_λ L_T) at w_t in direction u,

    using the symmetry of the Hessian, which recomputes the gradient's intermediates
    instead of storing them. The gain is largest where a step's activations are large
    compared with the parameters (big batches, wide layers, long sequences); the iterates
    themselves are stored as by reverse mode (use `checkpoint` for those).

    Optimizer settings that are hyperparameters (`unroll(lambda h: optax.adam(h["lr"]),
    ...)`), per-step minibatches (`bilevel.per_step`) and a start point defined by the
    hyperparameters (`Problem(start=...)`, MAML) are differentiated exactly. Reverse mode
    only (a `jax.custom_vjp`): `jax.jvp` and `jax.jacfwd` through it raise. Second derivatives
    by reverse mode (`jax.grad` of the hypergradient) differentiate this backward pass, which
    is itself ordinary JAX code, and equal the unroll's. Real parameters only. The stats are
    the unroll's (`inner_grad_norm`).

    **Arguments:**

    - `method`: a method built by `bilevel.unroll` (its optimizer, steps and `checkpoint`
      are used).

    **Returns:**

    A method to pass to `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    net = lambda w, x: jnp.tanh(x @ w["W1"]) @ w["W2"]
    mse = lambda w, b: jnp.mean((net(w, b[0]) - b[1]) ** 2)
    problem = bl.Problem(inner=lambda w, h, b: mse(w, b) + jnp.exp(h) * jnp.sum(w["W1"] ** 2),
                         outer=lambda w, h, b: mse(w, b))
    x = jax.random.normal(jax.random.key(0), (16, 3))
    data, w0 = (x, jnp.sin(x[:, :1])), {"W1": 0.5 * jnp.ones((3, 8)), "W2": 0.1 * jnp.ones((8, 1))}
    method = bl.unroll(optax.adam(0.01), steps=50)
    exact = bl.hypergrad(problem, method)(-3.0, w0, data, data)
    mixed = bl.hypergrad(problem, bl.mixflow(method))(-3.0, w0, data, data)
    assert jnp.allclose(mixed.grad, exact.grad, rtol=1e-6)
    ```
    """
    return MixFlow(method)
