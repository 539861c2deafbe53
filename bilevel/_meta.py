"""Meta-learning pieces: a proximal centre for implicit MAML, per-parameter SGD for
Meta-SGD, and meta-batches of tasks as one `vmap`.

The start point of MAML itself is `Problem(start=...)` (`_problem.py`); first-order MAML is
`first_order` (`_unroll.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ._compile import HypergradResult
from ._problem import PerStep, tree_summary

PyTree = Any


def _check_strength(strength, where: str) -> None:
    if callable(strength):
        return
    ok = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    if not ok or not math.isfinite(strength) or strength <= 0:
        raise ValueError(
            f"{where} requires `strength` > 0, a finite Python number (μ, the weight of "
            "(μ/2)‖w − centre‖²) or a function hparams -> scalar for a learned strength; got "
            f"{strength!r}. iMAML uses values around 0.1-10 (larger keeps the adapted "
            "parameters closer to the meta-parameters)."
        )


def anchored(loss: Callable, strength: float | Callable, *, center: Callable | None = None) -> Callable:
    """A loss plus a proximal term that pulls the parameters toward a centre set by λ.

    Returns `(w, λ, batch) -> loss(w, λ, batch) + (μ/2)‖w − c(λ)‖²` with μ = `strength`
    and c = `center` (λ itself by default). As the inner loss of implicit MAML (iMAML,
    Rajeswaran et al. 2019), λ are the meta-parameters: the adapted parameters w* depend on
    λ through the centre, and `bilevel.implicit` gives the exact meta-gradient
    μ(H + μI)⁻¹∇L_V(w*) = (I + H/μ)⁻¹∇L_V(w*) with H the task loss's Hessian at w*, for any
    number of inner steps at the memory of one.

    **Arguments:**

    - `loss`: the task's training loss `loss(params, hparams, batch) -> scalar`.
    - `strength`: μ > 0, a Python number, or a function `hparams -> scalar` (a learned
      strength; keep it positive, e.g. `lambda h: jnp.exp(h["log_mu"])`).
    - `center`: optional `center(hparams) -> params`, the centre as a function of the
      hyperparameters (e.g. `lambda h: h["init"]` when λ holds more than the centre);
      default: λ itself (then λ must have the tree of the parameters).

    **Returns:**

    The inner loss `(params, hparams, batch) -> scalar`, for `bilevel.Problem(inner=...)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    task = lambda w, _, b: 0.5 * jnp.sum((w - b) ** 2)            # reach the target b
    problem = bl.Problem(inner=bl.anchored(task, 2.0), outer=task)  # λ is the proximal centre
    imaml = bl.hypergrad(problem, bl.implicit(bl.unroll(optax.sgd(0.2), steps=100), bl.cg()))
    out = imaml(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), 2.0 * jnp.ones(3))
    # H = I, μ = 2: the meta-gradient is μ (H + μI)⁻¹ ∇L_V(w*) = (2/3) (w* − 2)
    assert jnp.allclose(out.grad, (2.0 / 3.0) * (out.params - 2.0), atol=1e-5)
    ```
    """
    where = "anchored(loss, strength, *, center=None)"
    if not callable(loss):
        raise TypeError(
            f"{where} requires `loss`, a function (params, hparams, batch) -> scalar; got "
            f"{type(loss).__name__} {loss!r}."
        )
    _check_strength(strength, where)
    if center is not None and not callable(center):
        raise TypeError(
            f"{where} requires `center` to be None (the centre is λ itself) or a function "
            f"hparams -> params; got {type(center).__name__} {center!r}."
        )

    def inner(params, hparams, batch):
        c = hparams if center is None else center(hparams)
        if jax.tree_util.tree_structure(c) != jax.tree_util.tree_structure(params):
            raise ValueError(
                f"{where}: the centre must have the tree of the parameters; got centre "
                f"{tree_summary(c)} for parameters {tree_summary(params)}. Pass "
                "center=lambda h: ... that picks the parameter-shaped part of hparams."
            )
        mu = strength(hparams) if callable(strength) else strength
        sq = sum(jnp.sum((w - x) ** 2) for w, x in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(c)))
        return loss(params, hparams, batch) + 0.5 * mu * sq

    return inner


def per_parameter_sgd(rates: PyTree) -> optax.GradientTransformation:
    """Gradient descent with one learning rate per parameter entry (Meta-SGD's inner optimizer).

    The update is −α ⊙ g, with α a tree of the parameters' shapes (or any tree that
    broadcasts against them leaf by leaf). With `unroll(lambda h: per_parameter_sgd(h["lr"]),
    steps)` the rates are hyperparameters, meta-learned beside the initialisation as in
    Meta-SGD (Li et al. 2017).

    **Arguments:**

    - `rates`: the learning rates α, a pytree with the structure of the parameters.

    **Returns:**

    An `optax.GradientTransformation` (stateless).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    opt = bl.per_parameter_sgd({"w": jnp.array([0.1, 0.5])})
    g = {"w": jnp.array([1.0, 1.0])}
    updates, _ = opt.update(g, opt.init(g))
    assert jnp.allclose(updates["w"], jnp.array([-0.1, -0.5]))
    ```
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        if jax.tree_util.tree_structure(updates) != jax.tree_util.tree_structure(rates):
            raise ValueError(
                "per_parameter_sgd(rates) requires rates with the tree of the parameters; got "
                f"rates {tree_summary(rates)} for gradients {tree_summary(updates)}."
            )
        return jax.tree_util.tree_map(lambda a, g: -a * g, rates, updates), state

    return optax.GradientTransformation(init, update)


def _task_count(tree: PyTree, name: str, where: str) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree.batches if isinstance(tree, PerStep) else tree)
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"{where} requires every leaf of {name} to have a leading task axis; "
                f"{name}{jax.tree_util.keystr(path)} is a scalar. Stack the tasks' data along a "
                "new first axis (jnp.stack or jax.tree.map(lambda *x: jnp.stack(x), *tasks))."
            )
        sizes[f"{name}{jax.tree_util.keystr(path)}"] = shape[0]
    return sizes


def over_tasks(hypergrad_fn: Callable) -> Callable:
    """A meta-batch of tasks as one vmapped call: the mean meta-gradient over tasks.

    Wraps a function built by `bilevel.hypergrad` so that the inner and outer data carry a
    leading task axis (task i's support set `inner_batch[i]`, its query set
    `outer_batch[i]`), with the hyperparameters (the meta-parameters) and `params0` shared
    by all tasks. The tasks run as one `jax.vmap`, not a Python loop; the result's `value`
    and `grad` are the means over tasks (the meta-objective and its gradient), while
    `params`, `stats` (and `adjoint`) keep the task axis.

    **Arguments:**

    - `hypergrad_fn`: `hg(hparams, params0, inner_batch, outer_batch, ...)` from
      `bilevel.hypergrad`, e.g. with `Problem(start=...)` for MAML or `bilevel.anchored`
      for iMAML.

    **Returns:**

    `meta(hparams, params0, inner_batches, outer_batches) -> HypergradResult` (mean value
    and grad; per-task params and stats). Raises a `ValueError` when the leading axes of
    the batches differ.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import optax
    import bilevel as bl

    task = lambda w, _, b: 0.5 * jnp.sum((w - b) ** 2)
    problem = bl.Problem(inner=task, outer=task, start=lambda h: h)          # MAML
    maml = bl.over_tasks(bl.hypergrad(problem, bl.unroll(optax.sgd(0.1), steps=5)))
    support = jax.random.normal(jax.random.key(0), (32, 3))       # 32 tasks, one target each
    out = jax.jit(maml)(jnp.zeros(3), None, support, support)
    assert out.grad.shape == (3,) and out.params.shape == (32, 3)
    ```
    """
    if not callable(hypergrad_fn):
        raise TypeError(
            "over_tasks(hypergrad_fn) requires the function returned by bilevel.hypergrad("
            f"problem, method); got {type(hypergrad_fn).__name__} {hypergrad_fn!r}."
        )
    where = "over_tasks(hg)(hparams, params0, inner_batches, outer_batches)"

    def meta(hparams, params0, inner_batches, outer_batches):
        sizes = {**_task_count(inner_batches, "inner_batches", where),
                 **_task_count(outer_batches, "outer_batches", where)}
        if not sizes:
            raise ValueError(
                f"{where} requires task data with a leading task axis; the inner and outer "
                "batches are both empty (None). Pass each task's support and query data "
                "stacked along a first axis."
            )
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
            raise ValueError(
                f"{where} requires the same number of tasks (leading axis) in every leaf of the "
                f"inner and outer batches; got {listing}. Each task needs its support and query "
                "data at the same index."
            )
        per_task = jax.vmap(lambda i, o: hypergrad_fn(hparams, params0, i, o))(inner_batches, outer_batches)
        if not isinstance(per_task, HypergradResult):
            raise TypeError(
                f"{where} requires hypergrad_fn to return a bilevel.HypergradResult (build it with "
                f"bilevel.hypergrad); it returned {type(per_task).__name__}."
            )
        mean = lambda t: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), t)   # noqa: E731
        return per_task._replace(value=jnp.mean(per_task.value), grad=mean(per_task.grad))

    return meta
