"""Optimality conditions: what characterises the inner solution for the implicit function theorem.

A condition is a map F(w, λ, batch) whose zero is the inner solution. `bilevel.implicit`
linearises it at the point the forward method reached and solves

    ∂F/∂w · dw = −∂F/∂λ · dλ.

- `stationary()`: F = ∇_w L_T (smooth, unconstrained; the Jacobian is the symmetric Hessian).
- `prox_fixed_point(prox, stepsize)`: F = w − prox(w − η∇_w f(w, λ), λ, η) for a training loss
  f(w) + g(w, λ) whose nonsmooth part g enters only through its proximal operator.
- `projected_fixed_point(projection, stepsize)`: the same with a projection (g an indicator).
- `kkt(eq, ineq)`: stationarity of the Lagrangian, primal feasibility of the equalities and
  complementary slackness, with the multipliers part of the solution.
- `fixed_point(fn)`: F = w − T(w, λ, batch) for a user map T.

Proxes and projections are small values too (`prox_l1`, `projection_box`, ...). Those whose
Jacobian at the solution vanishes off a *support* (ℓ1, group ℓ1, nonnegativity, box) declare it,
and the backward solve is then restricted to the support: off it dw = −∂F/∂λ·dλ directly (those
rows of the Jacobian are identity rows), on it the reduced system. For the Lasso this is the
closed form dw_S = −(X_SᵀX_S/n)⁻¹ sign(w_S) dλ instead of a near-singular full system, and when
the prox's Jacobian on the support is a multiple of the identity (ℓ1, elastic net, nonnegativity,
box) the reduced system is symmetric, so CG is valid for it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._base import inner_grad, tree_norm, tree_vdot
from ._linear_solvers import _check_number, _py
from ._problem import Problem, tree_summary

_tmap = jax.tree_util.tree_map
PyTree = Any


def _same_layout(a, b) -> bool:
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(jnp.shape(x) == jnp.shape(y)
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _check_layout(got, want, what: str, fix: str) -> None:
    if not _same_layout(got, want):
        raise ValueError(
            f"{what} must return a pytree with the structure and shapes of its input "
            f"{tree_summary(want)}; it returned {tree_summary(got)}. {fix}"
        )


def _check_callable(fn, name: str, where: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{where} requires `{name}` to be a callable {signature}; got "
                        f"{type(fn).__name__} {fn!r}.")


def _like(value, tree):
    """`value` (a scalar, an array, or a pytree shaped like `tree`) as a pytree shaped like `tree`."""
    if jax.tree_util.tree_structure(value) == jax.tree_util.tree_structure(tree):
        return value
    return _tmap(lambda _: value, tree)


def _strength(strength, hparams):
    return hparams if strength is None else strength(hparams)


# --- proximal operators and projections ---------------------------------------------------------


class AbstractProx(eqx.Module):
    """A proximal operator prox_{ηg(·, λ)}(v) (a projection when g is an indicator).

    `flat` says that its Jacobian on the support is a multiple of the identity, which makes
    the support-restricted IFT system of a prox-gradient fixed point symmetric.
    """

    flat: bool = eqx.field(static=True)

    @abc.abstractmethod
    def __call__(self, v, hparams, step):
        """prox_{step·g(·, hparams)}(v), a pytree shaped like `v`."""

    def support(self, w, hparams):
        """Boolean masks (shaped like `w`) of where the Jacobian at the solution `w` is nonzero,
        or None when it is not a projection onto coordinates."""
        del w, hparams
        return None


class _SoftThreshold(AbstractProx):
    l1: Callable | None
    l2: Callable | None

    def __call__(self, v, hparams, step):
        l1 = _like(_strength(self.l1, hparams), v)
        l2 = _like(self.l2(hparams), v) if self.l2 is not None else _tmap(lambda _: 0.0, v)

        def one(x, a, b):
            return jnp.sign(x) * jnp.maximum(jnp.abs(x) - step * a, 0.0) / (1.0 + step * b)

        return _tmap(one, v, l1, l2)

    def support(self, w, hparams):
        return _tmap(lambda x: x != 0, w)


class _GroupL1(AbstractProx):
    strength: Callable | None

    def __call__(self, v, hparams, step):
        lam = _like(_strength(self.strength, hparams), v)

        def one(x, a):
            norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
            safe = jnp.where(norm > 0, norm, 1.0)
            return x * jnp.maximum(1.0 - step * jnp.expand_dims(a, -1) / safe, 0.0)

        return _tmap(one, v, lam)

    def support(self, w, hparams):
        return _tmap(lambda x: jnp.broadcast_to(jnp.any(x != 0, axis=-1, keepdims=True), x.shape), w)


class _Box(AbstractProx):
    lower: Any
    upper: Any

    def _bounds(self, hparams):
        lo = self.lower(hparams) if callable(self.lower) else self.lower
        hi = self.upper(hparams) if callable(self.upper) else self.upper
        return lo, hi

    def __call__(self, v, hparams, step):
        del step
        lo, hi = self._bounds(hparams)
        return optax.projections.projection_box(v, _like(lo, v), _like(hi, v))

    def support(self, w, hparams):
        lo, hi = self._bounds(hparams)
        return _tmap(lambda x, a, b: (x > a) & (x < b), w, _like(lo, w), _like(hi, w))


class _Simplex(AbstractProx):
    radius: Any

    def __call__(self, v, hparams, step):
        del step
        r = self.radius(hparams) if callable(self.radius) else self.radius
        return optax.projections.projection_simplex(v, r)

    def support(self, w, hparams):
        return _tmap(lambda x: x > 0, w)


class _L2Ball(AbstractProx):
    radius: Any

    def __call__(self, v, hparams, step):
        del step
        r = self.radius(hparams) if callable(self.radius) else self.radius
        return optax.projections.projection_l2_ball(v, r)


class _UserProx(AbstractProx):
    fn: Callable
    support_fn: Callable | None
    is_projection: bool = eqx.field(static=True)

    def __call__(self, v, hparams, step):
        return self.fn(v, hparams) if self.is_projection else self.fn(v, hparams, step)

    def support(self, w, hparams):
        if self.support_fn is None:
            return None
        mask = self.support_fn(w, hparams)
        if not _same_layout(mask, w):
            raise ValueError(
                f"The support function of a user prox must return boolean masks shaped like the "
                f"parameters {tree_summary(w)}; it returned {tree_summary(mask)}."
            )
        return _tmap(lambda m: jnp.asarray(m, bool), mask)


def _check_strength(strength, name: str, where: str):
    if strength is not None and not callable(strength):
        raise TypeError(
            f"{where} requires `{name}` to be None (the hyperparameters are the penalty) or a "
            f"callable hparams -> penalty (a scalar, or arrays shaped like the parameters); got "
            f"{type(strength).__name__} {strength!r}. For a fixed penalty write "
            f"`{name}=lambda h: 0.1`; for a log-penalty `{name}=jnp.exp`."
        )
    return strength


def prox_l1(strength: Callable | None = None) -> AbstractProx:
    """The proximal operator of λ‖w‖₁: soft-thresholding, sign(v)·max(|v| − ηλ, 0).

    Its Jacobian at the solution is the 0/1 mask of the support {w ≠ 0}, so
    `prox_fixed_point` restricts the backward solve to the support and the restricted system
    is symmetric (CG is valid).

    **Arguments:**

    - `strength`: a callable `hparams -> λ` (a scalar or arrays shaped like the parameters,
      e.g. `jnp.exp` for a log-penalty); `None` (default) uses the hyperparameters themselves.

    **Returns:**

    A prox for `bilevel.prox_fixed_point` and `bilevel.proximal_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    prox = bl.prox_l1(strength=jnp.exp)
    print(prox(jnp.array([2.0, -0.5, 0.1]), jnp.log(0.4), 1.0))   # [1.6, -0.1, 0.]
    ```
    """
    return _SoftThreshold(True, _check_strength(strength, "strength", "prox_l1(strength)"), None)


def prox_elastic_net(l1: Callable | None, l2: Callable) -> AbstractProx:
    """The proximal operator of λ₁‖w‖₁ + ½λ₂‖w‖²: soft-thresholding then shrinking by 1/(1 + ηλ₂).

    Restricted to the support {w ≠ 0} its Jacobian is 1/(1 + ηλ₂)·I, so the restricted
    backward system is symmetric (CG is valid).

    **Arguments:**

    - `l1`: a callable `hparams -> λ₁` (or `None`: the hyperparameters themselves).
    - `l2`: a callable `hparams -> λ₂`.

    **Returns:**

    A prox for `bilevel.prox_fixed_point` and `bilevel.proximal_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    prox = bl.prox_elastic_net(l1=lambda h: jnp.exp(h[0]), l2=lambda h: jnp.exp(h[1]))
    w = prox(jnp.array([2.0, -0.5]), jnp.log(jnp.array([0.5, 1.0])), 1.0)   # [0.75, 0.]
    ```
    """
    where = "prox_elastic_net(l1, l2)"
    _check_strength(l1, "l1", where)
    if not callable(l2):
        raise TypeError(f"{where} requires `l2` to be a callable hparams -> λ₂; got "
                        f"{type(l2).__name__} {l2!r}. For a fixed value write `l2=lambda h: 0.1`.")
    return _SoftThreshold(True, l1, l2)


def prox_group_l1(strength: Callable | None = None) -> AbstractProx:
    """The proximal operator of λ Σ_g ‖w_g‖₂ (group Lasso), groups along each leaf's last axis.

    A leaf of shape `(G, d)` holds G groups of d coordinates; a 1-D leaf is one group. Block
    soft-thresholding w_g = v_g·max(1 − ηλ/‖v_g‖, 0). The backward solve is restricted to the
    groups that are nonzero; there the Jacobian is not a multiple of the identity, so the
    restricted system is not symmetric (use `gmres`, `bicgstab`, `normal_cg` or `exact`).

    **Arguments:**

    - `strength`: a callable `hparams -> λ` (a scalar, or per-group arrays of shape
      `leaf.shape[:-1]`); `None` uses the hyperparameters themselves.

    **Returns:**

    A prox for `bilevel.prox_fixed_point` and `bilevel.proximal_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    w = bl.prox_group_l1()(jnp.array([[3.0, 4.0], [0.1, 0.1]]), 1.0, 1.0)   # [[2.4, 3.2], [0, 0]]
    ```
    """
    return _GroupL1(False, _check_strength(strength, "strength", "prox_group_l1(strength)"))


def prox(fn: Callable, *, support: Callable | None = None, flat: bool = False) -> AbstractProx:
    """Use your own proximal operator `fn(v, hparams, step) -> w`.

    **Arguments:**

    - `fn`: prox_{step·g(·, hparams)}(v), returning a pytree shaped like `v`.
    - `support`: optional `(w, hparams) -> boolean masks shaped like w`: where the prox's
      Jacobian at the solution is nonzero, when it is zero elsewhere (the backward solve is
      then restricted to it).
    - `flat`: True when the Jacobian on the support is a multiple of the identity (with a
      `support`, the restricted system is then symmetric and CG may be used).

    **Returns:**

    A prox for `bilevel.prox_fixed_point` and `bilevel.proximal_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    # λ‖w‖₁ restricted to w >= 0: one-sided soft-thresholding.
    nonneg_l1 = bl.prox(lambda v, lam, step: jnp.maximum(v - step * lam, 0.0),
                        support=lambda w, lam: w > 0, flat=True)
    ```
    """
    where = "prox(fn, support=None, flat=False)"
    _check_callable(fn, "fn", where, "(v, hparams, step) -> w")
    if support is not None:
        _check_callable(support, "support", where, "(w, hparams) -> boolean masks")
    if not isinstance(flat, bool):
        raise TypeError(f"{where} requires `flat` to be a bool; got {flat!r}.")
    return _UserProx(flat, fn, support, False)


def _check_bound(value, name: str, where: str):
    if callable(value) or isinstance(value, (int, float)) or hasattr(value, "shape"):
        return _py(value)
    raise TypeError(f"{where} requires `{name}` to be a number, an array or a callable "
                    f"hparams -> bound; got {type(value).__name__} {value!r}.")


def projection_nonneg() -> AbstractProx:
    """Projection onto the nonnegative orthant, max(v, 0) (`optax.projections`).

    The backward solve is restricted to {w > 0}, where the Jacobian is the identity.

    **Returns:**

    A projection for `bilevel.projected_fixed_point` and `bilevel.projected_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    print(bl.projection_nonneg()(jnp.array([1.0, -2.0]), None, 1.0))   # [1., 0.]
    ```
    """
    return _Box(True, 0.0, jnp.inf)


def projection_box(lower, upper) -> AbstractProx:
    """Projection onto the box lower ≤ w ≤ upper (`optax.projections.projection_box`).

    The backward solve is restricted to the coordinates strictly inside the box.

    **Arguments:**

    - `lower`, `upper`: numbers, arrays shaped like the parameters (or pytrees of them), or
      callables `hparams -> bound` (bounds that are hyperparameters).

    **Returns:**

    A projection for `bilevel.projected_fixed_point` and `bilevel.projected_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    box = bl.projection_box(-1.0, 1.0)
    print(box(jnp.array([2.0, 0.5]), None, 1.0))   # [1., 0.5]
    ```
    """
    where = "projection_box(lower, upper)"
    lower, upper = _check_bound(lower, "lower", where), _check_bound(upper, "upper", where)
    if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and not lower < upper:
        raise ValueError(f"{where} requires lower < upper; got lower={lower}, upper={upper}.")
    return _Box(True, lower, upper)


def projection_simplex(radius=1.0) -> AbstractProx:
    """Projection onto the simplex {w ≥ 0, Σw = radius} over all leaves together
    (`optax.projections.projection_simplex`).

    The backward solve is restricted to {w > 0}; there the Jacobian is the projection onto
    {Σ dw = 0}, not the identity, so the system is not symmetric (use `gmres`, `bicgstab`,
    `normal_cg` or `exact`).

    **Arguments:**

    - `radius`: the sum, > 0 (a number or a callable `hparams -> radius`).

    **Returns:**

    A projection for `bilevel.projected_fixed_point` and `bilevel.projected_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    print(bl.projection_simplex()(jnp.array([0.9, 0.5, -1.0]), None, 1.0))   # [0.7, 0.3, 0.]
    ```
    """
    radius = _check_bound(radius, "radius", "projection_simplex(radius)")
    if isinstance(radius, (int, float)):
        _check_number(radius, "radius", "projection_simplex(radius)", positive=True)
    return _Simplex(False, radius)


def projection_l2_ball(radius=1.0) -> AbstractProx:
    """Projection onto the ball ‖w‖₂ ≤ radius over all leaves together
    (`optax.projections.projection_l2_ball`).

    Its Jacobian on the sphere is not a coordinate projection: no support restriction, and
    the backward system is not symmetric (use `gmres`, `bicgstab`, `normal_cg` or `exact`).

    **Arguments:**

    - `radius`: > 0, a number or a callable `hparams -> radius`.

    **Returns:**

    A projection for `bilevel.projected_fixed_point` and `bilevel.projected_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    print(bl.projection_l2_ball(1.0)(jnp.array([3.0, 4.0]), None, 1.0))   # [0.6, 0.8]
    ```
    """
    radius = _check_bound(radius, "radius", "projection_l2_ball(radius)")
    if isinstance(radius, (int, float)):
        _check_number(radius, "radius", "projection_l2_ball(radius)", positive=True)
    return _L2Ball(False, radius)


def projection(fn: Callable, *, support: Callable | None = None, flat: bool = False) -> AbstractProx:
    """Use your own projection `fn(v, hparams) -> w` (onto a set that may depend on λ).

    **Arguments:**

    - `fn`: the Euclidean projection of `v`, a pytree shaped like `v`.
    - `support`: optional `(w, hparams) -> boolean masks`: where the projection's Jacobian at
      the solution is nonzero, when it is zero elsewhere.
    - `flat`: True when that Jacobian is the identity on the support.

    **Returns:**

    A projection for `bilevel.projected_fixed_point` and `bilevel.projected_gradient`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    upper = bl.projection(lambda v, cap: jnp.minimum(v, cap), support=lambda w, cap: w < cap,
                          flat=True)
    ```
    """
    where = "projection(fn, support=None, flat=False)"
    _check_callable(fn, "fn", where, "(v, hparams) -> w")
    if support is not None:
        _check_callable(support, "support", where, "(w, hparams) -> boolean masks")
    if not isinstance(flat, bool):
        raise TypeError(f"{where} requires `flat` to be a bool; got {flat!r}.")
    return _UserProx(flat, fn, support, True)


# --- conditions ---------------------------------------------------------------------------------


class AbstractCondition(eqx.Module):
    """What characterises the inner solution: F(w, λ, batch) = 0. See `bilevel.implicit`."""

    @abc.abstractmethod
    def residual(self, problem: Problem, params, hparams, batch) -> PyTree:
        """F(w, λ, batch), a pytree shaped like `params`."""

    @abc.abstractmethod
    def symmetric(self) -> bool:
        """Whether the (support-restricted) linear system ∂F/∂w is symmetric."""

    def support(self, problem: Problem, params, hparams, batch):
        """Boolean masks restricting the backward solve, or None."""
        del problem, params, hparams, batch
        return None

    def residual_norm(self, problem: Problem, params, hparams, batch) -> jax.Array:
        """The reported `optimality_residual` ‖F‖ (in gradient units where that applies)."""
        return tree_norm(self.residual(problem, params, hparams, batch))


class Stationary(AbstractCondition):
    """∇_w L_T(w, λ) = 0. See `bilevel.stationary`."""

    def residual(self, problem, params, hparams, batch):
        return inner_grad(problem)(params, hparams, batch)

    def symmetric(self) -> bool:
        return True


class ProxFixedPoint(AbstractCondition):
    """w = prox(w − η∇f(w, λ), λ, η). See `bilevel.prox_fixed_point`."""

    prox: AbstractProx
    stepsize: float = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.prox, AbstractProx):
            raise TypeError(
                "prox_fixed_point(prox, stepsize) requires a prox built by bilevel.prox_l1, "
                "prox_elastic_net, prox_group_l1, projection_* or bilevel.prox(fn); got "
                f"{type(self.prox).__name__} {self.prox!r}. Wrap a function with bilevel.prox(fn)."
            )
        _check_number(self.stepsize, "stepsize", "prox_fixed_point(prox, stepsize)", positive=True)

    def _step(self, problem, params, hparams, batch):
        """prox(w − η∇f(w)): the proximal-gradient map at w."""
        eta = self.stepsize
        g = inner_grad(problem)(params, hparams, batch)
        v = _tmap(lambda w, gi: w - eta * gi, params, g)
        out = self.prox(v, hparams, eta)
        _check_layout(out, v, "The prox or projection",
                      "Return prox(v) in the layout of v (check broadcasting of the penalty).")
        return out

    def residual(self, problem, params, hparams, batch):
        return _tmap(jnp.subtract, params, self._step(problem, params, hparams, batch))

    def residual_norm(self, problem, params, hparams, batch):
        return tree_norm(self.residual(problem, params, hparams, batch)) / self.stepsize

    def symmetric(self) -> bool:
        return self.prox.flat and _has_support(self.prox)

    def support(self, problem, params, hparams, batch):
        # Read off the map's output rather than w itself: a solution from another solver with
        # tiny nonzeros where the prox gives exact zeros still gets the prox's support.
        return self.prox.support(self._step(problem, params, hparams, batch), hparams)


def _has_support(p: AbstractProx) -> bool:
    if isinstance(p, _UserProx):
        return p.support_fn is not None
    return not isinstance(p, _L2Ball)


class KKT(AbstractCondition):
    """KKT conditions with multipliers in the solution. See `bilevel.kkt`."""

    eq: Callable | None
    ineq: Callable | None

    def __check_init__(self):
        where = "kkt(eq=None, ineq=None)"
        if self.eq is None and self.ineq is None:
            raise ValueError(f"{where} requires at least one of `eq`, `ineq`; got neither. "
                             "An unconstrained problem needs no multipliers: use the default "
                             "condition (bilevel.stationary()).")
        for name in ("eq", "ineq"):
            fn = getattr(self, name)
            if fn is not None:
                _check_callable(fn, name, where, "(w, hparams, batch) -> array")

    def _split(self, params):
        if not (isinstance(params, (tuple, list)) and len(params) == 3):
            raise ValueError(
                "kkt(...) requires the parameters to be the triple (w, eq_multipliers, "
                f"ineq_multipliers), with None for an absent group; got {tree_summary(params)}. "
                "Pass params0=(w0, nu0, mu0) and return the triple from the forward solver."
            )
        w, nu, mu = params
        for fn, mult, name in ((self.eq, nu, "eq"), (self.ineq, mu, "ineq")):
            if (fn is None) != (mult is None):
                raise ValueError(
                    f"kkt(...): the {name} multipliers are {tree_summary(mult)} but `{name}` is "
                    f"{'None' if fn is None else 'given'}. Give a multiplier array exactly when "
                    f"the constraint function `{name}` is given (None otherwise)."
                )
        return w, nu, mu

    def _constraint(self, fn, mult, name, w, hparams, batch):
        value = fn(w, hparams, batch)
        if not _same_layout(value, mult):
            raise ValueError(
                f"kkt(...): `{name}(w, hparams, batch)` returned {tree_summary(value)}, but its "
                f"multipliers in the parameters are {tree_summary(mult)}. Give one multiplier per "
                "constraint, shaped like the constraint's output."
            )
        return value

    def residual(self, problem, params, hparams, batch):
        w, nu, mu = self._split(params)

        def lagrangian(w_):
            total = problem.inner((w_, nu, mu), hparams, batch)
            if nu is not None:
                total = total + tree_vdot(nu, self._constraint(self.eq, nu, "eq", w_, hparams, batch))
            if mu is not None:
                total = total + tree_vdot(mu, self._constraint(self.ineq, mu, "ineq", w_, hparams, batch))
            return total

        grad_w = jax.grad(lagrangian)(w)
        eq = None if nu is None else self._constraint(self.eq, nu, "eq", w, hparams, batch)
        slack = None if mu is None else _tmap(
            jnp.multiply, mu, self._constraint(self.ineq, mu, "ineq", w, hparams, batch))
        return (grad_w, eq, slack)

    def symmetric(self) -> bool:
        return False


class FixedPoint(AbstractCondition):
    """w = T(w, λ, batch). See `bilevel.fixed_point`."""

    fn: Callable

    def __check_init__(self):
        _check_callable(self.fn, "fn", "fixed_point(fn)", "(params, hparams, batch) -> params")

    def residual(self, problem, params, hparams, batch):
        del problem
        out = self.fn(params, hparams, batch)
        _check_layout(out, params, "fixed_point(fn): fn(params, hparams, batch)",
                      "Return T(w) in the layout of params.")
        return _tmap(jnp.subtract, params, out)

    def symmetric(self) -> bool:
        return False


def stationary() -> Stationary:
    """The inner solution is a stationary point of the training loss: ∇_w L_T(w, λ) = 0.

    The default condition of `bilevel.implicit` (for smooth unconstrained inner problems). Its
    Jacobian is the inner Hessian, symmetric, so every linear solver applies.

    **Returns:**

    A condition for `bilevel.implicit(..., condition=...)`.

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=100), bl.cg(), condition=bl.stationary())
    ```
    """
    return Stationary()


def prox_fixed_point(prox: AbstractProx, stepsize: float = 1.0) -> ProxFixedPoint:
    """The solution is a proximal-gradient fixed point: w = prox_{ηg}(w − η∇_w f(w, λ)).

    For a training loss f(w, λ) + g(w, λ) with f smooth (the problem's `inner`) and g
    nonsmooth, given by its prox (`bilevel.prox_l1`, `prox_elastic_net`, `prox_group_l1`,
    a projection, or `bilevel.prox(fn)`); both may depend on λ. When the prox declares a
    support, the backward solve is restricted to it (see `bilevel.implicit`); the system is
    symmetric when the prox is flat on its support (ℓ1, elastic net, nonnegativity, box), and
    otherwise needs `gmres`, `bicgstab`, `normal_cg` or `exact`. The fixed points do not
    depend on η > 0; any η the forward solver would converge with is a good choice. The
    reported `optimality_residual` is ‖w − prox(w − η∇f)‖/η, the norm of the gradient mapping.

    **Arguments:**

    - `prox`: the proximal operator of the nonsmooth part.
    - `stepsize`: η > 0.

    **Returns:**

    A condition for `bilevel.implicit(..., condition=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    lasso = bl.prox_fixed_point(bl.prox_l1(strength=jnp.exp), stepsize=0.1)
    ```
    """
    return ProxFixedPoint(prox, _py(stepsize))


def projected_fixed_point(projection: AbstractProx, stepsize: float = 1.0) -> ProxFixedPoint:
    """The solution is a projected-gradient fixed point: w = P_C(w − η∇_w L_T(w, λ)).

    For minimising the problem's `inner` over a convex set C given by its projection
    (`bilevel.projection_nonneg`, `projection_box`, `projection_simplex`,
    `projection_l2_ball`, or `bilevel.projection(fn)`); the set may depend on λ. The same
    condition as `prox_fixed_point` with the indicator of C.

    **Arguments:**

    - `projection`: the Euclidean projection onto C.
    - `stepsize`: η > 0.

    **Returns:**

    A condition for `bilevel.implicit(..., condition=...)`.

    **Example:**

    ```python
    import bilevel as bl

    nonneg = bl.projected_fixed_point(bl.projection_nonneg(), stepsize=0.5)
    ```
    """
    return ProxFixedPoint(projection, _py(stepsize))


def kkt(eq: Callable | None = None, ineq: Callable | None = None) -> KKT:
    """Karush–Kuhn–Tucker conditions of min_w L_T s.t. eq(w) = 0, ineq(w) ≤ 0.

    The parameters are the triple `(w, ν, μ)`: the primal variables and the multipliers of
    the equality and inequality constraints (`None` for an absent group). `params0`, the
    forward solver's output, the response and the losses' first argument are all this
    triple; the losses use `params[0]`. The conditions are

        ∇_w [L_T + νᵀ eq(w) + μᵀ ineq(w)] = 0,   eq(w) = 0,   μ ⊙ ineq(w) = 0,

    differentiated at the solution (strict complementarity assumed: every active inequality
    has μ > 0). The Jacobian is not symmetric: use `exact`, `gmres`, `bicgstab` or `normal_cg`.

    **Arguments:**

    - `eq`: `(w, hparams, batch) -> array` of equality constraints (= 0), or None.
    - `ineq`: `(w, hparams, batch) -> array` of inequality constraints (≤ 0), or None.

    **Returns:**

    A condition for `bilevel.implicit(..., condition=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    def closest_on_line(lam, params0, batch):     # min ½‖w − λ‖² s.t. w₀ + w₁ = 1
        w = lam - (jnp.sum(lam) - 1.0) / 2.0
        return (w, jnp.atleast_1d(jnp.sum(lam) - 1.0) / 2.0, None)

    problem = bl.Problem(inner=lambda p, lam, _: 0.5 * jnp.sum((p[0] - lam) ** 2),
                         outer=lambda p, lam, _: p[0][0])
    method = bl.implicit(bl.solver(closest_on_line), bl.exact(),
                         condition=bl.kkt(eq=lambda w, lam, _: jnp.atleast_1d(jnp.sum(w) - 1.0)))
    params0 = (jnp.zeros(2), jnp.zeros(1), None)
    out = bl.hypergrad(problem, method)(jnp.array([0.2, 0.4]), params0, None, None)
    print(out.grad)    # [0.5, -0.5]
    ```
    """
    return KKT(eq, ineq)


def fixed_point(fn: Callable) -> FixedPoint:
    """The solution is a fixed point of a map: w = T(w, λ, batch).

    For deep-equilibrium layers and any iteration of your own. The problem's `inner` loss
    plays no part in the derivative (it only feeds the forward method). The Jacobian I − ∂T/∂w
    is not symmetric: use `exact`, `gmres`, `bicgstab`, `normal_cg` or `neumann` (which is
    the fixed-point iteration on the tangent and converges for a contraction).

    **Arguments:**

    - `fn`: T, `(params, hparams, batch) -> params`.

    **Returns:**

    A condition for `bilevel.implicit(..., condition=...)`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel as bl

    T = lambda w, lam, _: 0.5 * jnp.tanh(w) + lam
    solve = bl.solver(lambda lam, w0, b: jax.lax.fori_loop(0, 100, lambda _, w: T(w, lam, b), w0))
    method = bl.implicit(solve, bl.gmres(tol=1e-10), condition=bl.fixed_point(T))
    ```
    """
    return FixedPoint(fn)
