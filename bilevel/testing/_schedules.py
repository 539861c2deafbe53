"""Learning-rate and momentum schedules on a quadratic ([`bilevel.testing.QuadraticSchedule`][]):
the hypergradient with respect to every step's rate and momentum, by a hand-written adjoint
recursion in NumPy float64 (no autodiff)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from .._schedules import scheduled_sgd
from .._unroll import Unroll, unroll
from ._common import _rng, check_int, check_real, check_spd, host, resolve_dtype, spd

Array = jax.Array


def _schedule_inner(w, hparams, batch):
    """½wᵀAw − bᵀw; batch = (A, b)."""
    del hparams
    A, b = batch
    return 0.5 * w @ (A @ w) - b @ w


def _schedule_outer(w, hparams, batch):
    """½(w − c)ᵀB(w − c); batch = (B, c)."""
    del hparams
    B, c = batch
    return 0.5 * (w - c) @ (B @ (w - c))


_SCHEDULE_PROBLEM = Problem(inner=_schedule_inner, outer=_schedule_outer)


def _sgd_schedule(hparams):
    return scheduled_sgd(hparams["lr"])


def _momentum_schedule(hparams):
    return scheduled_sgd(hparams["lr"], hparams["momentum"])


class QuadraticSchedule(eqx.Module):
    """T steps of (momentum) gradient descent on a quadratic with a per-step schedule, whose
    hypergradient with respect to every step's rate and momentum is known exactly.

        L_T(w) = ½wᵀAw − bᵀw        L_V(w) = ½(w − c)ᵀB(w − c)

    with `A`, `B` symmetric positive definite. From `w_0` and `v_0 = 0`, step `t` runs
    `bilevel.scheduled_sgd`'s update (Maclaurin, Duvenaud & Adams 2015)

        v_{t+1} = γ_t v_t − (1 − γ_t)(A w_t − b)        w_{t+1} = w_t + α_t v_{t+1}

    (`γ_t = 0` without momentum), and the hyperparameters are the schedules
    `{"lr": α, "momentum": γ}` (`{"lr": α}` without momentum), each of length T. The value is
    `L_V(w_T)`. Its gradient comes from the adjoint of these linear dynamics on `(w, v)`,
    written out by hand and run backwards from `ŵ_T = B(w_T − c)`, `v̂_T = 0`:

        u_t = v̂_{t+1} + α_t ŵ_{t+1}
        ∂L_V/∂α_t = ŵ_{t+1}ᵀ v_{t+1}        ∂L_V/∂γ_t = u_tᵀ (v_t + A w_t − b)
        ŵ_t = ŵ_{t+1} − (1 − γ_t) A u_t      v̂_t = γ_t u_t

    All closed forms run in NumPy float64 on the host (no autodiff), so they are an
    independent reference for differentiating through `bilevel.unroll`; being NumPy, they
    take concrete hyperparameters (call them outside `jit` and `vmap`).

    **Fields:**

    - `A`, `b`: the training quadratic (`inner_batch = (A, b)`).
    - `B`, `c`: the validation quadratic (`outer_batch = (B, c)`).
    - `w0`: the start point (`params0`).
    - `lr`: the default rate schedule, shape `(T,)`.
    - `momentum`: the default momentum schedule, shape `(T,)`, or `None` (plain GD).

    **Example:**

    ```python
    import jax, numpy as np
    import bilevel as bl
    import bilevel.testing as blt

    jax.config.update("jax_enable_x64", True)
    exact = blt.QuadraticSchedule.sample(0, dim=3, steps=8)
    hg = bl.hypergrad(exact.problem, exact.method())
    out = hg(exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    want = exact.hypergrad(exact.hparams)
    np.testing.assert_allclose(out.grad["lr"], want["lr"], rtol=1e-9)
    np.testing.assert_allclose(out.grad["momentum"], want["momentum"], rtol=1e-9)
    ```
    """

    A: Array
    b: Array
    B: Array
    c: Array
    w0: Array
    lr: Array
    momentum: Array | None

    def __init__(self, A, b, B, c, w0, lr, momentum=None):
        where = "QuadraticSchedule(A, b, B, c, w0, lr, momentum=None)"
        arrays = [jnp.asarray(x) for x in (A, b, B, c, w0, lr)]
        arrays.append(None if momentum is None else jnp.asarray(momentum))
        for name, x in zip(("A", "b", "B", "c", "w0", "lr", "momentum"), arrays):
            if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{where} requires real floating arrays; got {name} of dtype "
                                f"{x.dtype}. Pass float arrays, e.g. jnp.asarray({name}, float).")
        A, b, B, c, w0, lr, mom = arrays
        d = b.shape[0] if b.ndim == 1 else -1
        T = lr.shape[0] if lr.ndim == 1 else -1
        ok = (d >= 1 and T >= 1 and A.shape == (d, d) and B.shape == (d, d)
              and c.shape == (d,) and w0.shape == (d,) and (mom is None or mom.shape == (T,)))
        if not ok:
            got = ", ".join(f"{k} {tuple(v.shape)}" for k, v in zip(["A", "b", "B", "c", "w0", "lr"], arrays)
                            ) + ("" if mom is None else f", momentum {tuple(mom.shape)}")
            raise ValueError(
                f"{where} requires A (d, d), b (d,), B (d, d), c (d,), w0 (d,) and lr (T,) "
                f"(and momentum (T,)) with d, T >= 1; got {got}. Build a random instance with "
                "QuadraticSchedule.sample(seed)."
            )
        for name, M in (("A", A), ("B", B)):
            check_spd(where, name, host(M),
                      "Pass a symmetric positive definite matrix, e.g. X.T @ X + I.")
        dtype = jnp.result_type(*[x for x in arrays if x is not None])
        self.A, self.b, self.B, self.c, self.w0, self.lr = (x.astype(dtype) for x in arrays[:6])
        self.momentum = None if mom is None else mom.astype(dtype)

    @classmethod
    def sample(cls, key_or_seed: Any, *, dim: int = 3, steps: int = 10, max_condition: float = 10.0,
               momentum: bool = True, dtype: Any = None) -> QuadraticSchedule:
        """Draw a random instance with stable schedules.

        `A` and `B` have eigenvalues log-uniform in `[1, max_condition]` (so their condition
        numbers are at most `max_condition`); `b`, `c` and `w0` are standard normal. The
        rates are uniform in `[0.2, 1] / max_condition` and the momenta uniform in
        `[0, 0.9]`: any constant schedule of such values converges, since heavy-ball's
        stability condition `α(1 − γ) λ_max(A) < 2(1 + γ)` holds with room to spare.

        **Arguments:**

        - `key_or_seed`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the dimension `d >= 1`.
        - `steps`: the schedules' length `T >= 1`.
        - `max_condition`: bound `>= 1` on the condition numbers of `A` and `B`.
        - `momentum`: whether to draw a momentum schedule (otherwise plain gradient descent).
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `QuadraticSchedule`.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.QuadraticSchedule.sample(1, dim=2, steps=5, momentum=False)
        assert exact.lr.shape == (5,) and exact.momentum is None
        assert set(exact.hparams) == {"lr"}
        ```
        """
        where = "QuadraticSchedule.sample(key_or_seed, dim=..., steps=...)"
        rng = _rng(key_or_seed, where)
        d = check_int(dim, "dim", where, 1, 3)
        T = check_int(steps, "steps", where, 1, 10)
        kappa = check_real(max_condition, "max_condition", where, low=1.0, strict=False, example=10.0)
        if not isinstance(momentum, (bool, np.bool_)):
            raise TypeError(f"{where} requires momentum to be True or False; got "
                            f"{type(momentum).__name__} {momentum!r}.")
        dt = resolve_dtype(dtype, where)
        A, B = spd(rng, d, kappa), spd(rng, d, kappa)
        b, c, w0 = rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal(d)
        lr = rng.uniform(0.2, 1.0, T) / kappa
        mom = rng.uniform(0.0, 0.9, T) if momentum else None
        as_ = lambda x: None if x is None else jnp.asarray(x, dt)
        return cls(as_(A), as_(b), as_(B), as_(c), as_(w0), as_(lr), as_(mom))

    @property
    def steps(self) -> int:
        """The schedules' length T (the number of inner steps)."""
        return self.lr.shape[0]

    @property
    def problem(self) -> Problem:
        """The `bilevel.Problem`: training loss ½wᵀAw − bᵀw, validation loss ½(w − c)ᵀB(w − c)."""
        return _SCHEDULE_PROBLEM

    @property
    def params0(self) -> Array:
        """The start point `w_0`."""
        return self.w0

    @property
    def hparams(self) -> dict:
        """The default schedules, `{"lr": α, "momentum": γ}` (`{"lr": α}` without momentum)."""
        return {"lr": self.lr} if self.momentum is None else {"lr": self.lr, "momentum": self.momentum}

    @property
    def inner_batch(self):
        """`(A, b)`, the batch of `problem.inner`."""
        return (self.A, self.b)

    @property
    def outer_batch(self):
        """`(B, c)`, the batch of `problem.outer`."""
        return (self.B, self.c)

    @property
    def dtype(self):
        """The floating dtype of the data."""
        return self.b.dtype

    def method(self, *, checkpoint: int | None = None) -> Unroll:
        """The matching method: `bilevel.unroll` of `bilevel.scheduled_sgd` over T steps.

        **Arguments:**

        - `checkpoint`: optional segment length, passed to `bilevel.unroll`.

        **Returns:**

        `unroll(lambda h: scheduled_sgd(h["lr"], h["momentum"]), steps=T)` (without the
        momenta when this instance has none).
        """
        fn = _sgd_schedule if self.momentum is None else _momentum_schedule
        return unroll(fn, self.steps, checkpoint=checkpoint)

    def _host(self, hparams, where: str):
        keys = set(self.hparams)
        if not isinstance(hparams, dict) or set(hparams) != keys:
            raise ValueError(
                f"{where} requires hparams to be a dict with keys {sorted(keys)} (one schedule "
                f"each); got {hparams!r:.200}. Pass e.g. exact.hparams."
            )
        out = {}
        for k in sorted(keys):
            x = np.asarray(hparams[k], np.float64)
            if x.shape != (self.steps,):
                raise ValueError(f"{where} requires hparams[{k!r}] of shape ({self.steps},) (one "
                                 f"value per step); got shape {x.shape}.")
            out[k] = x
        A, b, B, c, w0 = (np.asarray(x, np.float64) for x in (self.A, self.b, self.B, self.c, self.w0))
        return out["lr"], out.get("momentum", np.zeros(self.steps)), A, b, B, c, w0

    @staticmethod
    def _forward(alpha, gamma, A, b, w0):
        """The states `w_0 … w_T` and `v_0 … v_T` (rows), float64."""
        T = alpha.shape[0]
        ws, vs = np.empty((T + 1, w0.shape[0])), np.zeros((T + 1, w0.shape[0]))
        ws[0] = w0
        for t in range(T):
            vs[t + 1] = gamma[t] * vs[t] - (1 - gamma[t]) * (A @ ws[t] - b)
            ws[t + 1] = ws[t] + alpha[t] * vs[t + 1]
        return ws, vs

    def response(self, hparams) -> np.ndarray:
        """The iterate `w_T` after the T scheduled steps (NumPy float64).

        **Arguments:**

        - `hparams`: the schedules, a dict shaped like `self.hparams`.

        **Returns:**

        A `(d,)` float64 array.
        """
        alpha, gamma, A, b, _, _, w0 = self._host(hparams, "QuadraticSchedule.response(hparams)")
        return self._forward(alpha, gamma, A, b, w0)[0][-1]

    def value(self, hparams) -> float:
        """The validation loss after the T steps, `½(w_T − c)ᵀB(w_T − c)`.

        **Arguments:**

        - `hparams`: the schedules, a dict shaped like `self.hparams`.

        **Returns:**

        A Python float.
        """
        alpha, gamma, A, b, B, c, w0 = self._host(hparams, "QuadraticSchedule.value(hparams)")
        e = self._forward(alpha, gamma, A, b, w0)[0][-1] - c
        return float(0.5 * e @ B @ e)

    def hypergrad(self, hparams) -> dict:
        """The exact gradient of `L_V(w_T)` with respect to every step's rate (and momentum).

        Computed by the adjoint recursion in the class docstring (NumPy float64, no
        autodiff): this is what differentiating through the T steps must return.

        **Arguments:**

        - `hparams`: the schedules, a dict shaped like `self.hparams`.

        **Returns:**

        A dict with the keys of `hparams`, each a `(T,)` float64 array.
        """
        alpha, gamma, A, b, B, c, w0 = self._host(hparams, "QuadraticSchedule.hypergrad(hparams)")
        ws, vs = self._forward(alpha, gamma, A, b, w0)
        T = alpha.shape[0]
        d_alpha, d_gamma = np.empty(T), np.empty(T)
        w_bar, v_bar = B @ (ws[T] - c), np.zeros_like(w0)
        for t in reversed(range(T)):
            d_alpha[t] = w_bar @ vs[t + 1]
            u = v_bar + alpha[t] * w_bar
            d_gamma[t] = u @ (vs[t] + A @ ws[t] - b)
            w_bar, v_bar = w_bar - (1 - gamma[t]) * (A @ u), gamma[t] * u
        return {"lr": d_alpha} if self.momentum is None else {"lr": d_alpha, "momentum": d_gamma}
