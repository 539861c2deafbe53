"""An exact fixed-point problem: an affine contraction with a non-symmetric Jacobian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    AbstractConditionProblem,
    _cast_hparams,
    _check_shapes,
    _floats,
    _orthonormal,
    _rng,
    check_int,
    check_real,
    host,
    resolve_dtype,
)

Array = jax.Array


def _affine_map(params, hparams, batch):
    """`T(w, λ) = Aw + Bλ + c` with `(A, B, c) = batch`."""
    A, B, c = batch
    return A @ params + B @ hparams + c


def _fixed_point_residual(params, hparams, batch):
    """½‖w − T(w, λ)‖²: zero exactly at the fixed point of `T`."""
    return 0.5 * jnp.sum((params - _affine_map(params, hparams, batch)) ** 2)


def _target_outer(params, hparams, batch):
    """½‖w − target‖² with `target = batch`."""
    del hparams
    return 0.5 * jnp.sum((params - batch) ** 2)


_CONTRACTION_PROBLEM = Problem(inner=_fixed_point_residual, outer=_target_outer)


class Contraction(AbstractConditionProblem):
    """The fixed point of an affine contraction `w = T(w, λ) = Aw + Bλ + c`.

        w*(λ) = (I − A)⁻¹ (Bλ + c)        L_V(w) = ½‖w − target‖²
        dL_V/dλ = Bᵀ (I − A)⁻ᵀ (w* − target)

    with `‖A‖₂ < 1` (so `T` is a contraction and fixed-point iteration converges) and `A`
    not symmetric, so the condition's Jacobian `I − A` is not symmetric either (a linear
    solver that assumes symmetry, such as CG, is not valid for it). λ is a `(k,)` vector
    used raw.

    The map [`T`][bilevel.testing.Contraction.T], not the inner loss, defines the solution:
    `problem.inner` is the harmless residual `½‖w − T(w, λ)‖²`, whose unique minimiser
    (the residual is zero there) is the same point, so that the problem also works with
    methods that minimise the inner loss. There is no support or active set: the closed
    forms hold for every λ.

    **Arguments:**

    - `A`: `(d, d)` with spectral norm `< 1`.
    - `B`: `(d, k)`.
    - `c`: `(d,)`.
    - `target`: the validation target, `(d,)`.
    - `lam`: the default hyperparameters, `(k,)` (a scalar is broadcast); default `0.0`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Contraction.sample(0, dim=5)
    w = exact.response(exact.hparams)
    assert jnp.allclose(exact.T(w, exact.hparams, exact.inner_batch), w)
    g = jax.jit(lambda e, lam: e.hypergrad(lam))(exact, exact.hparams)
    ```
    """

    A: Array
    B: Array
    c: Array
    target: Array
    lam: Array

    def __init__(self, A, B, c, target, lam=0.0):
        where = "Contraction"
        A, B, c, target, lam = _floats(A, B, c, target, lam)
        d = c.shape[0] if c.ndim == 1 else -1
        ok = (d >= 1 and A.shape == (d, d) and B.ndim == 2 and B.shape[0] == d
              and B.shape[1] >= 1 and target.shape == (d,))
        _check_shapes(f"{where}(A, B, c, target)", "A (d, d), B (d, k), c (d,) and target (d,) "
                      "with d, k >= 1", ok, A=A, B=B, c=c, target=target)
        k = B.shape[1]
        _check_shapes(f"{where}(lam=...)", f"lam of shape () or ({k},)", lam.shape in ((), (k,)),
                      lam=lam)
        norm = np.linalg.norm(host(A), 2)
        if not norm < 1:
            raise ValueError(
                f"{where} requires A with spectral norm < 1 (T a contraction); got "
                f"‖A‖₂ = {norm:.4g}. Scale A down, e.g. A * 0.9 / numpy.linalg.norm(A, 2)."
            )
        self.A, self.B, self.c, self.target = A, B, c, target
        self.lam = jnp.broadcast_to(lam, (k,))

    @classmethod
    def sample(
        cls, key, *, dim=5, num_hparams=2, contraction=0.9, dtype=None,
    ) -> "Contraction":
        """Draw an instance with `‖A‖₂ <= contraction`.

        `A = U diag(σ) Vᵀ` with `U`, `V` independent Haar-random orthogonal matrices (so `A`
        is not symmetric) and `σ` uniform in `[0, contraction]`, the largest set to
        `contraction`; `B`, `c` and `target` standard normal; default `λ = 0`.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the dimension `d >= 1`.
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `contraction`: the spectral norm of `A`, in `[0, 1)`.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `Contraction` instance.

        **Example:**

        ```python
        import numpy as np
        import bilevel.testing as blt

        exact = blt.Contraction.sample(1, dim=4, contraction=0.5)
        assert abs(np.linalg.norm(np.asarray(exact.A), 2) - 0.5) < 1e-6
        ```
        """
        where = "Contraction.sample"
        rng = _rng(key, where)
        dim = check_int(dim, "dim", where, 1, 5)
        k = check_int(num_hparams, "num_hparams", where, 1, 2)
        rho = check_real(contraction, "contraction", where, low=0.0, strict=False, example=0.9)
        if not rho < 1:
            raise ValueError(f"{where} requires contraction < 1; got contraction={contraction!r}. "
                             "Pass e.g. contraction=0.9.")
        dt = resolve_dtype(dtype, where)
        sigma = rng.uniform(0.0, rho, dim)
        sigma[np.argmax(sigma)] = rho
        A = (_orthonormal(rng, dim, dim) * sigma) @ _orthonormal(rng, dim, dim).T
        arrays = (A, rng.standard_normal((dim, k)), rng.standard_normal(dim),
                  rng.standard_normal(dim), np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays))

    @property
    def problem(self) -> Problem:
        return _CONTRACTION_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        return jnp.zeros_like(self.c)

    @property
    def inner_batch(self):
        return (self.A, self.B, self.c)

    @property
    def outer_batch(self):
        return self.target

    @property
    def dtype(self):
        return self.A.dtype

    @property
    def T(self):
        """The fixed-point map `T(params, hparams, batch) = Aw + Bλ + c`, `batch = inner_batch`.

        A module-level pure function (the same for every instance).
        """
        return _affine_map

    def _cast(self, hparams):
        k = self.B.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "Contraction", f"{k} hyperparameters")

    def _identity_minus_A(self):
        return jnp.eye(self.A.shape[0], dtype=self.dtype) - self.A

    def is_valid(self, hparams) -> Array:
        """Always true (the fixed point is unique for every λ).

        See [`AbstractConditionProblem.is_valid`][].
        """
        self._cast(hparams)
        return jnp.array(True)

    def response(self, hparams) -> Array:
        """`(I − A)⁻¹(Bλ + c)`; see [`AbstractConditionProblem.response`][]."""
        return jnp.linalg.solve(self._identity_minus_A(), self.B @ self._cast(hparams) + self.c)

    def hypergrad(self, hparams) -> Array:
        """`Bᵀ (I − A)⁻ᵀ (w* − target)`; see [`AbstractConditionProblem.hypergrad`][]."""
        w = self.response(hparams)
        return self.B.T @ jnp.linalg.solve(self._identity_minus_A().T, w - self.target)
