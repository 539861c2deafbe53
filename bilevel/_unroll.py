"""Unrolled optimisation: `unroll` (forward by T optimizer steps) and `truncate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal as _Literal

from ._base import AbstractMethod, grad_norm_stats, inner_grad
from ._problem import PerStep, Problem, check_per_step

OptimizerLike = Union[optax.GradientTransformation, Callable]


def _check_int(value, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where} requires `{name}` to be a Python int; got {type(value).__name__} "
            f"{value!r}. Pass a whole number, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{where} requires `{name}` >= {minimum}; got {name}={value}. "
            f"Pass a value of at least {minimum}."
        )
    return value


def check_optimizer(optimizer, name: str, where: str) -> None:
    """Raise unless `optimizer` is a GradientTransformation or a function of the hparams."""
    if not isinstance(optimizer, optax.GradientTransformation) and not callable(optimizer):
        raise TypeError(
            f"{where} requires `{name}` to be an optax.GradientTransformation (e.g. "
            "optax.sgd(0.1)) or a function hparams -> GradientTransformation (to make optimizer "
            f"settings hyperparameters); got {type(optimizer).__name__} {optimizer!r}."
        )


def optimizer_at(optimizer: OptimizerLike, hparams) -> optax.GradientTransformation:
    """The optimizer itself, or `optimizer(hparams)` when it is a function of the hparams."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    opt = optimizer(hparams)
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            "An optimizer given as a function fn(hparams) must return an "
            f"optax.GradientTransformation; it returned {type(opt).__name__}. Return e.g. "
            "optax.sgd(hparams['lr'])."
        )
    return opt


def _slice_steps(batch, start: int, stop: int):
    """The per-step batches for steps [start, stop), or the shared batch."""
    if isinstance(batch, PerStep):
        return PerStep(jax.tree_util.tree_map(lambda x: x[start:stop], batch.batches))
    return batch


def _segments(batch, n_seg: int, length: int):
    """Per-step batches reshaped to (n_seg, length, ...) for a scan over segments."""
    if isinstance(batch, PerStep):
        return PerStep(
            jax.tree_util.tree_map(
                lambda x: x[: n_seg * length].reshape((n_seg, length) + x.shape[1:]),
                batch.batches,
            )
        )
    return batch


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact))


def _stored_steps(n: int, checkpoint: int | None) -> int:
    """How many optimizer states reverse mode keeps for `n` differentiated steps."""
    if checkpoint is None or checkpoint >= n:
        return n
    n_seg, rem = divmod(n, checkpoint)
    return n_seg + checkpoint + rem


def available_bytes() -> int | None:
    """Free memory of the default device (its allocator's limit; free RAM on CPU), or None."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    """A byte count in the largest unit that keeps it at least 1 (B, KiB, MiB, GiB, TiB)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def check_reverse_memory(unroll: "Unroll", hparams, params0, differentiated: int, where: str) -> None:
    """Raise MemoryError at trace time when reverse mode must store more than the device has.

    Reverse mode keeps at least the parameters and optimizer state of every differentiated
    step (of every segment boundary and one segment with `checkpoint`); that lower bound is
    compared with the free memory of the default device.
    """
    opt = unroll._optimizer(jax.lax.stop_gradient(hparams))
    state = jax.eval_shape(opt.init, params0)
    per_step = _nbytes(params0) + _nbytes(state)
    need = _stored_steps(differentiated, unroll.checkpoint) * per_step
    free = available_bytes()
    if free is None or need <= free:
        return
    k = max(1, int(differentiated**0.5))
    raise MemoryError(
        f"{where}: reverse-mode differentiation through {differentiated} steps stores at least "
        f"{_gib(need)} ({_stored_steps(differentiated, unroll.checkpoint)} copies of the "
        f"parameters and optimizer state, {_gib(per_step)} each), more than the {_gib(free)} "
        f"free on {jax.local_devices()[0].platform.upper()}. Use unroll(..., checkpoint={k}) "
        f"(about {_gib(_stored_steps(differentiated, k) * per_step)}), "
        "bilevel.forward_mode(unroll(...)) (memory independent of the steps), "
        "bilevel.truncate(..., last=K), or bilevel.implicit(...)."
    )


class Unroll(AbstractMethod):
    """T steps of an optax optimizer, differentiated exactly by autodiff. See `bilevel.unroll`."""

    optimizer: OptimizerLike = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    checkpoint: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        where = "unroll(optimizer, steps, checkpoint=...)"
        check_optimizer(self.optimizer, "optimizer", where)
        _check_int(self.steps, "steps", where, 1)
        if self.checkpoint is not None:
            _check_int(self.checkpoint, "checkpoint", where, 1)
            if self.checkpoint > self.steps:
                raise ValueError(
                    f"{where} requires checkpoint <= steps (the segment length in steps); got "
                    f"checkpoint={self.checkpoint} with steps={self.steps}. Use a segment "
                    f"length near sqrt(steps), e.g. checkpoint={max(1, int(self.steps**0.5))}."
                )

    def _optimizer(self, hparams) -> optax.GradientTransformation:
        return optimizer_at(self.optimizer, hparams)

    def _check_batch(self, inner_batch) -> None:
        check_per_step(inner_batch, self.steps, "inner data")

    def _check_memory(self, hparams, params0) -> None:
        check_reverse_memory(self, hparams, params0, self.steps, f"unroll(steps={self.steps})")

    def _scan(self, problem: Problem, opt, hparams, carry, batch, n: int, first_order: bool = False):
        """Run `n` optimizer steps from `carry = (params, opt_state)` with `lax.scan`
        (`first_order`: the inner gradients are constants to differentiation)."""
        grad = inner_grad(problem)
        per_step = isinstance(batch, PerStep)

        def step(carry, b):
            params, state = carry
            g = grad(params, hparams, b if per_step else batch)
            if first_order:
                g = jax.lax.stop_gradient(g)
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), None

        xs = batch.batches if per_step else None
        if n == 0:
            return carry
        if self.checkpoint is None or self.checkpoint >= n:
            return jax.lax.scan(step, carry, xs, length=n)[0]
        k = self.checkpoint
        n_seg, rem = divmod(n, k)

        @jax.checkpoint
        def segment(carry, seg):
            return jax.lax.scan(step, carry, seg, length=k)[0], None

        segs = _segments(batch, n_seg, k)
        carry = jax.lax.scan(segment, carry, segs.batches if per_step else None, length=n_seg)[0]
        tail = _slice_steps(batch, n_seg * k, n)
        return jax.lax.scan(step, carry, tail.batches if per_step else None, length=rem)[0]

    def _unrolled(self, problem, hparams, params0, batch, differentiate_last: int, first_order: bool = False):
        """Run all steps; gradients flow only through the last `differentiate_last` steps."""
        opt = self._optimizer(hparams)
        carry = (params0, opt.init(params0))
        frozen = self.steps - differentiate_last
        if frozen:
            h0 = jax.lax.stop_gradient(hparams)
            carry = self._scan(problem, self._optimizer(h0), h0, carry,
                               _slice_steps(batch, 0, frozen), frozen)
            carry = jax.lax.stop_gradient(carry)
        carry = self._scan(problem, opt, hparams, carry,
                           _slice_steps(batch, frozen, self.steps), differentiate_last, first_order)
        params = carry[0]
        return params, grad_norm_stats(problem, params, hparams, _last_batch(batch))

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        return self._unrolled(problem, hparams, params0, batch, self.steps)

    def _start_refusal(self) -> str | None:
        return None


def _last_batch(batch):
    """The batch of the final step (for the stationarity diagnostic)."""
    if isinstance(batch, PerStep):
        return jax.tree_util.tree_map(lambda x: x[-1], batch.batches)
    return batch


class Truncate(AbstractMethod):
    """Differentiate through the last K steps of an unroll only. See `bilevel.truncate`."""

    method: Unroll
    last: int = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.method, Unroll):
            raise TypeError(
                "truncate(method, last=K) requires an unrolled method, bilevel.unroll(...); got "
                f"{type(self.method).__name__}. Truncation drops all but the last K steps of an "
                "unroll's derivative, so it only applies to unroll: write "
                "bilevel.truncate(bilevel.unroll(optimizer, steps), last=K)."
            )
        _check_int(self.last, "last", "truncate(method, last=K)", 1)
        if self.last > self.method.steps:
            raise ValueError(
                "truncate(method, last=K) requires K <= the unroll's steps; got "
                f"last={self.last} with steps={self.method.steps}. Use last <= "
                f"{self.method.steps} (last == steps is plain unroll)."
            )

    def _check_batch(self, inner_batch) -> None:
        self.method._check_batch(inner_batch)

    def _check_memory(self, hparams, params0) -> None:
        check_reverse_memory(self.method, hparams, params0, self.last, f"truncate(..., last={self.last})")

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        params, stats = self.method._unrolled(problem, hparams, params0, batch, self.last)
        # Flags the approximation: the first steps - last steps are not differentiated.
        return params, {**stats, "truncated_steps": jnp.asarray(self.method.steps - self.last, jnp.int32)}

    def _start_refusal(self) -> str | None:
        return (f"truncate(..., last={self.last}) differentiates only the last {self.last} of "
                f"{self.method.steps} steps, so the path from the start point would be dropped "
                "(it is exactly zero)")


def _reaches(jaxpr, inputs) -> bool:
    """Whether any output of `jaxpr` depends on the invars at positions `inputs` (conservative:
    an equation with a dependent input makes all its outputs dependent)."""
    tainted = {id(jaxpr.invars[i]) for i in inputs}
    for eqn in jaxpr.eqns:
        if any(id(v) in tainted for v in eqn.invars if not isinstance(v, _Literal)):
            tainted.update(id(v) for v in eqn.outvars)
    return any(id(v) in tainted for v in jaxpr.outvars if not isinstance(v, _Literal))


def _inner_grad_uses_hparams(problem: Problem, hparams, params, batch) -> bool:
    closed = jax.make_jaxpr(lambda h: inner_grad(problem)(params, h, batch))(hparams)
    return _reaches(closed.jaxpr, range(len(closed.jaxpr.invars)))


class FirstOrder(AbstractMethod):
    """An unroll whose inner gradients are constants to differentiation. See `bilevel.first_order`."""

    method: Unroll

    def __check_init__(self):
        if not isinstance(self.method, Unroll):
            raise TypeError(
                "first_order(method) requires an unrolled method, bilevel.unroll(...); got "
                f"{type(self.method).__name__}. It treats the inner gradients of an unroll as "
                "constants (first-order MAML): write bilevel.first_order(bilevel.unroll(optimizer, steps))."
            )

    def _check_batch(self, inner_batch) -> None:
        self.method._check_batch(inner_batch)

    def _check_memory(self, hparams, params0) -> None:
        check_reverse_memory(self.method, hparams, params0, self.method.steps, "first_order(unroll(...))")

    def _run(self, problem, hparams, params0, batch, probe):
        del probe
        if _inner_grad_uses_hparams(problem, hparams, params0, _last_batch(batch)):
            raise TypeError(
                "first_order(unroll(...)) treats the inner gradients ∇_w L_T(w_t, λ) as constants, "
                "so hyperparameters that enter the inner loss would get a hypergradient of exactly "
                "zero, and this inner loss depends on the hyperparameters. Use bilevel.unroll for "
                "the exact hypergradient, or make the inner loss independent of hparams (first-order "
                "MAML differentiates only the start point, Problem(start=...), and the optimizer's "
                "settings)."
            )
        params, stats = self.method._unrolled(problem, hparams, params0, batch, self.method.steps,
                                              first_order=True)
        return params, {**stats, "first_order": jnp.asarray(True)}

    def _start_refusal(self) -> str | None:
        return None


def first_order(method: Unroll) -> FirstOrder:
    """First-order MAML: differentiate an unroll with its inner gradients held constant.

    The forward pass is the unroll's. In the backward pass each step's gradient
    ∇_w L_T(w_t, λ) is a constant (`jax.lax.stop_gradient`), so the Jacobian of w_T with
    respect to the start point is the identity for gradient descent (the dependence through
    the Hessians is dropped): with `Problem(start=lambda h: h)` the meta-gradient is
    ∇L_V(w_T), the first-order MAML of Finn et al. (2017). Optimizer settings that are
    hyperparameters (`unroll(lambda h: optax.sgd(h["lr"]), ...)`) get the first-order
    derivative through the updates, −Σ_t ∇_w L_T(w_t) for a learning rate of SGD.

    An approximation, not the exact derivative: the stats add `first_order` (True), and a
    hypergradient of hyperparameters that enter the inner loss would be exactly zero, so
    an inner loss that depends on `hparams` raises a `TypeError` when traced.

    **Arguments:**

    - `method`: a method built by `bilevel.unroll` (its steps, optimizer and checkpointing
      are kept).

    **Returns:**

    A method to pass to `bilevel.response` or `bilevel.hypergrad`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    task = lambda w, _, b: 0.5 * jnp.sum((w - b) ** 2)       # the task: reach the target b
    problem = bl.Problem(inner=task, outer=task, start=lambda h: h)   # λ is the initialisation
    fomaml = bl.hypergrad(problem, bl.first_order(bl.unroll(optax.sgd(0.1), steps=5)))
    out = fomaml(jnp.zeros(3), None, jnp.ones(3), 2.0 * jnp.ones(3))
    # first-order MAML's meta-gradient is ∇L_V(w_T) = w_T − 2
    assert jnp.allclose(out.grad, out.params - 2.0)
    ```
    """
    return FirstOrder(method)


def unroll(optimizer: OptimizerLike, steps: int, *, checkpoint: int | None = None) -> Unroll:
    """Find the inner parameters by `steps` optimizer steps and differentiate through them.

    The forward pass is `steps` updates of `optimizer` on the training loss, starting from
    `params0`, run with `jax.lax.scan` so compile time does not grow with `steps`. The
    derivative is exact automatic differentiation through every step (reverse mode stores
    the trajectory; forward mode carries tangents). With `checkpoint=k` the steps are split
    into segments of `k` and each segment is recomputed in the backward pass: same value and
    gradient, memory O(steps/k + k) instead of O(steps). Exact at every order (first
    derivatives, jvp, hyper-Hessians). When `bilevel.hypergrad` is traced it checks that the
    parameters and optimizer states reverse mode must keep fit in the default device's free
    memory, and raises a `MemoryError` naming the size and the alternatives otherwise.

    **Arguments:**

    - `optimizer`: an `optax.GradientTransformation`, or a function `hparams ->
      GradientTransformation` so optimizer settings (a learning rate) can be
      hyperparameters, e.g. `lambda h: optax.sgd(h["lr"])`.
    - `steps`: number of inner steps, a positive int.
    - `checkpoint`: optional segment length for rematerialisation (about `sqrt(steps)` is
      a good choice), `1 <= checkpoint <= steps`.

    **Returns:**

    A method to pass to `bilevel.response`, `bilevel.hypergrad`, `bilevel.truncate` or
    `bilevel.implicit`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.unroll(optax.sgd(0.1), steps=200, checkpoint=20)
    out = bl.hypergrad(problem, method)(jnp.asarray(0.3), jnp.zeros(3), None, None)
    print(out.value, out.grad)
    ```
    """
    return Unroll(optimizer, steps, checkpoint)


def truncate(method: Unroll, *, last: int) -> Truncate:
    """Differentiate an unroll through its last `last` steps only.

    All `steps` of the unroll still run forward; the first `steps - last` are treated as
    constants, so reverse mode stores only the last `last` steps (truncated
    back-propagation). `last == steps` is the full unroll.

    An approximation whenever `last < steps`: the hypergradient is biased (it ignores how
    the first steps depend on λ), and second derivatives (a hyper-Hessian) differentiate
    the truncated graph, which is neither the true Hessian nor the derivative of the
    truncated hypergradient. Its stats add `truncated_steps` (`steps - last`) beside
    `inner_grad_norm`, so a result says it was truncated.

    **Arguments:**

    - `method`: a method built by `bilevel.unroll`.
    - `last`: the number of final steps to differentiate through, `1 <= last <= steps`.

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
    method = bl.truncate(bl.unroll(optax.sgd(0.1), steps=500), last=20)
    out = bl.hypergrad(problem, method)(jnp.asarray(0.3), jnp.zeros(3), None, None)
    ```
    """
    return Truncate(method, last)
