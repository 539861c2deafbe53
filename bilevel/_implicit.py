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

from ._base import AbstractMethod, grad_norm_stats, tree_norm
from ._best_response import BestResponse
from ._curvature import GaussNewton
from ._hvp import FiniteDifference, check_hvp, matvec as hvp_matvec
from ._precision import Precision, cast_floats
from ._linear_solvers import AbstractLinearSolver
from ._optimality import AbstractCondition, ProxFixedPoint, Stationary
from ._proximal import ProximalGradient
from ._problem import PerStep, tree_summary, typed_summary
from ._unroll import Truncate, Unroll

_tmap = jax.tree_util.tree_map
PyTree = object
_CURVATURES = ("mean", "last", "given", "per_term")


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


class _Probe(eqx.Module):
    """The stats probe of an implicit method: zero stats whose cotangents carry the backward
    solve's diagnostics, and an adjoint block whose primal value is the solve's warm start
    (used when `warm`) and whose cotangent is the solve's solution."""

    stats: dict
    adjoint: PyTree
    warm: bool = eqx.field(static=True)


def _all_zero(tangents) -> bool:
    leaves = jax.tree_util.tree_leaves(tangents, is_leaf=lambda x: isinstance(x, SymbolicZero))
    return all(isinstance(t, SymbolicZero) for t in leaves)


class Implicit(AbstractMethod):
    """Forward by a method, derivative by the implicit function theorem. See `bilevel.implicit`."""

    method: AbstractMethod
    linear_solver: AbstractLinearSolver
    condition: AbstractCondition = Stationary()
    curvature: str = eqx.field(static=True, default="mean")
    hessian: GaussNewton | None = None
    hvp: str | FiniteDifference = eqx.field(static=True, default="forward_over_reverse")
    precision: Precision | None = None

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
        if self.curvature not in _CURVATURES:
            raise ValueError(
                "implicit(..., curvature=...) requires one of 'mean' (the mean over per-step "
                "minibatches), 'last' (the last minibatch), 'given' (the batch passed as "
                "per_step(..., curvature=batch)) or 'per_term' (a fresh minibatch per Neumann "
                f"term or CG iteration); got curvature={self.curvature!r}."
            )
        if self.curvature == "per_term" and not self.linear_solver.per_term:
            raise ValueError(
                "implicit(..., curvature='per_term') uses a different minibatch's Hessian at "
                "each term or iteration, which only bilevel.neumann(...), bilevel.cg(...) and "
                f"bilevel.identity() support; got {type(self.linear_solver).__name__}. Use one "
                "of those, or curvature='mean' / 'last' / 'given' with any solver."
            )
        if self.hessian is not None and not isinstance(self.hessian, GaussNewton):
            raise TypeError(
                "implicit(..., hessian=...) requires None (the exact Hessian) or a curvature built "
                f"by bilevel.gauss_newton(model, loss); got {type(self.hessian).__name__} {self.hessian!r}."
            )
        if self.hessian is not None and not isinstance(self.condition, Stationary):
            raise ValueError(
                "implicit(..., hessian=gauss_newton(...)) replaces the Hessian of the training loss, "
                "the Jacobian of the stationarity condition; got the "
                f"{type(self.condition).__name__} condition, whose Jacobian is not a Hessian. "
                "Drop hessian= or use the default bilevel.stationary() condition."
            )
        check_hvp(self.hvp, self.condition.symmetric())
        if self.precision is not None and not isinstance(self.precision, Precision):
            raise TypeError(
                "implicit(..., precision=...) requires None or a policy built by bilevel.precision(compute, "
                f"accumulate); got {type(self.precision).__name__} {self.precision!r}."
            )
        if self.precision is not None and self.hessian is not None:
            raise ValueError(
                "implicit(..., precision=..., hessian=gauss_newton(...)) is not supported: the precision "
                "policy applies to the Hessian of the training loss. Drop one of the two."
            )
        if self.linear_solver.symmetric_only and not self.condition.symmetric():
            raise ValueError(
                f"implicit(...): {type(self.linear_solver).__name__} is only valid for symmetric "
                f"systems, but the {type(self.condition).__name__} condition's linear system is not "
                f"symmetric ({_why_not_symmetric(self.condition)}). Use bilevel.gmres(), "
                "bilevel.bicgstab(), bilevel.normal_cg() or bilevel.exact()."
            )

    def _probe(self, dtype, params, adjoint0):
        warm = adjoint0 is not None
        if warm:
            check_adjoint(adjoint0, params)
        adjoint = _tmap(jnp.asarray, adjoint0) if warm else _tmap(jnp.zeros_like, params)
        return _Probe(self.linear_solver.stats_template(dtype), adjoint, warm)

    def _start_refusal(self) -> str | None:
        return ("implicit(...) differentiates the fixed point of the inner problem, which does "
                "not depend on where the inner run started: the meta-gradient through the start "
                "point would be exactly zero")

    def _allows_complex(self) -> bool:
        return False

    def _finalize(self, probe_cotangent):
        return self.linear_solver.finalize(probe_cotangent.stats), probe_cotangent.adjoint

    def _check_batch(self, inner_batch) -> None:
        if isinstance(inner_batch, PerStep):
            if not isinstance(self.condition, Stationary):
                raise ValueError(
                    "implicit(...) with per_step(...) inner data supports the stationarity "
                    f"condition only; got {type(self.condition).__name__}. Pass the full "
                    "training batch for a proximal, projected, KKT or fixed-point condition."
                )
            if self.curvature == "given" and inner_batch.curvature is None:
                raise ValueError(
                    "implicit(..., curvature='given') takes the Hessian and cross derivative "
                    "from the batch passed as per_step(stacked, curvature=batch); got "
                    "per_step(...) data without one. Pass curvature=batch to per_step, or use "
                    "curvature='mean', 'last' or 'per_term'."
                )
        elif self.curvature == "given":
            raise ValueError(
                "implicit(..., curvature='given') takes the curvature batch from "
                "per_step(stacked, curvature=batch); got a plain inner batch, which the "
                "implicit function theorem uses whole anyway. Drop curvature='given', or pass "
                "per_step(...) data."
            )
        self.method._check_batch(inner_batch)

    def _run(self, problem, hparams, params0, batch, probe):
        return _implicit_response(self, problem)(hparams, params0, batch, probe)


def check_adjoint(adjoint0, params) -> None:
    """Raise unless a warm start for the backward solve has the layout of the inner params."""
    same = jax.tree_util.tree_structure(adjoint0) == jax.tree_util.tree_structure(params) and all(
        jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(jax.tree_util.tree_leaves(adjoint0), jax.tree_util.tree_leaves(params)))
    if not same:
        raise ValueError(
            "hypergrad(...)(..., adjoint0=v) requires v to have the tree, shapes and dtypes of "
            f"the inner params {typed_summary(params)}; got {typed_summary(adjoint0)}. Pass the "
            "`adjoint` of an earlier hypergrad result of the same problem, or None."
        )


def _mean_over_steps(fn, batches):
    """The mean of `fn(batch_t)` over the per-step batches, accumulated in a `lax.scan` (so
    memory does not grow with the number of steps)."""
    first = jax.tree_util.tree_map(lambda x: x[0], batches)
    rest = jax.tree_util.tree_map(lambda x: x[1:], batches)
    total, _ = jax.lax.scan(lambda acc, b: (_tmap(jnp.add, acc, fn(b)), None), fn(first), rest)
    count = jax.tree_util.tree_leaves(batches)[0].shape[0]
    return _tmap(lambda t: t / count, total)


def _step_batch(batches, k):
    """Per-step batch `k mod T` (a traced k)."""
    count = jax.tree_util.tree_leaves(batches)[0].shape[0]
    return _tmap(lambda x: x[k % count], batches)


def _residuals(F, curvature: str):
    """`(F_system, F_cross, F_term)`: the condition on the data the IFT uses.

    With one batch all three are F itself. With per-step data, F_system (the Jacobian of the
    linear system and the stats) and F_cross (the cross derivative) are the mean over the
    minibatches, the last one, or the given curvature batch; under "per_term" the system is
    the mean (for the reported residual), the cross derivative the last minibatch, and
    F_term(w, h, batch, k) the condition on minibatch k mod T for term/iteration k.
    """
    def system(w, h, b):
        if not isinstance(b, PerStep):
            return F(w, h, b)
        if curvature in ("mean", "per_term"):
            return _mean_over_steps(lambda x: F(w, h, x), b.batches)
        if curvature == "given":
            return F(w, h, b.curvature)
        return F(w, h, _tmap(lambda x: x[-1], b.batches))

    def cross(w, h, b):
        if isinstance(b, PerStep) and curvature == "per_term":
            return F(w, h, _tmap(lambda x: x[-1], b.batches))
        return system(w, h, b)

    def term(w, h, b, k):
        return F(w, h, _step_batch(b.batches, k))

    return system, cross, term


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


def _condition_stats(condition, problem, params, hparams, batch, stats, system):
    """The forward method's stats with the residual of the condition being differentiated:
    `inner_grad_norm` for stationarity, `optimality_residual` for any other condition.
    With per-step data, `inner_grad_norm` is that of the data the IFT uses (`system`)."""
    args = jax.lax.stop_gradient((params, hparams, batch))
    if isinstance(condition, Stationary):
        if isinstance(batch, PerStep):
            return {**stats, "inner_grad_norm": tree_norm(system(*args))}
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
    policy = method.precision
    F = lambda w, h, b: condition.residual(problem, w, h, b)  # noqa: E731
    F_system, F_cross, F_term = _residuals(F, method.curvature)
    F_stats = F_system                  # the stats stay in the parameters' dtype
    if policy is not None:              # products in the compute dtype, returned in the accumulation one
        F_system, F_cross, F_term = _residuals(policy.residual(condition, problem), method.curvature)
    linsolve = method.linear_solver
    symmetric = condition.symmetric()

    def forward(hparams, params0, batch):
        if policy is None:
            return method.method._run(problem, hparams, params0, batch, {})
        low, stats = method.method._run(policy.low(problem), hparams, cast_floats(params0, policy.compute), batch, {})
        return _tmap(lambda x, ref: x.astype(ref.dtype), low, params0), stats

    @jax.custom_jvp
    def respond(hparams, params0, batch, probe):
        del probe
        primals = jax.lax.stop_gradient((hparams, params0, batch))
        params, stats = forward(*primals)
        stats = _condition_stats(condition, problem, params, primals[0], primals[2], stats, F_stats)
        if method.hessian is not None:
            stats = {**stats, "gauss_newton": jnp.asarray(True)}
        if isinstance(method.hvp, FiniteDifference):
            stats = {**stats, "finite_difference_hvp": jnp.asarray(True)}
        return params, stats

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
        _, cross = jax.jvp(lambda h, b: F_cross(params, h, b), (hparams, batch), (d_hparams, d_batch))
        # Leaves of w that λ does not touch (an unpenalised bias) get a constant zero from
        # jvp; transposing custom_linear_solve needs every right-hand-side leaf linear in the
        # input tangent, so add a numerically-zero linear anchor to each.
        anchor = _zero_anchor((d_hparams, d_batch))
        rhs = _tmap(lambda c: anchor.astype(c.dtype) - c, cross)
        F_lin, F_lin_term = F_system, F_term
        if method.hessian is not None:        # Gauss-Newton: the same system without the model's curvature
            F_lin, _, F_lin_term = _residuals(method.hessian._gradient_map(problem, params), method.curvature)
        point = params if policy is None else cast_floats(params, policy.accumulate)  # tangents in the solve's dtype
        jvp = hvp_matvec(method.hvp, lambda w: F_lin(w, hparams, batch), point)
        mask = condition.support(problem, *jax.lax.stop_gradient((params, hparams, batch)))
        matvec, rhs = (jvp, rhs) if mask is None else _restrict(mask, jvp, rhs)
        matvec_at = None
        if method.curvature == "per_term" and isinstance(batch, PerStep):
            def matvec_at(v, k):
                return hvp_matvec(method.hvp, lambda w: F_lin_term(w, hparams, batch, k), point)(v)
        x0 = _tmap(lambda a, r: a.astype(r.dtype), probe.adjoint, rhs) if probe.warm else None
        solve = lambda mv, b: linsolve.solve(mv, b, x0=x0, matvec_at=matvec_at)  # noqa: E731

        if _all_zero(d_probe):
            d_params = _link(jax.lax.custom_linear_solve(
                matvec, rhs, lambda mv, b: solve(mv, b)[0], None if symmetric else (lambda mv, b: solve(mv, b)[0]),
                symmetric=symmetric))
        else:
            # Augmented block-diagonal system diag(J, I) (x, s) = (rhs, d_probe): the solver's
            # stats, and its solution x, are written into the s block, so reverse mode returns
            # them as the probe's cotangent (see the module docstring).
            d_probe = _tmap(_instantiate, d_probe, probe, is_leaf=lambda x: isinstance(x, SymbolicZero))

            def aug_matvec(x):
                return matvec(x[0]), x[1]

            def aug_solve(mv, b):
                x, solve_stats = solve(lambda v: mv((v, _tmap(jnp.zeros_like, b[1])))[0], b[0])
                s = b[1]
                stats_block = _tmap(lambda z, v: v.astype(z.dtype), s.stats, solve_stats)
                adjoint_block = _tmap(lambda z, v: v.astype(z.dtype), s.adjoint, x)
                return x, _Probe(stats_block, adjoint_block, s.warm)

            d_params, d_stats = jax.lax.custom_linear_solve(
                aug_matvec, (rhs, d_probe), aug_solve, None if symmetric else aug_solve,
                symmetric=symmetric,
            )
            d_params = _link((d_params, d_stats))[0]
        d_params = _tmap(lambda d, p: d.astype(p.dtype), d_params, params)   # the solve's dtype may be wider
        return (params, stats), (d_params, zero_stats)

    respond.defjvp(respond_jvp, symbolic_zeros=True)
    return respond


def implicit(method: AbstractMethod, linear_solver: AbstractLinearSolver,
             condition: AbstractCondition | None = None, *, curvature: str = "mean",
             hessian: GaussNewton | None = None,
             hvp: str | FiniteDifference = "forward_over_reverse",
             precision: Precision | None = None) -> Implicit:
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

    Stochastic training data: when the forward method trains on `bilevel.per_step(...)`
    minibatches, `curvature` says which training data defines the Hessian H and the cross
    derivative ∂²L_T/∂λ∂w of the IFT:

    | `curvature` | H and the cross derivative on | cost per Hessian-vector product |
    |---|---|---|
    | `"mean"` (default) | the mean loss over all T minibatches (the full batch they form): the deterministic hypergradient | T minibatch products |
    | `"last"` | the last minibatch | one |
    | `"given"` | the batch passed as `per_step(stacked, curvature=batch)` (e.g. a larger one) | one on that batch |
    | `"per_term"` | term k of the Neumann series (iteration k of CG) on minibatch k mod T, the cross derivative on the last | one |

    `"per_term"` is the stochastic Neumann estimate of Lorraine et al. (2020) and StocBiO:
    when the minibatches are independent draws and `terms` < T − 1, its mean over draws is
    exactly the full-batch truncated series, α Σ_j (I − αH̄)^j, while `"last"` (one
    minibatch for every term) is biased, E[(I − αH_B)^j] ≠ (I − αH̄)^j. Neither is the
    exact hypergradient: `stats["solve_residual"]` is reported against the mean Hessian
    (one pass over the T minibatches) and `stats["inner_grad_norm"]` is the stationarity
    of the mean loss (`"given"`/`"last"`: of that batch). With one inner batch (not
    `per_step`) every choice is that batch.

    **Arguments:**

    - `method`: a forward method from `bilevel.unroll`, `bilevel.solver`,
      `bilevel.proximal_gradient` or `bilevel.best_response` (the IFT is then applied at the
      hypernet's output).
    - `linear_solver`: `bilevel.exact()`, `cg(...)`, `gmres(...)`, `bicgstab(...)`,
      `normal_cg(...)`, `neumann(...)` or `identity()`.
    - `condition`: the optimality condition (default: `bilevel.stationary()`, or the
      proximal-gradient fixed point of a `bilevel.proximal_gradient` method).
    - `curvature`: which training data the IFT uses with `per_step` inner data: `"mean"`,
      `"last"`, `"given"` or `"per_term"` (`neumann`, `cg` or `identity` only); see above.
    - `hessian`: None (the exact Hessian, default) or `bilevel.gauss_newton(model, loss)`
      to solve with the Gauss-Newton matrix instead (stationarity condition only; an
      approximation unless the model is linear in w or the residuals are zero; the stats
      add `gauss_newton`).
    - `hvp`: how the system is multiplied: `"forward_over_reverse"` (default,
      `jax.linearize` of the gradient), `"reverse_over_reverse"` (`jax.grad` of ⟨∇L_T, v⟩:
      the same numbers, different memory and speed; symmetric systems only) or
      `bilevel.finite_difference(ε)` (differences of gradients, no second derivatives; an
      approximation, flagged `finite_difference_hvp`; symmetric systems only).
    - `precision`: None (everything in the parameters' dtype) or `bilevel.precision(compute,
      accumulate)`: the inner steps and the products in `compute` (bfloat16), the solve in
      `accumulate` (float32); see there.

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

    # Minibatch training, stochastic Neumann hypergradient (a fresh minibatch per term).
    ridge = bl.Problem(inner=lambda w, lam, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * lam * w @ w,
                       outer=lambda w, lam, b: 0.5 * jnp.sum((w - 0.5) ** 2))
    xs, ys = jnp.ones((200, 8, 3)), jnp.ones((200, 8))          # 200 steps of 8 rows
    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=200), bl.neumann(terms=50, alpha=0.2),
                         curvature="per_term")
    out = bl.hypergrad(ridge, method)(jnp.asarray(0.3), jnp.zeros(3), bl.per_step((xs, ys)), None)
    ```
    """
    if condition is None:
        condition = method.condition() if isinstance(method, ProximalGradient) else Stationary()
    return Implicit(method, linear_solver, condition, curvature, hessian, hvp, precision)


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
