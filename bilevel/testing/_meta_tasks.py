"""Quadratic meta-learning tasks ([`bilevel.testing.QuadraticTasks`][]): MAML, first-order MAML,
Meta-SGD and iMAML meta-gradients in closed form, for checking meta-learning pipelines."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._meta import anchored
from .._problem import Problem
from ._common import _rng, check_int, check_real, resolve_dtype, spd

Array = jax.Array


def _task_inner(w, hparams, batch):
    """Task i's training loss ½(w − c_i)ᵀA_i(w − c_i); batch = (A_i, c_i)."""
    del hparams
    A, c = batch
    return 0.5 * (w - c) @ A @ (w - c)


def _task_outer(w, hparams, batch):
    """Task i's validation loss ½(w − d_i)ᵀB_i(w − d_i); batch = (B_i, d_i)."""
    del hparams
    B, d = batch
    return 0.5 * (w - d) @ B @ (w - d)


def _maml_start(hparams):
    return hparams


_MAML_PROBLEM = Problem(inner=_task_inner, outer=_task_outer, start=_maml_start)


def _rates(lr, dim: int, where: str) -> np.ndarray:
    rates = np.broadcast_to(np.asarray(lr, np.float64), (dim,)) if np.ndim(lr) <= 1 else None
    if rates is None or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(
            f"{where} requires lr > 0: a number, or one rate per parameter (shape ({dim},), "
            f"Meta-SGD); got {lr!r}."
        )
    return rates


class QuadraticTasks(eqx.Module):
    """A batch of quadratic tasks whose meta-gradients are known in closed form.

    Task i trains on L_i(w) = ½(w − c_i)ᵀA_i(w − c_i) (its support set) and is evaluated
    on L̂_i(w) = ½(w − d_i)ᵀB_i(w − d_i) (its query set), A_i and B_i symmetric positive
    definite. With the meta-parameters λ as the start point, T steps of gradient descent
    with rates α (a number, or one per coordinate: Meta-SGD's diag(α)) reach
    w_i = c_i + M_i(λ − c_i), M_i = (I − diag(α)A_i)^T, and

    - MAML's meta-gradient is mean_i M_iᵀ B_i (w_i − d_i);
    - first-order MAML's is mean_i B_i (w_i − d_i);
    - iMAML's (inner loss L_i + (μ/2)‖w − λ‖², solved exactly) is
      mean_i μ(A_i + μI)⁻¹ B_i (w_i* − d_i) with w_i* = (A_i + μI)⁻¹(A_i c_i + μλ).

    The closed forms are computed with NumPy in float64, without autodiff.

    **Fields:**

    - `inner_data`: `(A, c)`, each with a leading task axis: the support data (`inner_batch`).
    - `outer_data`: `(B, d)`, the query data (`outer_batch`).
    - `hparams`: a default meta-parameter value λ, shape `(dim,)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, numpy as np, optax
    import bilevel as bl
    import bilevel.testing as blt

    jax.config.update("jax_enable_x64", True)
    tasks = blt.QuadraticTasks.sample(0, num_tasks=5, dim=3)
    maml = bl.over_tasks(bl.hypergrad(tasks.problem, bl.unroll(optax.sgd(0.05), steps=4)))
    out = maml(tasks.hparams, None, tasks.inner_data, tasks.outer_data)
    np.testing.assert_allclose(out.grad, tasks.maml_grad(tasks.hparams, 0.05, 4), rtol=1e-10)
    ```
    """

    inner_data: tuple
    outer_data: tuple
    hparams: Array

    @classmethod
    def sample(cls, key_or_seed: Any, *, num_tasks: int = 4, dim: int = 3,
               max_condition: float = 10.0, dtype: Any = None) -> "QuadraticTasks":
        """Draw tasks with Hessians whose eigenvalues lie in [1, max_condition].

        **Arguments:**

        - `key_or_seed`: a non-negative int seed or a JAX PRNG key.
        - `num_tasks`: the number of tasks (leading axis of the data), >= 1.
        - `dim`: the parameter dimension, >= 1.
        - `max_condition`: κ >= 1, the bound on the Hessians' condition numbers (gradient
          descent is stable for rates below 2/κ).
        - `dtype`: a floating dtype; default float64 under x64, float32 otherwise.

        **Returns:**

        A `QuadraticTasks`.
        """
        where = "QuadraticTasks.sample(key_or_seed, num_tasks=..., dim=...)"
        rng = _rng(key_or_seed, where)
        n = check_int(num_tasks, "num_tasks", where, 1, 4)
        d = check_int(dim, "dim", where, 1, 3)
        kappa = check_real(max_condition, "max_condition", where, low=1.0, strict=False, example=10.0)
        dt = resolve_dtype(dtype, where)
        A = np.stack([spd(rng, d, kappa) for _ in range(n)])
        B = np.stack([spd(rng, d, kappa) for _ in range(n)])
        c, dd, lam = rng.standard_normal((n, d)), rng.standard_normal((n, d)), rng.standard_normal(d)
        as_ = lambda x: jnp.asarray(x, dt)  # noqa: E731
        return cls((as_(A), as_(c)), (as_(B), as_(dd)), as_(lam))

    @property
    def problem(self) -> Problem:
        """The MAML problem: the task losses, with the run starting at λ (`start=lambda h: h`)."""
        return _MAML_PROBLEM

    def imaml_problem(self, strength: float) -> Problem:
        """The iMAML problem: the task training loss plus (μ/2)‖w − λ‖² (`bilevel.anchored`).

        **Arguments:**

        - `strength`: μ > 0.

        **Returns:**

        A `bilevel.Problem` without a start point (solve it from any params0).
        """
        return Problem(inner=anchored(_task_inner, strength), outer=_task_outer)

    def _host(self):
        A, c = (np.asarray(x, np.float64) for x in self.inner_data)
        B, d = (np.asarray(x, np.float64) for x in self.outer_data)
        return A, c, B, d

    def _maps(self, lr, steps: int, where: str):
        A, c, B, d = self._host()
        steps = check_int(steps, "steps", where, 0, 5)
        D = np.diag(_rates(lr, A.shape[-1], where))
        M = np.stack([np.linalg.matrix_power(np.eye(A.shape[-1]) - D @ a, steps) for a in A])
        return M, c, B, d

    def adapted(self, hparams, lr, steps: int) -> np.ndarray:
        """Each task's parameters after `steps` gradient-descent steps from λ: shape (tasks, dim).

        **Arguments:**

        - `hparams`: λ, shape `(dim,)`.
        - `lr`: the rate, a number or one per coordinate.
        - `steps`: T >= 0.

        **Returns:**

        w_i = c_i + (I − diag(α)A_i)^T(λ − c_i), stacked (NumPy float64).
        """
        M, c, _, _ = self._maps(lr, steps, "QuadraticTasks.adapted(hparams, lr, steps)")
        lam = np.asarray(hparams, np.float64)
        return c + np.einsum("nij,nj->ni", M, lam - c)

    def maml_grad(self, hparams, lr, steps: int) -> np.ndarray:
        """MAML's meta-gradient, mean_i M_iᵀB_i(w_i − d_i) (NumPy float64, shape (dim,)).

        **Arguments:** as for `adapted`.

        **Returns:**

        The exact gradient of the mean query loss after adaptation with respect to λ.
        """
        M, _, B, d = self._maps(lr, steps, "QuadraticTasks.maml_grad(hparams, lr, steps)")
        r = np.einsum("nij,nj->ni", B, self.adapted(hparams, lr, steps) - d)
        return np.mean(np.einsum("nji,nj->ni", M, r), axis=0)

    def meta_value(self, hparams, lr, steps: int) -> float:
        """The mean query loss after adaptation, mean_i ½(w_i − d_i)ᵀB_i(w_i − d_i).

        **Arguments:** as for `adapted`.

        **Returns:**

        A Python float.
        """
        _, _, B, d = self._maps(lr, steps, "QuadraticTasks.meta_value(hparams, lr, steps)")
        e = self.adapted(hparams, lr, steps) - d
        return float(np.mean(0.5 * np.einsum("ni,nij,nj->n", e, B, e)))

    def fomaml_grad(self, hparams, lr, steps: int) -> np.ndarray:
        """First-order MAML's meta-gradient, mean_i B_i(w_i − d_i) (NumPy float64).

        **Arguments:** as for `adapted`.

        **Returns:**

        The mean query-loss gradient at the adapted parameters.
        """
        _, _, B, d = self._maps(lr, steps, "QuadraticTasks.fomaml_grad(hparams, lr, steps)")
        return np.mean(np.einsum("nij,nj->ni", B, self.adapted(hparams, lr, steps) - d), axis=0)

    def imaml_adapted(self, hparams, strength: float) -> np.ndarray:
        """Each task's exact minimiser of L_i(w) + (μ/2)‖w − λ‖²: (A_i + μI)⁻¹(A_i c_i + μλ).

        **Arguments:**

        - `hparams`: λ, shape `(dim,)`.
        - `strength`: μ > 0.

        **Returns:**

        Shape (tasks, dim), NumPy float64.
        """
        where = "QuadraticTasks.imaml_adapted(hparams, strength)"
        mu = check_real(strength, "strength", where, low=0.0, strict=True, example=1.0)
        A, c, _, _ = self._host()
        lam = np.asarray(hparams, np.float64)
        eye = np.eye(A.shape[-1])
        return np.stack([np.linalg.solve(a + mu * eye, a @ ci + mu * lam) for a, ci in zip(A, c)])

    def imaml_grad(self, hparams, strength: float) -> np.ndarray:
        """iMAML's meta-gradient, mean_i μ(A_i + μI)⁻¹B_i(w_i* − d_i) (NumPy float64).

        **Arguments:** as for `imaml_adapted`.

        **Returns:**

        The exact gradient, shape (dim,).
        """
        mu = float(strength)
        A, _, B, d = self._host()
        w = self.imaml_adapted(hparams, strength)
        eye = np.eye(A.shape[-1])
        g = [mu * np.linalg.solve(a + mu * eye, b @ (wi - di)) for a, b, wi, di in zip(A, B, w, d)]
        return np.mean(g, axis=0)
