"""Layer 2: compile a method against a problem into plain JAX functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import AbstractMethod, vary_like as _vary_like
from ._implicit import Implicit, Solver
from ._problem import PerStep, Problem, canonical, check_hparams, check_loss, check_params0, tree_summary

PyTree = Any


class HypergradResult(NamedTuple):
    """What `bilevel.hypergrad` returns (a pytree, so it passes through jit and vmap).

    **Fields:**

    - `value`: the validation loss L_V(w, λ) at the inner parameters reached.
    - `grad`: the hypergradient dL_V/dλ by the method's rule, same tree as `hparams`.
    - `params`: the inner parameters w reached by the forward pass.
    - `stats`: a dict of diagnostics: always `inner_grad_norm` (‖∇_w L_T‖ at w, how far w
      is from stationary); for `implicit`, the backward solve's `solve_residual`
      (‖Hx − b‖/‖b‖, every linear solver), `solve_iterations` and
      `solve_negative_curvature` (CG), or `neumann_last_term`, `neumann_ratio` and
      `neumann_diverged` (Neumann); `truncated_steps` for `truncate`; `jacobian_norm` and
      `clip_fraction` for `forward_mode`.
    - `adjoint`: for `implicit`, the solution x of the backward linear system Jᵀx = ∂L_V/∂w
      (J the condition's Jacobian, the inner Hessian H under stationarity; the
      hypergradient is ∂L_V/∂λ − (∂F/∂λ)ᵀx). Pass it back as `adjoint0=` at the next
      outer step to warm-start that solve. `None` for methods without a linear solve.
    """

    value: jax.Array
    grad: PyTree
    params: PyTree
    stats: dict
    adjoint: PyTree = None


def _check_problem_method(problem, method, where: str) -> None:
    if not isinstance(problem, Problem):
        raise TypeError(
            f"{where} requires a bilevel.Problem as first argument; got "
            f"{type(problem).__name__}. Build one with bilevel.Problem(inner=..., outer=...)."
        )
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            f"{where} requires a method such as bilevel.unroll(optax.sgd(0.1), steps=100) as "
            f"second argument; got {type(method).__name__} {method!r}."
        )
    if problem.start is not None and (reason := method._start_refusal()) is not None:
        raise TypeError(
            f"{where}: the problem's start point depends on the hyperparameters "
            f"(Problem(start=...)), but {reason}. Use bilevel.unroll(optimizer, steps) for the "
            "exact meta-gradient (MAML), bilevel.first_order(bilevel.unroll(...)) for first-order "
            "MAML, or, for implicit MAML, drop start and put the meta-parameters into the inner "
            "loss as a proximal centre: inner=bilevel.anchored(loss, strength) with "
            "bilevel.implicit(...)."
        )


def _start(problem: Problem, hparams, params0, where: str):
    """params0, or the start point `problem.start(hparams)` (then params0 must be None)."""
    if problem.start is None:
        return params0
    if params0 is not None:
        raise TypeError(
            f"{where}: the problem defines its start point from the hyperparameters "
            "(Problem(start=...)), so params0 must be None; got params0="
            f"{tree_summary(params0)}. Pass None (the run starts at start(hparams)), or build the "
            "problem without start to start from params0."
        )
    return problem.start(hparams)


def _first_batch(batch):
    """A single-step view of the inner data, for checking the loss signature."""
    if isinstance(batch, PerStep):
        return jax.tree_util.tree_map(lambda x: x[0], batch.batches)
    return batch


def _check_call(problem, method, hparams, params0, inner_batch, outer_batch=None, outer=False):
    check_hparams(hparams, "hypergrad/response")
    check_params0(params0, f"hypergrad/response with {type(method).__name__}",
                  allow_complex=method._allows_complex())
    method._check_batch(inner_batch)
    check_loss(problem.inner, "inner", params0, hparams, _first_batch(inner_batch))
    if outer:
        check_loss(problem.outer, "outer", params0, hparams, outer_batch)


def _probe_dtype(params0):
    leaves = [x for x in jax.tree_util.tree_leaves(params0) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def _split_params(problem: Problem, method: AbstractMethod, params0):
    """Separate params0's floating-point arrays (optimised) from other leaves (held fixed).

    Returns the problem seen as a function of the array part, that part, and a function
    putting a solution back together. Non-array leaves (an activation function in an
    equinox module, a string) pass through untouched; when there are none, nothing changes.
    """
    arrays, rest = eqx.partition(params0, eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(rest):
        return problem, params0, lambda params: params
    if isinstance(method, Solver) or (isinstance(method, Implicit) and isinstance(method.method, Solver)):
        raise TypeError(
            "solver(fn) with params0 holding non-array leaves "
            f"({tree_summary(rest)}) is not supported: fn would have to accept and return "
            "params without them. Mark such fields static (eqx.field(static=True)) or use "
            "bilevel.unroll as the forward method."
        )
    full = lambda params: eqx.combine(params, rest)  # noqa: E731
    split = Problem(
        inner=lambda w, h, b: problem.inner(full(w), h, b),
        outer=lambda w, h, b: problem.outer(full(w), h, b),
    )
    return split, arrays, full


def response(problem: Problem, method: AbstractMethod) -> Callable:
    """Compile a method against a problem into the response function w(λ).

    The returned function runs the method's forward pass and is differentiable with
    respect to `hparams` (and the batch) by the method's rule, under `jax.grad`,
    `jax.jvp`, `jax.vmap` and `jax.jit`. It is a plain function: jit it yourself.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: a method (`bilevel.unroll`, `bilevel.truncate`, `bilevel.implicit`,
      `bilevel.solver`).

    **Returns:**

    `respond(hparams, params0, inner_batch) -> params`, where `inner_batch` is one batch
    used at every step, `bilevel.per_step(stacked)`, or `None`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    respond = jax.jit(bl.response(problem, bl.unroll(optax.sgd(0.5), steps=100)))
    w = respond(jnp.asarray(0.3), jnp.zeros(3), None)          # ≈ 1 / 1.3
    dw = jax.jacfwd(respond)(jnp.asarray(0.3), jnp.zeros(3), None)
    ```
    """
    _check_problem_method(problem, method, "response(problem, method)")

    def respond(hparams, params0, inner_batch):
        hparams, params0, inner_batch = canonical((hparams, params0, inner_batch))
        params0 = canonical(_start(problem, hparams, params0, "response(problem, method)(hparams, params0, inner_batch)"))
        _check_call(problem, method, hparams, params0, inner_batch)
        split, arrays, full = _split_params(problem, method, params0)
        arrays = _vary_like(arrays, hparams, inner_batch)
        probe = _vary_like(method._probe(_probe_dtype(arrays), arrays, None), hparams, inner_batch)
        params, _ = method._run(split, hparams, arrays, inner_batch, probe)
        return full(params)

    return respond


def hypergrad(problem: Problem, method: AbstractMethod) -> Callable:
    """Compile a method against a problem into a hypergradient function.

    Built on `bilevel.response` with `jax.value_and_grad` only: the hypergradient is the
    gradient of `outer(respond(λ), λ, outer_batch)`, including the direct dependence of the
    validation loss on λ. Pure, so `jax.jit`, `jax.vmap` (over hyperparameters, seeds,
    datasets), `jax.pmap`, `shard_map` and `jax.grad` (hyper-hypergradients) compose with it.
    Hyperparameters are a traced argument: new values never recompile.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: a method (`bilevel.unroll`, `bilevel.truncate`, `bilevel.implicit`,
      `bilevel.solver`).

    **Returns:**

    `hg(hparams, params0, inner_batch, outer_batch, adjoint0=None) -> HypergradResult`
    with fields `value`, `grad` (same tree as `hparams`), `params`, `stats` and `adjoint`.
    For `implicit`, `adjoint0` warm-starts the backward linear solve (pass the previous
    outer step's `result.adjoint`; `bilevel.hyperopt(..., warm_start_solve=True)` does it
    for you): iterative solvers then need fewer iterations, `neumann` continues its
    Richardson iteration from there, and `stats["solve_residual"]` reports how well the
    system is solved either way. Other methods refuse `adjoint0`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=100), bl.cg(maxiter=20, tol=1e-10))
    hg = jax.jit(bl.hypergrad(problem, method))
    out = hg(jnp.asarray(0.3), jnp.zeros(3), None, None)
    grads = jax.vmap(hg, in_axes=(0, None, None, None))(jnp.linspace(0.1, 1.0, 8), jnp.zeros(3), None, None)
    ```
    """
    _check_problem_method(problem, method, "hypergrad(problem, method)")

    def hg(hparams, params0, inner_batch, outer_batch, adjoint0=None):
        hparams, params0, inner_batch, outer_batch, adjoint0 = canonical(
            (hparams, params0, inner_batch, outer_batch, adjoint0))
        params0 = canonical(_start(problem, hparams, params0, "hypergrad(problem, method)(hparams, params0, ...)"))
        _check_call(problem, method, hparams, params0, inner_batch, outer_batch, outer=True)
        split, arrays, full = _split_params(problem, method, params0)
        method._check_memory(hparams, arrays)
        arrays = _vary_like(arrays, hparams, inner_batch, outer_batch)

        def loss(h, probe):
            start = arrays
            if problem.start is not None:      # MAML: the run starts at start(λ), differentiated
                start = _vary_like(eqx.filter(canonical(problem.start(h)), eqx.is_inexact_array),
                                   hparams, inner_batch, outer_batch)
            params, stats = method._run(split, h, start, inner_batch, probe)
            return split.outer(params, h, outer_batch), (params, stats)

        probe = _vary_like(method._probe(_probe_dtype(arrays), arrays, adjoint0),
                           hparams, inner_batch, outer_batch)
        (value, (params, stats)), (grad, probe_cotangent) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(hparams, probe)
        solve_stats, adjoint = method._finalize(probe_cotangent)
        return HypergradResult(value, grad, full(params), {**stats, **solve_stats}, adjoint)

    return hg
