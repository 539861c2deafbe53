"""A precision policy for `implicit`: inner steps and Hessian-vector products in a low
precision, the backward solve in a higher one (`bilevel.precision`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._problem import Problem

_tmap = jax.tree_util.tree_map


def _dtype(x, name: str, where: str):
    try:
        dt = jnp.dtype(x)
    except TypeError as err:
        raise TypeError(f"{where} requires `{name}` to be a floating dtype such as jnp.bfloat16 or "
                        f"'float32'; got {x!r}.") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{where} requires `{name}` to be a real floating dtype; got {dt.name}. "
                        "Pass jnp.bfloat16, jnp.float16, jnp.float32 or jnp.float64.")
    return dt


def _is_float(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, float)) and jnp.issubdtype(jnp.result_type(x), jnp.floating)


def cast_floats(tree, dtype):
    """Every real floating leaf of `tree` cast to `dtype` (integers, keys and None untouched)."""
    def leaf(x):
        return jnp.asarray(x).astype(dtype) if _is_float(x) else x

    return _tmap(leaf, tree)


class Precision(eqx.Module):
    """Which dtype computes and which accumulates. See `bilevel.precision`."""

    compute: np.dtype = eqx.field(static=True)
    accumulate: np.dtype = eqx.field(static=True)
    loss_scale: float = eqx.field(static=True)

    def __check_init__(self):
        where = "precision(compute, accumulate='float32', loss_scale=1.0)"
        if jnp.finfo(self.accumulate).bits < jnp.finfo(self.compute).bits:
            raise ValueError(f"{where} requires `accumulate` at least as wide as `compute`; got "
                             f"compute={self.compute.name}, accumulate={self.accumulate.name}.")
        if isinstance(self.loss_scale, bool) or not isinstance(self.loss_scale, (int, float)) or not (
                0.0 < float(self.loss_scale) < float("inf")):
            raise ValueError(f"{where} requires a finite `loss_scale` > 0; got {self.loss_scale!r}. "
                             "Pass e.g. loss_scale=2.0**12 for float16, 1.0 otherwise.")
        if float(self.loss_scale) > float(jnp.finfo(self.compute).max):
            raise ValueError(f"{where}: loss_scale={self.loss_scale} overflows the compute dtype "
                             f"{self.compute.name} (largest {float(jnp.finfo(self.compute).max):g}); the scaled "
                             "products are computed in it. Pass a smaller scale, e.g. 2.0**12 for float16.")

    def low(self, problem: Problem, scale: float = 1.0) -> Problem:
        """The problem evaluated in the compute dtype (hyperparameters and data cast too),
        its training loss multiplied by `scale`."""
        c = self.compute

        def wrap(loss, s):
            return lambda w, h, b: s * loss(cast_floats(w, c), cast_floats(h, c), cast_floats(b, c))

        return Problem(inner=wrap(problem.inner, scale), outer=wrap(problem.outer, 1.0))

    def residual(self, condition, problem: Problem):
        """`F(w, h, b)` computed in the compute dtype, returned in the accumulation dtype.

        With a loss scale S the training loss is multiplied by S inside the compute dtype and
        the tangents (forward mode) and cotangents (reverse mode) are scaled by 1/√S on the
        way in and on the way out, in the accumulation dtype, while the values stay those of
        F: whichever way the products are differentiated, the compute dtype sees them √S
        times larger than unscaled, and nothing is divided before it is computed."""
        scaled = self.low(problem, self.loss_scale)
        root = float(self.loss_scale) ** 0.5

        def damp(x, value):
            """`value` with the derivative of `x / root` (the derivative is scaled, not the value)."""
            return jax.lax.stop_gradient(value) + (x - jax.lax.stop_gradient(x)) / root

        def F(w, h, b):
            w_in, h_in, b_in = (_tmap(lambda x: damp(x, x) if _is_float(x) else x, t) if self.loss_scale != 1.0
                                else t for t in cast_floats((w, h, b), self.accumulate))
            out = condition.residual(scaled, cast_floats(w_in, self.compute), h_in, b_in)
            out = _tmap(lambda y: y.astype(self.accumulate), out)
            if self.loss_scale == 1.0:
                return out
            return _tmap(lambda y: damp(y, y / self.loss_scale), out)

        return F


def precision(compute="bfloat16", accumulate="float32", *, loss_scale: float = 1.0) -> Precision:
    """A precision policy for `bilevel.implicit`: low-precision compute, wider accumulation.

    With `implicit(m, ls, precision=bl.precision(jnp.bfloat16))`:

    - the forward method runs in `compute`: `params0`, the hyperparameters and the floating
      data are cast to it, so every inner step (loss, gradient, optimizer update) is a
      bfloat16 computation; the parameters it reaches are cast back to `params0`'s dtype;
    - the implicit backward pass evaluates every Hessian-vector product and the cross
      derivative ∂²L_T/∂λ∂w in `compute`, while the linear solver's vectors, inner products
      and residuals, and the solution, are in `accumulate` (float32): a Krylov method loses
      its orthogonality quickly in bfloat16, the products themselves much less so;
    - `loss_scale` multiplies the training loss inside those products and divides the
      results afterwards in `accumulate`, so small curvatures do not underflow float16
      (bfloat16 has float32's range and needs none). The tangents and cotangents of those
      products are scaled by 1/√S on the way in and out, so both `jax.grad` and `jax.jvp`
      see them √S times larger inside `compute`. The forward steps are not scaled.

    An approximation: the hypergradient carries the rounding of `compute` (about 4e-3
    relative for bfloat16, 5e-4 for float16); the Performance page reports its error against
    float64 on the ridge and digits problems. `stats` are computed in the parameters' dtype
    at the point reached, so `inner_grad_norm` shows how far the low-precision run got.

    **Arguments:**

    - `compute`: the dtype of the inner steps and the products (`jnp.bfloat16`,
      `jnp.float16`, `jnp.float32`, or a name).
    - `accumulate`: the dtype of the solve, at least as wide (default float32).
    - `loss_scale`: a finite factor > 0 for float16 (e.g. 2**12); default 1.

    **Returns:**

    A `Precision` for `bilevel.implicit(..., precision=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    forward = bl.unroll(optax.sgd(0.5), steps=100)
    full = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-6)))
    half = bl.hypergrad(problem, bl.implicit(forward, bl.cg(tol=1e-6), precision=bl.precision(jnp.bfloat16)))
    lam, w0 = jnp.asarray(0.3, jnp.float32), jnp.zeros(3, jnp.float32)
    assert jnp.allclose(half(lam, w0, None, None).grad, full(lam, w0, None, None).grad, rtol=3e-2)
    ```
    """
    where = "precision(compute, accumulate='float32', loss_scale=1.0)"
    return Precision(_dtype(compute, "compute", where), _dtype(accumulate, "accumulate", where), loss_scale)
