"""The abstract method type every transform returns, and small shared helpers."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

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

    def _probe(self, dtype) -> Stats:
        """Zero scalars whose cotangents carry backward-pass diagnostics (none by default)."""
        del dtype
        return {}

    def _finalize(self, probe_cotangent: Stats) -> Stats:
        """Turn the probe's cotangent into reported stats (natural dtypes)."""
        return probe_cotangent

    def _check_batch(self, inner_batch) -> None:
        """Check the inner batch against the method's settings (step count) at trace time."""
        del inner_batch


def tree_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves of a pytree taken together."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(0.0)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))


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
