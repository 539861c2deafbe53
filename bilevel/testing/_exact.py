"""The interface of the exact problems whose inner problem is smooth and unconstrained.

[`bilevel.testing.AbstractExactProblem`][] is implemented by [`bilevel.testing.Ridge`][] and
[`bilevel.testing.RidgePerCoordinate`][] (`_ridge.py`), [`bilevel.testing.Quadratic004`][]
(`_quadratic004.py`), [`bilevel.testing.UnrolledQuadratic`][] (`_unrolled.py`) and
[`bilevel.testing.AffineResponse`][] (`_affine.py`). Every quantity there is written out by
hand with `jax.numpy` linear algebra, never with autodiff of the losses, so that the problems
are an independent reference for autodiff-based methods. The losses exposed through
`.problem` are module-level pure functions that read their data from `batch` only, so one
`Problem` serves every instance (and `vmap` over datasets).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import numpy as np

from .._problem import Problem

Array = jax.Array


class AbstractExactProblem(eqx.Module):
    """A bilevel problem whose response, value, Hessian and hypergradient are known exactly.

    Concrete subclasses ([`bilevel.testing.Ridge`][], [`bilevel.testing.RidgePerCoordinate`][],
    [`bilevel.testing.Quadratic004`][], [`bilevel.testing.UnrolledQuadratic`][]) are final
    `equinox.Module`s holding the data as array fields. Every closed form is written with
    `jax.numpy` linear algebra only (no autodiff of the losses), works under `jit` and
    `vmap` (over hyperparameters, or over instances stacked leaf-wise), and is computed in
    the problem's `dtype` (hyperparameters are cast to it).

    The hypergradient is `d L_V(w*(λ), λ) / dλ` with `w*(λ) = argmin_w L_T(w, λ)`, i.e. by
    the implicit function theorem

        ∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ (∂²L_T/∂w²)⁻¹ ∂L_V/∂w    at w = w*(λ).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Ridge.sample(0, dim=3)
    problem = exact.problem                    # a bilevel.Problem
    loss = problem.inner(exact.params0, exact.hparams, exact.inner_batch)
    assert jnp.shape(exact.hypergrad(exact.hparams)) == jnp.shape(exact.hparams)
    ```
    """

    @property
    @abc.abstractmethod
    def problem(self) -> Problem:
        """The `bilevel.Problem` (training and validation loss) this instance's data is for."""

    @property
    @abc.abstractmethod
    def hparams(self) -> Array:
        """A default hyperparameter value (the one the instance was built with)."""

    @property
    @abc.abstractmethod
    def params0(self) -> Array:
        """A default initial value of the inner parameters."""

    @property
    @abc.abstractmethod
    def inner_batch(self):
        """The batch to pass to `problem.inner`."""

    @property
    @abc.abstractmethod
    def outer_batch(self):
        """The batch to pass to `problem.outer`."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """The floating dtype of the data and of every output."""

    @abc.abstractmethod
    def _cast(self, hparams) -> Array:
        """Check the shape of `hparams` and cast them to `dtype`."""

    @abc.abstractmethod
    def response(self, hparams) -> Array:
        """The exact minimiser `w*(λ)` of the training loss.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `self.params0`.
        """

    @abc.abstractmethod
    def hessian(self, hparams) -> Array:
        """The dense inner Hessian `∂²L_T/∂w²` at `w*(λ)`, of shape `(d, d)`.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A symmetric positive-definite `(d, d)` array.
        """

    @abc.abstractmethod
    def hypergrad(self, hparams) -> Array:
        """The exact hypergradient `d L_V(w*(λ), λ)/dλ` (implicit function theorem).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `hparams`.
        """

    @abc.abstractmethod
    def identity_hypergrad(self, hparams) -> Array:
        """`∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ ∂L_V/∂w` at `w*(λ)`: the IFT with `H⁻¹ ≈ I`.

        This is what one-step / greedy methods (Luketina et al. 2016; Neumann with zero
        terms) estimate when the inner problem is solved exactly.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `hparams`.
        """

    def value(self, hparams) -> Array:
        """The validation loss at the exact response, `L_V(w*(λ), λ)`.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        lam = self._cast(hparams)
        return self.problem.outer(self.response(lam), lam, self.outer_batch)
