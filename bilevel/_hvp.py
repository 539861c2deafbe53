"""How `implicit` multiplies by the Hessian: forward-over-reverse, reverse-over-reverse, or a
finite difference of gradients (`bilevel.finite_difference`)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import tree_norm, tree_vdot

_tmap = jax.tree_util.tree_map
HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")


class FiniteDifference(eqx.Module):
    """A Hessian-vector product by differences of gradients. See `bilevel.finite_difference`."""

    epsilon: float = eqx.field(static=True)
    central: bool = eqx.field(static=True)

    def __check_init__(self):
        where = "finite_difference(epsilon=1e-4, central=True)"
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)):
            raise TypeError(f"{where} requires `epsilon` to be a Python float; got "
                            f"{type(self.epsilon).__name__} {self.epsilon!r}. Pass e.g. epsilon=1e-4.")
        if not (0.0 < float(self.epsilon) < float("inf")):
            raise ValueError(f"{where} requires a finite `epsilon` > 0 (the step along the unit "
                             f"direction); got epsilon={self.epsilon}. Pass e.g. epsilon=1e-4 in float64, "
                             "1e-2 in float32.")
        if not isinstance(self.central, bool):
            raise TypeError(f"{where} requires `central` to be True or False; got {self.central!r}.")


def check_hvp(hvp, symmetric: bool) -> None:
    """Raise unless `hvp` is a known choice that is valid for the condition's system."""
    if not (isinstance(hvp, FiniteDifference) or (isinstance(hvp, str) and hvp in HVP_MODES)):
        raise ValueError(
            "implicit(..., hvp=...) requires 'forward_over_reverse' (the default: jax.linearize of "
            "the gradient), 'reverse_over_reverse' (jax.grad of ⟨∇L_T, v⟩) or "
            f"bilevel.finite_difference(epsilon); got {hvp!r}."
        )
    if hvp != "forward_over_reverse" and not symmetric:
        name = "finite_difference(...)" if isinstance(hvp, FiniteDifference) else repr(hvp)
        raise ValueError(
            f"implicit(..., hvp={name}) is only valid for a symmetric linear system (stationarity, "
            "or a prox flat on its support): reverse-over-reverse computes Jᵀv, not Jv, and a "
            "finite difference cannot be transposed. Use hvp='forward_over_reverse' for this condition."
        )


def matvec(hvp, F: Callable, params) -> Callable:
    """`v -> J v` with J the Jacobian of `F` at `params`, computed as `hvp` says."""
    if hvp == "forward_over_reverse":
        return jax.linearize(F, params)[1]
    if hvp == "reverse_over_reverse":
        return lambda v: jax.grad(lambda w: tree_vdot(F(w), v))(params)
    return _finite_difference(hvp, F, params)


def _finite_difference(fd: FiniteDifference, F: Callable, params) -> Callable:
    base = None if fd.central else F(params)

    def mv(v):
        norm = tree_norm(v)
        scale = jnp.where(norm > 0, norm, 1.0)

        def shifted(sign):
            return F(_tmap(lambda w, x: w + (sign * fd.epsilon / scale).astype(w.dtype) * x, params, v))

        upper = shifted(1.0)
        if fd.central:
            diff = _tmap(lambda a, b: (a - b) / (2 * fd.epsilon), upper, shifted(-1.0))
        else:
            diff = _tmap(lambda a, b: (a - b) / fd.epsilon, upper, base)
        return _tmap(lambda d: jnp.where(norm > 0, d * scale.astype(d.dtype), jnp.zeros_like(d)), diff)

    return mv


def finite_difference(epsilon: float = 1e-4, *, central: bool = True) -> FiniteDifference:
    """Hessian-vector products for `bilevel.implicit` by differences of gradients.

    `implicit(..., hvp=bl.finite_difference(ε))` multiplies by the Hessian as

        H v ≈ ‖v‖ (∇L_T(w + ε v̂) − ∇L_T(w − ε v̂)) / (2ε),     v̂ = v / ‖v‖

    (DARTS, Liu et al. 2019; SAMA, Choe et al. 2023), two gradient evaluations and no second
    derivatives: the choice when a loss is not twice differentiable by JAX (a custom kernel
    with only a first derivative) or second-order autodiff is too costly. `central=False`
    uses the one-sided (∇L_T(w + εv̂) − ∇L_T(w)) / ε with the gradient at w computed once.

    An approximation: the central difference has error O(ε²) (one-sided O(ε)) from the third
    derivatives, plus rounding of order (machine epsilon)·‖∇L_T‖/ε, so ε near
    (machine epsilon)^(1/3) is a good start (1e-4 to 1e-5 in float64, about 1e-2 in float32).
    The stats add `finite_difference_hvp` (True). Valid for symmetric systems only (the
    stationarity condition, or a prox flat on its support).

    **Arguments:**

    - `epsilon`: the step along the unit direction, a float > 0.
    - `central`: central (default) or one-sided difference.

    **Returns:**

    A `FiniteDifference` for `bilevel.implicit(..., hvp=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: jnp.sum(jnp.cosh(w - 1.0)) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    forward = bl.unroll(optax.sgd(0.2), steps=200)
    exact = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-12)))(0.3, jnp.zeros(3), None, None)
    fd = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-12), hvp=bl.finite_difference(1e-2)))(
        0.3, jnp.zeros(3), None, None)
    assert jnp.allclose(fd.grad, exact.grad, rtol=1e-3) and fd.stats["finite_difference_hvp"]
    ```
    """
    return FiniteDifference(epsilon, central)
