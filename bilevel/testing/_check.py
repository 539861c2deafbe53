"""Check any method against any exact problem."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._base import AbstractMethod, tree_norm
from .._compile import hypergrad
from .._drmad import DrMAD
from .._forward import ForwardMode
from .._implicit import Implicit
from .._linear_solvers import Identity
from .._unroll import Truncate, Unroll
from ._exact import AbstractExactProblem
from ._unrolled import UnrolledQuadratic

_TARGETS = ("auto", "ift", "unrolled", "identity", "drmad")


class Comparison(NamedTuple):
    """A method's hypergradient beside the exact one (see `hypergrad_error`).

    **Fields:**

    - `grad`: the method's hypergradient.
    - `expected`: the exact target it is compared with.
    - `error`: ‖grad − expected‖ / ‖expected‖ (absolute error if `expected` is zero).
    - `abs_error`: ‖grad − expected‖.
    - `target`: which exact quantity was used: `"ift"`, `"unrolled"` or `"identity"`.
    - `stats`: the method's diagnostics.
    """

    grad: object
    expected: object
    error: jax.Array
    abs_error: jax.Array
    target: str
    stats: dict


def _auto_target(method: AbstractMethod, exact: AbstractExactProblem) -> str:
    if isinstance(method, Implicit) and isinstance(method.linear_solver, Identity):
        return "identity"
    full_unroll = (
        isinstance(method, Unroll)
        or (isinstance(method, Truncate) and method.last == method.method.steps)
        or (isinstance(method, ForwardMode) and method.clip is None)
    )
    if full_unroll and isinstance(exact, UnrolledQuadratic):
        return "unrolled"
    if isinstance(method, DrMAD) and isinstance(exact, UnrolledQuadratic):
        return "drmad"
    return "ift"


def _expected(exact: AbstractExactProblem, hparams, target: str):
    if target == "ift":
        return exact.hypergrad(hparams)
    if target == "identity":
        return exact.identity_hypergrad(hparams)
    if not isinstance(exact, UnrolledQuadratic):
        raise ValueError(
            f"hypergrad_error(target={target!r}) requires a problem with a known unrolled "
            f"hypergradient (bilevel.testing.UnrolledQuadratic); got {type(exact).__name__}. "
            "Use target='ift' for the limit T → ∞."
        )
    if target == "drmad":
        return exact.drmad_hypergrad(hparams)
    return exact.unrolled_hypergrad(hparams)


def hypergrad_error(
    method: AbstractMethod,
    exact: AbstractExactProblem,
    hparams=None,
    *,
    target: str = "auto",
) -> Comparison:
    """Run `method` on an exact problem and compare its hypergradient with the exact one.

    The target is chosen by `target`: `"ift"` (the true hypergradient at w*(λ)),
    `"unrolled"` (the exact T-step unrolled hypergradient of a
    `bilevel.testing.UnrolledQuadratic`), `"identity"` (the H⁻¹ ≈ I formula), `"drmad"`
    (DrMAD's straight-line value on an `UnrolledQuadratic`), or `"auto"`: `"identity"` for
    `implicit(·, identity())`, `"unrolled"` for a full unroll of an `UnrolledQuadratic`
    (also through `truncate(last=steps)` or `forward_mode(clip=None)`), `"drmad"` for
    `drmad(unroll(...))` on one, else `"ift"`.

    **Arguments:**

    - `method`: any bilevel method.
    - `exact`: a problem from `bilevel.testing`.
    - `hparams`: where to evaluate (default `exact.hparams`).
    - `target`: one of `"auto"`, `"ift"`, `"unrolled"`, `"identity"`, `"drmad"`.

    **Returns:**

    A `Comparison` with the method's grad, the exact value and the relative error.

    **Example:**

    ```python
    import optax
    import bilevel as bl
    import bilevel.testing as blt

    exact = blt.Ridge.sample(0, dim=4)
    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=2000), bl.cg(maxiter=50, tol=1e-12))
    cmp = blt.hypergrad_error(method, exact)
    assert cmp.error < 1e-6
    ```
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            f"hypergrad_error(method, exact) requires a bilevel method; got {type(method).__name__}. "
            "Build one with bilevel.unroll / bilevel.implicit / ..."
        )
    if not isinstance(exact, AbstractExactProblem):
        raise TypeError(
            "hypergrad_error(method, exact) requires a problem from bilevel.testing (e.g. "
            f"bilevel.testing.Ridge.sample(0)); got {type(exact).__name__}."
        )
    if target not in _TARGETS:
        raise ValueError(f"hypergrad_error(target=...) must be one of {_TARGETS}; got {target!r}.")
    hparams = exact.hparams if hparams is None else hparams
    target = _auto_target(method, exact) if target == "auto" else target
    expected = _expected(exact, hparams, target)
    out = hypergrad(exact.problem, method)(hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    diff = tree_norm(jax.tree_util.tree_map(jnp.subtract, out.grad, expected))
    scale = tree_norm(expected)
    error = jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1.0), diff)
    return Comparison(out.grad, expected, error, diff, target, out.stats)


def assert_hypergrad_close(
    method: AbstractMethod,
    exact: AbstractExactProblem,
    hparams=None,
    *,
    rtol: float,
    atol: float = 0.0,
    target: str = "auto",
) -> Comparison:
    """Assert ‖grad − exact‖ ≤ atol + rtol·‖exact‖ for `method`'s hypergradient on `exact`.

    For use in your own (property-based) test suites. See `hypergrad_error` for how the
    target is chosen.

    **Arguments:**

    - `method`, `exact`, `hparams`, `target`: as for `hypergrad_error`.
    - `rtol`: the largest accepted relative error, > 0.
    - `atol`: an absolute allowance, >= 0, for exact values at or near zero (e.g. one
      gradient step from `w0 = 0`, where the unrolled hypergradient is exactly 0).

    **Returns:**

    The `Comparison`, if the check passed.

    **Raises:**

    `AssertionError` with both values and the error otherwise.

    **Example:**

    ```python
    import optax
    import bilevel as bl
    import bilevel.testing as blt

    exact = blt.Ridge.sample(1, dim=3)
    blt.assert_hypergrad_close(bl.implicit(bl.unroll(optax.sgd(0.1), 3000), bl.exact()), exact, rtol=1e-6)
    ```
    """
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"assert_hypergrad_close requires rtol > 0; got rtol={rtol!r}.")
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"assert_hypergrad_close requires atol >= 0; got atol={atol!r}.")
    cmp = hypergrad_error(method, exact, hparams, target=target)
    scale = tree_norm(cmp.expected)
    if not bool(cmp.abs_error <= atol + rtol * scale):
        raise AssertionError(
            f"{type(method).__name__} hypergradient differs from the exact {cmp.target} value on "
            f"{type(exact).__name__}: relative error {float(cmp.error):.3e} (absolute {float(cmp.abs_error):.3e}) exceeds "
            f"rtol={rtol:.1e}, atol={atol:.1e}.\n"
            f"got:      {cmp.grad}\nexpected: {cmp.expected}\nstats: {cmp.stats}"
        )
    return cmp
