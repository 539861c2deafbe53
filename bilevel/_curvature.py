"""Gauss-Newton curvature for implicit differentiation: `bilevel.gauss_newton`."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import inner_grad
from ._problem import Problem

_tmap = jax.tree_util.tree_map


def _half_squared_norm(z, hparams, batch):
    del hparams, batch
    return 0.5 * sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(z))


class GaussNewton(eqx.Module):
    """The generalised Gauss-Newton matrix as the IFT's curvature. See `bilevel.gauss_newton`."""

    model: Callable = eqx.field(static=True)
    loss: Callable = eqx.field(static=True)

    def __check_init__(self):
        for name in ("model", "loss"):
            fn = getattr(self, name)
            if not callable(fn):
                raise TypeError(
                    f"gauss_newton(model, loss=None) requires `{name}` to be a function "
                    f"{'(params, hparams, batch) -> outputs' if name == 'model' else '(outputs, hparams, batch) -> scalar'}; "
                    f"got {type(fn).__name__} {fn!r}."
                )

    def _gradient_map(self, problem: Problem, anchor) -> Callable:
        """`(w, h, b) -> ∇_w L_T(w) − J_m(w)ᵀ ∇_z ℓ(m(anchor))`, whose Jacobian in w at
        w = anchor is the Hessian with the model's second-order term Σ_k ∂ℓ/∂z_k ∇²m_k
        removed: J_mᵀ ∇²ℓ J_m plus the exact Hessian of the rest of the loss."""
        anchor = jax.lax.stop_gradient(anchor)

        def F(w, h, b):
            g0 = jax.lax.stop_gradient(jax.grad(self.loss)(self.model(anchor, h, b), h, b))
            _, pullback = jax.vjp(lambda p: self.model(p, h, b), w)
            (model_term,) = pullback(g0)
            return _tmap(jnp.subtract, inner_grad(problem)(w, h, b), model_term)

        return F


def gauss_newton(model: Callable, loss: Callable | None = None) -> GaussNewton:
    """Gauss-Newton curvature (Larsen et al. 1996) in place of the Hessian of `bilevel.implicit`.

    Write the training loss as a loss ℓ of a model's outputs plus the rest R (a penalty):
    L_T(w, λ) = ℓ(m(w, λ, b), λ, b) + R(w, λ, b). Its Hessian is

        H = J_mᵀ ∇²ℓ J_m + Σ_k (∂ℓ/∂z_k) ∇²m_k + ∇²R,

    and the (generalised) Gauss-Newton matrix drops the middle term, the model's own
    curvature weighted by the residuals: G = J_mᵀ ∇²ℓ J_m + ∇²R. `implicit(..., hessian=
    gauss_newton(m, ℓ))` solves with G instead of H; the cross derivative ∂²L_T/∂λ∂w and
    everything else stay exact. R is never written down: G v is computed as H v minus the
    dropped term, so the inner loss is the problem's own (it must equal ℓ∘m + R for some R
    whose Hessian you want kept exactly; typically R is the penalty).

    When G = H the hypergradient is exact: for a model linear in w (least squares, logistic
    and softmax regression: there G is also the Fisher information of the canonical link),
    and for nonlinear least squares at zero residual (ℓ = ½‖z‖², m the residuals, m(w*) = 0).
    Elsewhere it is an approximation whose error grows with the residuals; in exchange G is
    positive semi-definite wherever ℓ is convex and R's Hessian is, so CG stays valid on a
    network whose Hessian is indefinite. The stats add `gauss_newton` (True). Each product
    G v costs about two Hessian-vector products (H v and the dropped term).

    **Arguments:**

    - `model`: `(params, hparams, batch) -> outputs` (any pytree of arrays), the part of the
      training loss whose second-order term is dropped: residuals, predictions or logits.
    - `loss`: `(outputs, hparams, batch) -> scalar`, the loss of the outputs; default
      ½‖outputs‖² (least squares: `model` returns the residuals).

    **Returns:**

    A `GaussNewton` value for `bilevel.implicit(..., hessian=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    def residuals(w, lam, b):                 # a model nonlinear in w, fitted exactly at w*
        return w + 0.3 * jnp.tanh(w) - lam

    problem = bl.Problem(inner=lambda w, lam, b: 0.5 * jnp.sum(residuals(w, lam, b) ** 2),
                         outer=lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2))
    method = bl.implicit(bl.solver(lambda lam, w0, b: w0), bl.exact())   # w0 is w*
    gn = bl.implicit(bl.solver(lambda lam, w0, b: w0), bl.exact(), hessian=bl.gauss_newton(residuals))
    w_star = jnp.array([0.4, 1.7])
    lam = w_star + 0.3 * jnp.tanh(w_star)    # so that w_star fits exactly: zero residual
    exact = bl.hypergrad(problem, method)(lam, w_star, None, None)
    approx = bl.hypergrad(problem, gn)(lam, w_star, None, None)
    assert jnp.allclose(approx.grad, exact.grad, rtol=1e-4)   # zero residual: G = H
    ```
    """
    return GaussNewton(model, _half_squared_norm if loss is None else loss)
