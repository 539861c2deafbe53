"""Problem definitions: the two losses of a bilevel problem, and per-step data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Problem(eqx.Module):
    """A bilevel problem: a training loss and a validation loss over parameter pytrees.

    The hyperparameters λ are chosen to minimise `outer(w*(λ), λ, outer_batch)` where
    `w*(λ)` minimises `inner(w, λ, inner_batch)`. Both losses are pure functions
    `f(params, hparams, batch) -> scalar` over arbitrary pytrees (dicts, tuples, equinox
    modules); `batch` may be `None` for problems without data.

    A `Problem` knows nothing about how `w*` is found or differentiated: combine it with a
    method (`bilevel.unroll`, `bilevel.implicit`, ...) through `bilevel.response` or
    `bilevel.hypergrad`.

    **Arguments:**

    - `inner`: the training loss `L_T(params, hparams, batch) -> scalar`.
    - `outer`: the validation loss `L_V(params, hparams, batch) -> scalar`.
    - `start`: optional `start(hparams) -> params`, the inner run's starting point as a
      function of the hyperparameters (MAML: `start=lambda h: h`, the meta-learned
      initialisation; Meta-SGD: `start=lambda h: h["init"]`). The response then starts at
      `start(λ)` and the hypergradient includes the path through it; call the compiled
      functions with `params0=None`. Only methods that differentiate through the inner run
      accept it: `bilevel.unroll` (exact) and `bilevel.first_order` (first-order MAML).
      `implicit` refuses it, since the fixed point it differentiates does not depend on
      where the run started (for implicit MAML, put the meta-parameters into the inner loss
      as a proximal centre: `bilevel.anchored`).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    def train_loss(w, log_lam, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w

    def val_loss(w, log_lam, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    problem = bl.Problem(inner=train_loss, outer=val_loss)
    ```
    """

    inner: Callable = eqx.field(static=True)
    outer: Callable = eqx.field(static=True)
    start: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        for name in ("inner", "outer"):
            fn = getattr(self, name)
            if not callable(fn):
                raise TypeError(
                    f"Problem({name}=...) requires a callable loss "
                    f"`{name}(params, hparams, batch) -> scalar`; got {type(fn).__name__} "
                    f"{fn!r}. Pass the loss function itself, e.g. Problem(inner=train_loss, "
                    "outer=val_loss)."
                )
        if self.start is not None and not callable(self.start):
            raise TypeError(
                "Problem(start=...) requires a callable `start(hparams) -> params` (the inner "
                f"run's starting point as a function of the hyperparameters); got "
                f"{type(self.start).__name__} {self.start!r}. For MAML write "
                "Problem(inner, outer, start=lambda h: h); for a fixed start, leave start unset "
                "and pass params0."
            )


def refuse_start(problem: Problem, where: str) -> None:
    """Raise for a problem with a hyperparameter-defined start in a driver that ignores it."""
    if problem.start is not None:
        raise TypeError(
            f"{where} does not support Problem(start=...): it runs the inner parameters from "
            "the params it is given and would silently drop the path from the hyperparameters "
            "through the start point. Compute meta-gradients with bilevel.hypergrad(problem, "
            "bilevel.unroll(...)) (or bilevel.first_order(bilevel.unroll(...))), or build the "
            "problem without start and pass params0."
        )


class PerStep(eqx.Module):
    """Per-step inner data: a pytree whose leaves have leading axis equal to the step count.

    Build it with [`bilevel.per_step`][]; see there.
    """

    batches: PyTree
    curvature: PyTree = None


def per_step(stacked: PyTree, *, curvature: PyTree = None) -> PerStep:
    """Mark inner data as one minibatch per inner step.

    Methods that take steps (`bilevel.unroll` and the transforms built on it) use slice
    `t` of every leaf at step `t`. Without this wrapper a batch is used whole at every
    step: which of the two is meant is never guessed from shapes. The leading axis of
    every leaf must equal the method's `steps`; this is checked when the compiled function
    is called.

    Under `bilevel.implicit`, the Hessian and the cross derivative of the implicit function
    theorem need a training batch too: by default the mean over the per-step minibatches
    (the full batch they form); `implicit(..., curvature=...)` chooses another, and
    `curvature="given"` uses the batch passed here.

    **Arguments:**

    - `stacked`: a pytree of arrays, each with leading axis `steps`.
    - `curvature`: optional batch (used whole) for `implicit(..., curvature="given")`.

    **Returns:**

    A `PerStep` wrapper to pass as `inner_batch`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, x: 0.5 * jnp.sum((w - x) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, x: 0.5 * jnp.sum(w ** 2),
    )
    xs = jnp.ones((10, 3))                       # one 3-vector per step
    respond = bl.response(problem, bl.unroll(optax.sgd(0.1), steps=10))
    w = respond(jnp.asarray(0.1), jnp.zeros(3), bl.per_step(xs))
    ```
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves:
        raise ValueError(
            "per_step(stacked) requires a pytree with at least one array leaf whose leading "
            f"axis is the step count; got {stacked!r}. For problems without data pass "
            "inner_batch=None instead of per_step(...)."
        )
    for leaf in leaves:
        if np.ndim(leaf) == 0:
            raise ValueError(
                "per_step(stacked) requires every leaf to have a leading step axis; got a "
                f"scalar leaf {leaf!r}. Stack one batch per step along axis 0, or pass the "
                "batch without per_step(...) to use it at every step."
            )
    return PerStep(stacked, curvature)


def check_per_step(data, steps: int, what: str) -> None:
    """Raise unless `per_step(...)` data has one batch per step (leading axis == steps)."""
    if not isinstance(data, PerStep):
        return
    for leaf in jax.tree_util.tree_leaves(data.batches):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != steps:
            got = jnp.shape(leaf)[0] if jnp.ndim(leaf) else "a scalar"
            raise ValueError(
                f"per_step(...) {what} must have leading axis == steps={steps} (one batch per "
                f"step); a leaf has leading axis {got} in {tree_summary(data.batches)}. Stack "
                f"exactly {steps} batches, or pass one batch without per_step(...) to reuse it "
                "at every step."
            )


def tree_summary(tree: PyTree) -> str:
    """A short description of a pytree's structure and leaf shapes, for error messages."""
    shapes = jax.tree_util.tree_map(lambda x: getattr(x, "shape", type(x).__name__), tree)
    text = str(shapes)
    return text if len(text) < 300 else text[:297] + "..."


def typed_summary(tree: PyTree) -> str:
    """Like `tree_summary` with dtypes: `{'W': f32[3,2]}`, for errors about dtypes."""
    def leaf(x):
        if not hasattr(x, "shape"):
            return type(x).__name__
        name = jnp.dtype(x.dtype).name.replace("float", "f").replace("uint", "u").replace("int", "i")
        return f"{name}{list(x.shape)}".replace(" ", "")
    text = str(jax.tree_util.tree_map(leaf, tree)).replace("'", "")
    return text if len(text) < 300 else text[:297] + "..."


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def check_hparams(hparams: PyTree, where: str) -> None:
    """Raise if any hyperparameter leaf is not a floating-point array."""
    leaves = jax.tree_util.tree_leaves(hparams)
    if not leaves:
        raise ValueError(
            f"{where} requires hparams with at least one floating-point array leaf; got "
            f"{hparams!r}. Pass the hyperparameters to differentiate, e.g. jnp.asarray(0.1)."
        )
    for leaf in leaves:
        if not _is_float(leaf):
            raise TypeError(
                f"{where} requires floating-point hyperparameters (they are differentiated); "
                f"got a leaf of dtype {jnp.result_type(leaf)} in hparams "
                f"{tree_summary(hparams)}. Convert it, e.g. jnp.asarray(x, dtype=float)."
            )


def _leaf_path(path) -> str:
    return jax.tree_util.keystr(path)


def check_params0(params0: PyTree, where: str, *, allow_complex: bool = True) -> None:
    """Raise if a numeric leaf of params0 could not be trained.

    Only floating-point arrays are optimised and differentiated; any other leaf passes
    through unchanged. An integer array or a Python number among them is almost always a
    mistake (`jnp.array([0, 0, 0])`, `0.0`): it would silently never move, and the
    hypergradient through it would be exactly zero. Complex leaves are refused where the
    method's linear algebra is only real (`allow_complex=False`).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params0):
        if isinstance(leaf, bool) or (not isinstance(leaf, (int, float, complex)) and not hasattr(leaf, "dtype")):
            continue  # functions, strings, flags: held fixed by design
        if isinstance(leaf, (int, float, complex)):
            raise TypeError(
                f"{where} requires the numeric leaves of params0 to be floating-point arrays (only "
                f"arrays are trained); got a Python {type(leaf).__name__} {leaf!r} at params0"
                f"{_leaf_path(path)}, which would be held fixed and give a zero hypergradient. Pass "
                f"jnp.asarray({float(leaf.real) if isinstance(leaf, complex) else float(leaf)!r}) "
                "instead, or make it a static field (eqx.field(static=True)) if it is a setting."
            )
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating) and not allow_complex:
            raise TypeError(
                f"{where} does not support complex inner parameters: params0{_leaf_path(path)} has "
                f"dtype {dtype}. The implicit-function and forward-mode rules here solve a real "
                "linear system. Split the parameter into real and imaginary parts (two float "
                "arrays), or use bilevel.unroll, which differentiates through the steps."
            )
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{where} requires the array leaves of params0 to be floating point (they are "
                f"trained and differentiated); got dtype {dtype} at params0{_leaf_path(path)} "
                f"(shape {tuple(jnp.shape(leaf))}). An integer array would never move and its "
                "hypergradient would be exactly zero. Convert it, e.g. jnp.zeros(3) instead of "
                "jnp.array([0, 0, 0]), or x.astype(float)."
            )


def canonical(tree: PyTree) -> PyTree:
    """NumPy arrays and scalars among the leaves as JAX arrays (other leaves unchanged).

    A NumPy array closed over inside `jax.jit` becomes a constant that custom derivative
    rules cannot take; converting at the entry of every compiled function avoids that.
    Tracers are copied (XLA elides the copy): `jax.vmap` over a NumPy array inside
    `jax.jit` yields a batch tracer holding the raw NumPy value, which the custom JVP rules
    of `implicit` and `forward_mode` would otherwise pass on as a non-canonical constant.
    """
    def leaf(x):
        if isinstance(x, (np.ndarray, np.generic)):
            return jnp.asarray(x)
        if isinstance(x, jax.core.Tracer):
            return jnp.array(x, copy=True)
        return x

    return jax.tree_util.tree_map(leaf, tree)


def check_loss(fn: Callable, name: str, params, hparams, batch) -> None:
    """Check at trace time that `fn(params, hparams, batch)` runs and returns a float scalar."""
    try:
        out = eqx.filter_eval_shape(fn, params, hparams, batch)
    except Exception as err:  # re-raised with the context a user needs
        kind = type(err) if type(err) in (TypeError, ValueError) else ValueError
        raise kind(
            f"Calling the {name} loss as {name}(params, hparams, batch) failed: {err}\n"
            f"params had structure {tree_summary(params)}; hparams had structure "
            f"{tree_summary(hparams)}. Check that params0 has the tree the loss expects "
            "(same keys, nesting and shapes) and that the batch matches the loss."
        ) from err
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()):
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else tree_summary(out)
        raise TypeError(
            f"The {name} loss must return a scalar; it returned {got}. Reduce it, e.g. "
            "with jnp.mean(...) or jnp.sum(...)."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"The {name} loss must return a floating-point scalar; it returned dtype "
            f"{out.dtype}. Make sure it computes in floating point (e.g. cast integer "
            "inputs with .astype(float))."
        )
