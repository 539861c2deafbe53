"""The abstract method type every transform returns, and small shared helpers."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._problem import Problem

PyTree = Any
Stats = dict


class AbstractMethod(eqx.Module):
    """How the inner parameters are found and how they are differentiated.

    Methods are immutable, problem-independent values built by `bilevel.unroll`,
    `bilevel.truncate`, `bilevel.implicit`, `bilevel.solver`. They are turned into plain
    JAX functions by `bilevel.response` and `bilevel.hypergrad`. Users do not subclass this.
    """

    @abc.abstractmethod
    def _run(self, problem: Problem, hparams, params0, batch, probe) -> tuple[PyTree, Stats]:
        """Return `(params, stats)`; params differentiable w.r.t. hparams by the method's rule.

        `probe` is the zero pytree from `_probe`; its cotangent carries the stats of the
        backward linear solve out of reverse-mode differentiation (see `_implicit.py`).
        """

    def _probe(self, dtype, params, adjoint0) -> PyTree:
        """Zeros whose cotangents carry backward-pass diagnostics (none by default).

        `adjoint0` is a warm start for the backward linear solve; only `implicit` has one.
        """
        del dtype, params
        if adjoint0 is not None:
            raise TypeError(
                "hypergrad(...)(..., adjoint0=v) warm-starts the backward linear solve of "
                f"bilevel.implicit; {type(self).__name__} has no linear solve. Drop adjoint0 "
                "(and warm_start_solve in hyperopt/optimize) for this method."
            )
        return {}

    def _finalize(self, probe_cotangent) -> tuple[Stats, PyTree]:
        """Turn the probe's cotangent into `(stats, adjoint)`: reported stats (natural
        dtypes) and the backward solve's solution (None without a linear solve)."""
        return probe_cotangent, None

    def _check_batch(self, inner_batch) -> None:
        """Check the inner batch against the method's settings (step count) at trace time."""
        del inner_batch

    def _check_memory(self, hparams, params0) -> None:
        """Raise at trace time when reverse mode through the method cannot fit in memory."""
        del hparams, params0

    def _start_refusal(self) -> str | None:
        """Why this method cannot differentiate a start point defined by the hyperparameters
        (`Problem(start=...)`), or None when it can (methods that differentiate the run)."""
        return (f"{type(self).__name__} does not differentiate through the inner run from its "
                "start, so the hyperparameters' path through the start point would be dropped")

    def _allows_complex(self) -> bool:
        """Whether complex inner parameters are differentiated correctly (autodiff: yes)."""
        return True


def tree_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves of a pytree taken together.

    Its derivative at the zero tree is zero rather than NaN (forward mode differentiates the
    norm of a Jacobian that starts at zero). A NaN or inf leaf gives a NaN or inf norm, never 0.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(0.0)
    sq = sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves)
    zero = sq == 0          # not `sq > 0`: that is False for NaN and would turn NaN into 0
    return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, sq)))


def zero_cotangent(x):
    """A zero cotangent for a primal leaf (float0 for integer and boolean leaves), for the
    backward rules of `jax.custom_vjp` methods (`drmad`, `mixflow`)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product of two pytrees with the same structure."""
    parts = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y), a, b)
    return sum(jax.tree_util.tree_leaves(parts))


def inner_grad(problem: Problem):
    """`(params, hparams, batch) -> ∂L_T/∂params`."""
    return jax.grad(problem.inner)


def grad_norm_stats(problem: Problem, params, hparams, batch) -> Stats:
    """The stationarity residual ‖∇_w L_T‖ at the point reached (not differentiated)."""
    g = inner_grad(problem)(*jax.lax.stop_gradient((params, hparams, batch)))
    return {"inner_grad_norm": tree_norm(g)}


def varying_axes(leaf) -> set:
    """The manual mesh axes a value varies over (`shard_map`); empty elsewhere."""
    aval = jax.typeof(leaf)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9 keeps them here ...
    if mat is not None:
        return set(mat.varying)
    return set(getattr(aval, "vma", ()))  # ... earlier versions as `vma`


def vary_like(tree, *references):
    """Inside `shard_map`, mark `tree`'s leaves as varying over the mesh axes the references vary over.

    Under `shard_map` (with its default `check_vma=True`) a replicated `params0` is
    device-invariant while the losses vary with sharded hyperparameters or data; JAX then
    sums the gradient with respect to the invariant params over devices, so every inner
    step would be wrong. Casting params0 (and the stats probe) to varying first keeps each
    device's computation its own. Outside `shard_map` this does nothing.
    """
    axes = set()
    for leaf in jax.tree_util.tree_leaves(references):
        axes |= varying_axes(leaf)
    if not axes:
        return tree

    def cast(leaf):
        missing = tuple(sorted(axes - varying_axes(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree_util.tree_map(cast, tree)
