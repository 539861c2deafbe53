"""Implicit differentiation: `implicit(method, linear_solver)` and user forward solvers.

The derivative is a JVP rule (`jax.custom_jvp`) whose tangent is a transposable linear
solve (`jax.lax.custom_linear_solve`), so `jax.jvp` and `jax.grad` both work, in the
style of `jax.lax.custom_root` and optimistix's `implicit_jvp`:

    dw = -H⁻¹ (∂g/∂λ dλ + ∂g/∂batch dbatch),   g = ∇_w L_T,  H = ∂g/∂w at w*.

Diagnostics of the backward solve: reverse mode runs the solve only in the transpose of
the JVP rule, where nothing but cotangents can leave. The solve is therefore posed on an
augmented system (x, s) whose second block is the identity on a "probe" of zero scalars;
the solver writes its stats into that block, so they arrive as the probe's cotangent.
`bilevel.hypergrad` differentiates with respect to the probe and reports them.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ._base import AbstractMethod, grad_norm_stats
from ._best_response import BestResponse
from ._linear_solvers import AbstractLinearSolver
from ._optimality import AbstractCondition, ProxFixedPoint, Stationary
from ._proximal import ProximalGradient
from ._problem import PerStep, tree_summary
from ._unroll import Truncate, Unroll

_tmap = jax.tree_util.tree_map


class Solver(AbstractMethod):
    """A user forward solver `(hparams, params0, batch) -> params`. See `bilevel.solver`."""

    fn: Callable = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "solver(fn) requires a callable fn(hparams, params0, batch) -> params; got "
                f"{type(self.fn).__name__} {self.fn!r}."
            )

    def _check_batch(self, inner_batch) -> None:
        if isinstance(inner_batch, PerStep):
            raise ValueError(
                "solver(fn) passes the inner batch to fn whole; got per_step(...) data, which "
                "only unroll steps through. Pass the stacked arrays without per_step(...) and "
                "index them inside fn."
            )

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        params = self.fn(hparams, params0, batch)
        want = jax.tree_util.tree_structure(params0)
        got = jax.tree_util.tree_structure(params)
        shapes_ok = want == got and all(
            jnp.shape(a) == jnp.shape(b)
            for a, b in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(params))
        )
        if not shapes_ok:
            raise ValueError(
                "solver(fn): fn(hparams, params0, batch) must return params with the same tree "
                f"and shapes as params0 {tree_summary(params0)}; it returned "
                f"{tree_summary(params)}. Return the solution in the layout of params0."
            )
        return params, grad_norm_stats(problem, params, hparams, batch)


def _zero_tangent(primal):
    dtype = jax.dtypes.result_type(primal)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return np.zeros(jnp.shape(primal), jax.dtypes.float0)
    return jnp.zeros_like(primal)   # zeros_like keeps the shard_map axes the primal varies over


def _instantiate(t, primal):
    return _zero_tangent(primal) if isinstance(t, SymbolicZero) else t


def _zero_anchor(tangents) -> jax.Array:
    """0 × the sum of the floating-point tangents: zero, but linear in them."""
    sums = [jnp.sum(t) for t in jax.tree_util.tree_leaves(tangents)
            if jnp.issubdtype(jnp.result_type(t), jnp.inexact)]
    return 0.0 * sum(sums)


def _link(tree):
    """Add 0 × (the sum of every leaf) to each leaf: numerically nothing.

    Applied to a solve's output, it makes each leaf's cotangent a linear function of all the
    output cotangents instead of a symbolic zero. Transposing the solve (reverse mode) and
    differentiating that again (forward-over-reverse, reverse-over-reverse) requires every
    right-hand-side leaf to be linear in the input: without it, a leaf the loss ignores
    (a KKT multiplier, or the stats block of the augmented solve) breaks
    `custom_linear_solve`'s JVP.
    """
    total = 0.0 * sum(jnp.sum(t) for t in jax.tree_util.tree_leaves(tree))
    return _tmap(lambda t: t + total.astype(t.dtype), tree)


def _all_zero(tangents) -> bool:
    leaves = jax.tree_util.tree_leaves(tangents, is_leaf=lambda x: isinstance(x, SymbolicZero))
    return all(isinstance(t, SymbolicZero) for t in leaves)


class Implicit(AbstractMethod):
    """Forward by a method, derivative by the implicit function theorem. See `bilevel.implicit`."""

    method: AbstractMethod
    linear_solver: AbstractLinearSolver
    condition: AbstractCondition = Stationary()

    def __check_init__(self):
        if isinstance(self.method, (Implicit, Truncate)):
            raise TypeError(
                "implicit(method, linear_solver) requires a method that finds the inner "
                f"parameters (bilevel.unroll, bilevel.solver or bilevel.best_response); got {type(self.method).__name__}, "
                "which only changes how they are differentiated, and implicit replaces that "
                "derivative anyway. Write bilevel.implicit(bl.unroll(optimizer, steps), "
                "linear_solver) instead."
            )
        if not isinstance(self.method, (Unroll, Solver, BestResponse, ProximalGradient)):
            raise TypeError(
                "implicit(method, linear_solver) requires a forward method built by "
                "bilevel.unroll, bilevel.solver, bilevel.proximal_gradient or "
                f"bilevel.best_response; got {type(self.method).__name__} "
                f"{self.method!r}. Wrap your own solver with bilevel.solver(fn)."
            )
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "implicit(method, linear_solver) requires a linear solver such as bilevel.cg(), "
                "bilevel.exact(), bilevel.neumann(terms, alpha), bilevel.identity() or "
                f"bilevel.gmres(); got {type(self.linear_solver).__name__} "
                f"{self.linear_solver!r}."
            )
        if not isinstance(self.condition, AbstractCondition):
            raise TypeError(
                "implicit(method, linear_solver, condition) requires a condition built by "
                "bilevel.stationary, prox_fixed_point, projected_fixed_point, kkt or fixed_point; "
                f"got {type(self.condition).__name__} {self.condition!r}."
            )
        if self.linear_solver.symmetric_only and not self.condition.symmetric():
            raise ValueError(
                f"implicit(...): {type(self.linear_solver).__name__} is only valid for symmetric "
                f"systems, but the {type(self.condition).__name__} condition's linear system is not "
                f"symmetric ({_why_not_symmetric(self.condition)}). Use bilevel.gmres(), "
                "bilevel.bicgstab(), bilevel.normal_cg() or bilevel.exact()."
            )

    def _probe(self, dtype):
        return self.linear_solver.stats_template(dtype)

    def _allows_complex(self) -> bool:
        return False

    def _finalize(self, probe_cotangent):
        return self.linear_solver.finalize(probe_cotangent)

    def _check_batch(self, inner_batch) -> None:
        if isinstance(inner_batch, PerStep):
            raise ValueError(
                "implicit(...) differentiates at the point the forward solve reached using the "
                "training loss on one batch; got per_step(...) inner data, for which that batch "
                "is ambiguous. Pass the full training batch (sample minibatches inside "
                "bilevel.solver(fn) if the forward solve is stochastic), or use bilevel.unroll "
                "to differentiate through per-step data."
            )
        self.method._check_batch(inner_batch)

    def _run(self, problem, hparams, params0, batch, probe):
        return _implicit_response(self, problem)(hparams, params0, batch, probe)


def _why_not_symmetric(condition) -> str:
    if isinstance(condition, ProxFixedPoint):
        return ("its prox has no support restriction, or its Jacobian on the support is not a "
                "multiple of the identity (group ℓ1, simplex, ℓ2 ball)")
    return "KKT systems and fixed-point maps have non-symmetric Jacobians"


def _restrict(mask, jvp, rhs):
    """The system J x = rhs restricted to a support (see `_optimality.py`).

    Off the support the rows of J are identity rows, so x = rhs there; on it
    J_SS x_S = rhs_S − J_S,Sc rhs_Sc. Both are one system A x = c with
    A y = m⊙J(m⊙y) + (1−m)⊙y, which is symmetric when J_SS is.
    """
    m = _tmap(lambda k, r: k.astype(r.dtype), mask, rhs)
    on = lambda y: _tmap(jnp.multiply, m, y)  # noqa: E731
    off = lambda y: _tmap(lambda k, v: (1 - k) * v, m, y)  # noqa: E731

    def matvec(y):
        return _tmap(jnp.add, on(jvp(on(y))), off(y))

    c = _tmap(jnp.add, on(_tmap(jnp.subtract, rhs, jvp(off(rhs)))), off(rhs))
    return matvec, c


def _condition_stats(condition, problem, params, hparams, batch, stats):
    """The forward method's stats with the residual of the condition being differentiated:
    `inner_grad_norm` for stationarity, `optimality_residual` for any other condition."""
    args = jax.lax.stop_gradient((params, hparams, batch))
    if isinstance(condition, Stationary):
        if "inner_grad_norm" in stats:          # unroll, solver and best_response report it
            return stats
        stats = {k: v for k, v in stats.items() if k != "optimality_residual"}
        return {**stats, "inner_grad_norm": condition.residual_norm(problem, *args)}
    stats = {k: v for k, v in stats.items() if k != "inner_grad_norm"}
    stats["optimality_residual"] = condition.residual_norm(problem, *args)
    mask = condition.support(problem, *args)
    if mask is not None:
        stats["support_size"] = sum(jnp.sum(k, dtype=jnp.int32) for k in jax.tree_util.tree_leaves(mask))
    return stats


def _implicit_response(method: Implicit, problem):
    condition = method.condition
    F = lambda w, h, b: condition.residual(problem, w, h, b)  # noqa: E731
    linsolve = method.linear_solver
    symmetric = condition.symmetric()

    @jax.custom_jvp
    def respond(hparams, params0, batch, probe):
        del probe
        primals = jax.lax.stop_gradient((hparams, params0, batch))
        params, stats = method.method._run(problem, *primals, {})
        return params, _condition_stats(condition, problem, params, primals[0], primals[2], stats)

    def respond_jvp(primals, tangents):
        hparams, params0, batch, probe = primals
        d_hparams, _, d_batch, d_probe = tangents
        # Calling `respond` (not the forward method) keeps higher derivatives on the IFT rule.
        params, stats = respond(hparams, params0, batch, probe)
        zero_stats = _tmap(_zero_tangent, stats)
        if _all_zero((d_hparams, d_batch)):
            return (params, stats), (_tmap(jnp.zeros_like, params), zero_stats)

        d_hparams = _tmap(_instantiate, d_hparams, hparams, is_leaf=lambda x: isinstance(x, SymbolicZero))
        d_batch = _tmap(_instantiate, d_batch, batch, is_leaf=lambda x: isinstance(x, SymbolicZero))
        _, cross = jax.jvp(lambda h, b: F(params, h, b), (hparams, batch), (d_hparams, d_batch))
        # Leaves of w that λ does not touch (an unpenalised bias) get a constant zero from
        # jvp; transposing custom_linear_solve needs every right-hand-side leaf linear in the
        # input tangent, so add a numerically-zero linear anchor to each.
        anchor = _zero_anchor((d_hparams, d_batch))
        rhs = _tmap(lambda c: anchor.astype(c.dtype) - c, cross)
        _, jvp = jax.linearize(lambda w: F(w, hparams, batch), params)
        mask = condition.support(problem, *jax.lax.stop_gradient((params, hparams, batch)))
        matvec, rhs = (jvp, rhs) if mask is None else _restrict(mask, jvp, rhs)

        if _all_zero(d_probe):
            solve = lambda mv, b: linsolve.solve(mv, b)[0]  # noqa: E731
            d_params = _link(jax.lax.custom_linear_solve(
                matvec, rhs, solve, None if symmetric else solve, symmetric=symmetric))
        else:
            # Augmented block-diagonal system diag(J, I) (x, s) = (rhs, d_probe): the solver's
            # stats are written into the s block, so reverse mode returns them as the
            # probe's cotangent (see the module docstring).
            d_probe = _tmap(_instantiate, d_probe, probe, is_leaf=lambda x: isinstance(x, SymbolicZero))

            def aug_matvec(x):
                return matvec(x[0]), x[1]

            def aug_solve(mv, b):
                x, solve_stats = linsolve.solve(lambda v: mv((v, _tmap(jnp.zeros_like, b[1])))[0], b[0])
                return x, _tmap(lambda z, s: s.astype(z.dtype), b[1], solve_stats)

            d_params, d_stats = jax.lax.custom_linear_solve(
                aug_matvec, (rhs, d_probe), aug_solve, None if symmetric else aug_solve,
                symmetric=symmetric,
            )
            d_params = _link((d_params, d_stats))[0]
        return (params, stats), (d_params, zero_stats)

    respond.defjvp(respond_jvp, symbolic_zeros=True)
    return respond


def implicit(method: AbstractMethod, linear_solver: AbstractLinearSolver,
             condition: AbstractCondition | None = None) -> Implicit:
    """Differentiate the inner solution by the implicit function theorem (IFT).

    The forward pass runs `method` (an unroll, a proximal-gradient run, a user solver or a
    hypernet) to a point w. The derivative treats w as a zero of an optimality condition
    F(w, λ, batch) = 0 and uses dw/dλ = −(∂F/∂w)⁻¹ ∂F/∂λ, applying the inverse with
    `linear_solver`. The default condition is stationarity of the training loss,
    F = ∇_w L_T, whose Jacobian is the inner Hessian H (for `bilevel.proximal_gradient` the
    default is its proximal-gradient fixed point). Nonsmooth and constrained inner problems
    use `bilevel.prox_fixed_point`, `projected_fixed_point` or `kkt`, and equilibria
    `bilevel.fixed_point`; when the condition's prox declares a support, the solve is
    restricted to it. Memory and cost do not depend on how many forward steps were taken.
    The rule is a JVP with a transposable linear solve, so `jax.jvp`, `jax.grad` and
    higher derivatives all work.

    The IFT is only as good as the point the forward method reached: `hypergrad` reports
    ‖∇_w L_T‖ as `stats["inner_grad_norm"]` (or, for another condition, its residual as
    `stats["optimality_residual"]`, and the support's size as `stats["support_size"]`), and
    the backward solve's diagnostics beside it (every linear solver reports
    `solve_residual`, ‖Jx − b‖/‖b‖).

    Exactness: with `exact()`, or an iterative solver run to a small `solve_residual`, at a
    point where F = 0, first derivatives (grad and jvp) and second derivatives are those of
    the true response (for a nonsmooth condition: wherever the support is locally constant).
    With `neumann` or `identity` the first derivative is an approximation (its residual says
    how far), and second derivatives apply the same approximate inverse inside the exact
    formula, so they are neither the true hyper-Hessian nor the derivative of the
    approximate hypergradient. A non-finite right-hand side (NaN in the validation data)
    gives a NaN hypergradient, never zero. Inner parameters must be real floating-point
    arrays (complex ones raise: the system solved is real).

    Which solver: `cg` needs a symmetric positive-definite system (stationarity at a strict
    minimum, or a prox/projection condition restricted to a support where the prox is flat)
    and is refused for a non-symmetric one; for a nonconvex inner problem (a network) CG
    reports `solve_negative_curvature` when H is indefinite, and `gmres` or `exact` solve it.
    `gmres`, `bicgstab`, `normal_cg` and `exact` solve any nonsingular system.

    **Arguments:**

    - `method`: a forward method from `bilevel.unroll`, `bilevel.solver`,
      `bilevel.proximal_gradient` or `bilevel.best_response` (the IFT is then applied at the
      hypernet's output).
    - `linear_solver`: `bilevel.exact()`, `cg(...)`, `gmres(...)`, `bicgstab(...)`,
      `normal_cg(...)`, `neumann(...)` or `identity()`.
    - `condition`: the optimality condition (default: `bilevel.stationary()`, or the
      proximal-gradient fixed point of a `bilevel.proximal_gradient` method).

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
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=100), bl.cg(maxiter=20, tol=1e-10))
    out = bl.hypergrad(problem, method)(jnp.asarray(0.3), jnp.zeros(3), None, None)
    print(out.grad, out.stats["solve_residual"])

    # A Lasso: the smooth part is the inner loss, the ℓ1 penalty e^λ‖w‖₁ enters through its prox.
    lasso = bl.Problem(inner=lambda w, lam, _: 0.5 * jnp.sum((w - jnp.array([2.0, 0.1])) ** 2),
                       outer=lambda w, lam, _: 0.5 * jnp.sum(w**2))
    method = bl.implicit(bl.proximal_gradient(bl.prox_l1(jnp.exp), stepsize=1.0, steps=50),
                         bl.cg(tol=1e-12))
    out = bl.hypergrad(lasso, method)(jnp.log(0.5), jnp.zeros(2), None, None)
    print(out.grad, out.stats["support_size"])    # -0.75 (= -(2 - 0.5)·0.5), 1
    ```
    """
    if condition is None:
        condition = method.condition() if isinstance(method, ProximalGradient) else Stationary()
    return Implicit(method, linear_solver, condition)


def solver(fn: Callable) -> Solver:
    """Use any forward solver `fn(hparams, params0, batch) -> params` as a method.

    `fn` may be a closed-form solve, an optimistix or jaxopt run, or your own loop. On its
    own the method differentiates through `fn` by ordinary autodiff; under
    `bilevel.implicit` only its output is used and the derivative comes from the IFT, so
    `fn` need not be differentiable at all.

    **Arguments:**

    - `fn`: a pure function `(hparams, params0, batch) -> params` returning a pytree with
      the structure and shapes of `params0`.

    **Returns:**

    A method for `bilevel.implicit`, `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    def closed_form(lam, w0, batch):        # argmin_w 0.5|w - 1|^2 + 0.5 lam |w|^2
        return jnp.ones_like(w0) / (1.0 + lam)

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.implicit(bl.solver(closed_form), bl.exact())
    out = bl.hypergrad(problem, method)(jnp.asarray(0.3), jnp.zeros(3), None, None)
    ```
    """
    return Solver(fn)
