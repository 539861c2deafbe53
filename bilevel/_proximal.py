"""Forward solvers for nonsmooth and constrained inner problems: proximal and projected gradient."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import AbstractMethod, inner_grad
from ._linear_solvers import _check_count, _check_number, _py
from ._optimality import AbstractProx, ProxFixedPoint, _check_layout
from ._problem import PerStep
from ._unroll import _gib, _nbytes, available_bytes

_tmap = jax.tree_util.tree_map


class ProximalGradient(AbstractMethod):
    """`steps` (accelerated) proximal-gradient steps. See `bilevel.proximal_gradient`."""

    prox: AbstractProx
    stepsize: float = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    accelerate: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        where = "proximal_gradient(prox, stepsize, steps, accelerate=True)"
        if not isinstance(self.prox, AbstractProx):
            raise TypeError(
                f"{where} requires a prox built by bilevel.prox_l1, prox_elastic_net, "
                "prox_group_l1, a bilevel.projection_* or bilevel.prox(fn); got "
                f"{type(self.prox).__name__} {self.prox!r}. Wrap a function with bilevel.prox(fn)."
            )
        _check_number(self.stepsize, "stepsize", where, positive=True)
        _check_count(self.steps, "steps", where, 1)
        if not isinstance(self.accelerate, bool):
            raise TypeError(f"{where} requires `accelerate` to be a bool; got {self.accelerate!r}.")

    def condition(self) -> ProxFixedPoint:
        """The optimality condition this solver converges to (the default under `implicit`)."""
        return ProxFixedPoint(self.prox, self.stepsize)

    def _check_batch(self, inner_batch) -> None:
        if isinstance(inner_batch, PerStep):
            raise ValueError(
                "proximal_gradient(...) takes the full gradient of the smooth part on one batch; "
                "got per_step(...) inner data. Pass one batch (the whole training set)."
            )

    def _check_memory(self, hparams, params0) -> None:
        need = 2 * self.steps * _nbytes(params0)
        free = available_bytes()
        if free is not None and need > free:
            raise MemoryError(
                f"proximal_gradient(steps={self.steps}): reverse-mode differentiation through "
                f"every step stores at least {_gib(need)}, more than the {_gib(free)} free. "
                "Wrap it in bilevel.implicit(...), whose memory does not depend on the steps."
            )

    def _step(self, problem, hparams, batch):
        grad, eta = inner_grad(problem), self.stepsize

        def step(carry, _):
            w, y, t = carry
            v = _tmap(lambda a, g: a - eta * g, y, grad(y, hparams, batch))
            w_new = self.prox(v, hparams, eta)
            _check_layout(w_new, v, "The prox or projection",
                          "Return prox(v) in the layout of v (check broadcasting of the penalty).")
            if not self.accelerate:
                return (w_new, w_new, t), None
            t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
            momentum = ((t - 1.0) / t_new)
            y = _tmap(lambda a, b: a + momentum.astype(a.dtype) * (a - b), w_new, w)
            return (w_new, y, t_new), None

        return step

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        t0 = jnp.ones((), jnp.result_type(*jax.tree_util.tree_leaves(params0)))
        (params, _, _), _ = jax.lax.scan(self._step(problem, hparams, batch),
                                         (params0, params0, t0), None, length=self.steps)
        args = jax.lax.stop_gradient((params, hparams, batch))
        return params, {"optimality_residual": self.condition().residual_norm(problem, *args)}


def proximal_gradient(prox: AbstractProx, stepsize: float, steps: int, *,
                      accelerate: bool = True) -> ProximalGradient:
    """Find the inner parameters by `steps` proximal-gradient steps (FISTA when accelerated).

    For a training loss f(w, λ) + g(w, λ): the problem's `inner` is the smooth part f, and g
    enters through its proximal operator `prox` (`bilevel.prox_l1`, `prox_elastic_net`,
    `prox_group_l1`, a projection, or `bilevel.prox(fn)`):

        w_{k+1} = prox_{ηg}(y_k − η∇f(y_k)),   y_{k+1} = w_{k+1} + (t_k − 1)/t_{k+1} (w_{k+1} − w_k)

    (Beck & Teboulle's FISTA; `accelerate=False` gives plain ISTA, y = w). It converges for
    a convex f with an L-Lipschitz gradient and η ≤ 1/L. On its own the method differentiates
    through every step by autodiff (memory grows with `steps`); under `bilevel.implicit` its
    default condition is the matching proximal-gradient fixed point, restricted to the
    prox's support. Stats: `optimality_residual`, ‖w − prox(w − η∇f)‖/η at the last iterate
    (zero exactly at a solution).

    **Arguments:**

    - `prox`: the proximal operator (or projection) of the nonsmooth part.
    - `stepsize`: η > 0, at most 1/L.
    - `steps`: the number of iterations, >= 1.
    - `accelerate`: Nesterov/FISTA momentum (default True).

    **Returns:**

    A method for `bilevel.implicit`, `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    problem = bl.Problem(inner=lambda w, lam, _: 0.5 * jnp.sum((w - jnp.array([2.0, 0.1])) ** 2),
                         outer=lambda w, lam, _: 0.5 * jnp.sum(w**2))
    lasso = bl.proximal_gradient(bl.prox_l1(strength=jnp.exp), stepsize=1.0, steps=50)
    w = bl.response(problem, lasso)(jnp.log(0.5), jnp.zeros(2), None)   # [1.5, 0.]
    ```
    """
    return ProximalGradient(prox, _py(stepsize), _py(steps), accelerate)


def projected_gradient(projection: AbstractProx, stepsize: float, steps: int, *,
                       accelerate: bool = True) -> ProximalGradient:
    """Minimise the problem's `inner` over a convex set by (accelerated) projected gradient.

    w_{k+1} = P_C(y_k − η∇L_T(y_k)) with a projection from `bilevel.projection_nonneg`,
    `projection_box`, `projection_simplex`, `projection_l2_ball` or `bilevel.projection(fn)`:
    `bilevel.proximal_gradient` with the indicator of C. Under `bilevel.implicit` its default
    condition is `bilevel.projected_fixed_point(projection, stepsize)`.

    **Arguments:**

    - `projection`: the Euclidean projection onto the feasible set.
    - `stepsize`: η > 0, at most 1/L.
    - `steps`: the number of iterations, >= 1.
    - `accelerate`: Nesterov/FISTA momentum (default True).

    **Returns:**

    A method for `bilevel.implicit`, `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    problem = bl.Problem(inner=lambda w, lam, _: 0.5 * jnp.sum((w - lam) ** 2),
                         outer=lambda w, lam, _: jnp.sum(w))
    method = bl.implicit(bl.projected_gradient(bl.projection_nonneg(), stepsize=1.0, steps=20),
                         bl.cg())
    out = bl.hypergrad(problem, method)(jnp.array([1.0, -1.0]), jnp.zeros(2), None, None)
    print(out.grad)    # [1., 0.]: the clipped coordinate does not move
    ```
    """
    return ProximalGradient(projection, _py(stepsize), _py(steps), accelerate)
