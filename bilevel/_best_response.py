"""`best_response(hypernet)`: the inner parameters as a learned function w = h_φ(λ).

From Lorraine & Duvenaud, *Stochastic Hyperparameter Optimization through Hypernetworks*.

The forward pass is one call of the hypernet; the derivative is ordinary autodiff through it.
Under `bilevel.implicit` the hypernet's output is only the point where the implicit function
theorem is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import AbstractMethod, grad_norm_stats
from ._problem import PerStep, typed_summary


def check_output(params, template, where: str):
    """The floating-point arrays of a hypernet's output, checked against the params template.

    `template` is params0's array part (non-array leaves replaced by None), as the compiled
    functions pass it to methods.
    """
    arrays = eqx.filter(params, eqx.is_inexact_array)
    want, got = jax.tree_util.tree_flatten(template), jax.tree_util.tree_flatten(arrays)
    same = want[1] == got[1] and all(
        jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(want[0], got[0])
    )
    if not same:
        raise ValueError(
            f"{where}: the hypernet must return parameters with the tree, shapes and dtypes of "
            f"params0 {typed_summary(template)}; it returned {typed_summary(arrays)}. Build it from "
            "a params template like params0 (bilevel.linear_hypernet(params0, hparams)), or "
            "pass the params0 the hypernet was built for."
        )
    return arrays


class BestResponse(AbstractMethod):
    """The inner parameters as a hypernet's output `h_φ(λ)`. See `bilevel.best_response`."""

    hypernet: Callable

    def __check_init__(self):
        if isinstance(self.hypernet, AbstractMethod) or not callable(self.hypernet):
            raise TypeError(
                "best_response(hypernet) requires a hypernet: a callable hparams -> params, "
                "usually an equinox module such as bilevel.linear_hypernet(params0, hparams0) or "
                f"bilevel.mlp_hypernet(params0, hparams0, key=...); got {type(self.hypernet).__name__} "
                f"{self.hypernet!r}."
            )

    def _check_batch(self, inner_batch) -> None:
        if isinstance(inner_batch, PerStep):
            raise ValueError(
                "best_response(hypernet) takes no inner steps, so per_step(...) inner data has no "
                "meaning for it (the inner batch is only used for the stationarity diagnostic). "
                "Pass one training batch, or None."
            )

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        params = check_output(self.hypernet(hparams), params0, "best_response(hypernet)")
        return params, grad_norm_stats(problem, params, hparams, batch)


def best_response(hypernet: Callable) -> BestResponse:
    """Use a hypernetwork's output `w = h_φ(λ)` as the inner parameters.

    The hypernet is a learned best response (Lorraine & Duvenaud): trained so that
    `h_φ(λ) ≈ argmin_w L_T(w, λ)` (see `bilevel.hypertrain_global`,
    `bilevel.hypertrain_local`, `bilevel.hypertrain_simplified`), it replaces the inner
    optimisation by one call, and the hypergradient is autodiff through `h_φ`:
    `dL_V/dλ = ∂L_V/∂λ + (∂h_φ/∂λ)ᵀ ∂L_V/∂w`. The compiled functions keep the signature of
    every other method; `params0` is the template the hypernet's output is checked against
    (tree, shapes, dtypes) and the inner batch is used only for `stats["inner_grad_norm"]`
    (‖∇_w L_T‖ at `h_φ(λ)`, how far the hypernet is from a best response).

    `bilevel.implicit(bilevel.best_response(h), solver)` instead applies the implicit function
    theorem at the point `h_φ(λ)`.

    The hypernet's weights are part of the method. `jax.jit(bl.hypergrad(problem, method))`
    compiles them in as constants; to train or swap hypernets without recompiling, pass the
    method through `equinox.filter_jit` as an argument (the drivers do).

    **Arguments:**

    - `hypernet`: a callable `hparams -> params`, usually an equinox module from
      `bilevel.linear_hypernet` or `bilevel.mlp_hypernet`.

    **Returns:**

    A method to pass to `bilevel.response`, `bilevel.hypergrad`, `bilevel.implicit`,
    `bilevel.hyperopt` or `bilevel.optimize`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    net = bl.linear_hypernet(jnp.zeros(3), jnp.asarray(0.3))
    hg = bl.hypergrad(problem, bl.best_response(net))
    out = hg(jnp.asarray(0.3), jnp.zeros(3), None, None)
    curve = jax.vmap(hg, in_axes=(0, None, None, None))(jnp.linspace(0.0, 1.0, 16), jnp.zeros(3), None, None)
    ```
    """
    return BestResponse(hypernet)
