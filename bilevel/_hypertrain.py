"""Hypertraining: fit a hypernet's best response, optimise λ through it.

Algorithms 2-4 of Lorraine & Duvenaud, *Stochastic Hyperparameter Optimization through Hypernetworks*.

- `hypertrain_global` (Algorithm 2, first loop): λ ~ p(λ), a step of φ on L_T(h_φ(λ), λ).
  The second loop is any outer driver on `best_response(hypernet)`.
- `hypertrain_local` (Algorithm 3): λ ~ p(λ | λ̂) around the current λ̂; a φ step, then a
  λ̂ step on L_V(h_φ(λ̂), λ̂).
- `hypertrain_simplified` (Algorithm 4): the φ step at λ̂ itself, then the λ̂ step.

All are optax-style `init`/`step` pairs over NamedTuple states holding only arrays (for
the shipped hypernets and array-only params), so a run is one `jax.lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._best_response import best_response, check_output
from ._implicit import implicit
from ._linear_solvers import AbstractLinearSolver
from ._optimize import HyperOpt, HyperOptState, _identity, _like, _strong
from ._problem import Problem, check_hparams, check_params0, refuse_start, tree_summary, typed_summary
from ._unroll import _check_int

PyTree = Any


class Gaussian(eqx.Module):
    """A Gaussian perturbation of the hyperparameters. See `bilevel.gaussian`."""

    scale: float = eqx.field(static=True)
    log_space: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        ok = isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
        if not ok or not np.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(
                f"gaussian(scale) requires a positive finite scale (the standard deviation of the "
                f"perturbation); got scale={self.scale!r}. With scale 0 every sample would be λ̂ "
                "itself: that is the simplified joint algorithm, bilevel.hypertrain_simplified."
            )
        if not isinstance(self.log_space, bool):
            raise TypeError(f"gaussian(scale, log_space=...) requires True or False; got {self.log_space!r}.")

    def __call__(self, key, hparams) -> PyTree:
        """λ + scale·ε, or λ·exp(scale·ε) with `log_space`, with ε standard normal per scalar."""
        leaves, treedef = jax.tree_util.tree_flatten(hparams)
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, x in zip(keys, leaves):
            eps = self.scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            out.append(x * jnp.exp(eps) if self.log_space else x + eps)
        return jax.tree_util.tree_unflatten(treedef, out)


def gaussian(scale: float, *, log_space: bool = False) -> Gaussian:
    """The perturbation p(λ | λ̂) of local hypertraining: a Gaussian around λ̂.

    `gaussian(σ)` draws λ = λ̂ + σ ε; with `log_space=True` it draws λ = λ̂ · exp(σ ε), a
    Gaussian in log space, for positive scale hyperparameters (penalties, learning rates)
    optimised directly. When the hyperparameters are already log-scales (the losses take
    log λ, or the driver has `transform=jnp.exp`), the plain form is the log-space Gaussian.

    **Arguments:**

    - `scale`: the standard deviation σ > 0.
    - `log_space`: perturb multiplicatively in log space (default False).

    **Returns:**

    A `Gaussian`, called as `perturb(key, hparams) -> hparams`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    perturb = bl.gaussian(0.1, log_space=True)
    lam = perturb(jax.random.key(0), {"l2": jnp.full(3, 1e-3)})   # positive, near 1e-3
    ```
    """
    return Gaussian(scale, log_space)


DEFAULT_PERTURBATION = Gaussian(0.1)


def _sds(tree) -> list:
    return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(tree)]


def _check_like(got, want, what: str, where: str) -> None:
    """Raise unless `got` has `want`'s tree, shapes and dtypes (both may be shape structs)."""
    same = (jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            and _sds(got) == _sds(want))
    if not same:
        raise ValueError(
            f"{where}: {what} must return hyperparameters with the tree, shapes and dtypes of "
            f"{typed_summary(want)}; it returned {typed_summary(got)}. Draw each leaf with the "
            "shape and dtype of the hyperparameters (e.g. jax.random.uniform(key, shape, dtype))."
        )


def _check_key(key, where: str) -> None:
    ok = isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,)))
    if not ok:
        raise TypeError(
            f"{where} requires a JAX PRNG key for sampling hyperparameters; got "
            f"{type(key).__name__} {key!r}. Pass jax.random.key(seed), split once per step."
        )


def _check_optimizer(opt, name: str, where: str) -> None:
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            f"{where} requires `{name}` to be an optax.GradientTransformation, e.g. "
            f"optax.adam(1e-3); got {type(opt).__name__} {opt!r}."
        )


def _check_hypernet(hypernet, hparams, params, where: str) -> None:
    if not callable(hypernet):
        raise TypeError(
            f"{where} requires a hypernet, a callable hparams -> params (e.g. "
            f"bilevel.linear_hypernet(params0, hparams0)); got {type(hypernet).__name__}."
        )
    out = eqx.filter_eval_shape(hypernet, hparams)
    template = jax.eval_shape(lambda p: eqx.filter(p, eqx.is_inexact_array), params)
    check_output(jax.tree_util.tree_map(jnp.zeros_like, out), jax.tree_util.tree_map(jnp.zeros_like, template), where)


def _fit_step(problem: Problem, optimizer, hypernet, opt_state, lams, batch):
    """One optimizer step of φ on the mean of L_T(h_φ(λ_i), λ_i) over the sampled λ_i."""

    def loss(net):
        return jnp.mean(jax.vmap(lambda lam: problem.inner(net(lam), lam, batch))(lams))

    value, grads = eqx.filter_value_and_grad(loss)(hypernet)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(hypernet, eqx.is_inexact_array))
    return eqx.apply_updates(hypernet, updates), opt_state, value


class HypernetState(NamedTuple):
    """The state of global hypertraining (`bilevel.hypertrain_global`).

    **Fields:**

    - `hypernet`: the hypernet h_φ being trained.
    - `opt_state`: the optimizer state of its weights φ.
    - `step`: the number of steps taken, an int32 scalar.
    """

    hypernet: PyTree
    opt_state: PyTree
    step: jax.Array


class HypertrainGlobal(eqx.Module):
    """Global hypertraining as an `init`/`step` pair. See `bilevel.hypertrain_global`."""

    problem: Problem = eqx.field(static=True)
    optimizer: optax.GradientTransformation = eqx.field(static=True)
    sample: Callable = eqx.field(static=True)
    num_samples: int = eqx.field(static=True)

    def __check_init__(self):
        where = "hypertrain_global(problem, optimizer, sample)"
        if not isinstance(self.problem, Problem):
            raise TypeError(f"{where} requires a bilevel.Problem; got {type(self.problem).__name__}.")
        refuse_start(self.problem, where)
        _check_optimizer(self.optimizer, "optimizer", where)
        if not callable(self.sample):
            raise TypeError(
                f"{where} requires `sample`, a function key -> hparams drawing λ ~ p(λ); got "
                f"{type(self.sample).__name__} {self.sample!r}."
            )
        _check_int(self.num_samples, "num_samples", where, 1)

    def init(self, hypernet, hparams, params) -> HypernetState:
        """The state before the first step.

        **Arguments:**

        - `hypernet`: the hypernet to train (e.g. `bilevel.mlp_hypernet(params, hparams, key=...)`).
        - `hparams`: a hyperparameter value, the template `sample`'s draws are checked against.
        - `params`: a params template, the hypernet's output is checked against.

        **Returns:**

        A `HypernetState`.
        """
        where = "HypertrainGlobal.init(hypernet, hparams, params)"
        check_hparams(hparams, where)
        check_params0(params, where)
        _check_hypernet(hypernet, hparams, params, where)
        _check_like(jax.eval_shape(self.sample, jax.random.key(0)), hparams, "sample(key)", where)
        opt_state = self.optimizer.init(eqx.filter(hypernet, eqx.is_inexact_array))
        return jax.tree_util.tree_map(_strong, HypernetState(hypernet, opt_state, jnp.zeros((), jnp.int32)))

    def step(self, state: HypernetState, key, inner_batch) -> tuple[HypernetState, jax.Array]:
        """Draw `num_samples` λ ~ p(λ) and take one optimizer step of φ on the mean training loss.

        **Arguments:**

        - `state`: a `HypernetState`.
        - `key`: a PRNG key for this step's draws.
        - `inner_batch`: the training batch (or `None`).

        **Returns:**

        `(state, train_loss)`, the loss before the update.
        """
        if not isinstance(state, HypernetState):
            raise TypeError(f"HypertrainGlobal.step requires the HypernetState from init/step; got {type(state).__name__}.")
        _check_key(key, "HypertrainGlobal.step(state, key, inner_batch)")
        lams = jax.vmap(self.sample)(jax.random.split(key, self.num_samples))
        net, opt_state, loss = _fit_step(self.problem, self.optimizer, state.hypernet, state.opt_state,
                                         lams, inner_batch)
        new = HypernetState(net, opt_state, state.step + 1)
        return jax.tree_util.tree_map(_like, new, state), loss


def hypertrain_global(
    problem: Problem, optimizer: optax.GradientTransformation, sample: Callable, *, num_samples: int = 1
) -> HypertrainGlobal:
    """Fit a hypernet to the best response over a distribution of λ (Lorraine & Duvenaud, Algorithm 2).

    Each step draws λ₁..λₙ ~ p(λ) and takes one `optimizer` step on the hypernet's weights φ
    to lower `mean_i L_T(h_φ(λ_i), λ_i, batch)`. Once trained, `bilevel.best_response(hypernet)`
    gives the validation loss and hypergradient at any λ for the price of one hypernet call
    (the algorithm's second loop is any outer driver on it, e.g. `bilevel.optimize`), and
    `jax.vmap` evaluates whole curves of λ in one call.

    **Arguments:**

    - `problem`: a `bilevel.Problem` (only `inner` is used).
    - `optimizer`: an optax optimizer for φ, e.g. `optax.adam(1e-3)`.
    - `sample`: `key -> hparams`, a draw from p(λ) (e.g. uniform over a range of log-penalties).
    - `num_samples`: draws per step, averaged (default 1, as in the paper).

    **Returns:**

    A `HypertrainGlobal` with `init(hypernet, hparams, params)` and `step(state, key, inner_batch)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, log_lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w,
        outer=lambda w, log_lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    lam0, w0 = jnp.asarray(-1.0), jnp.zeros(3)
    net = bl.mlp_hypernet(w0, lam0, key=jax.random.key(0), width=16, scale=2.0)
    trainer = bl.hypertrain_global(problem, optax.adam(1e-2),
                                   lambda k: jax.random.uniform(k, (), minval=-3.0, maxval=1.0))
    state = trainer.init(net, lam0, w0)
    step = lambda s, k: trainer.step(s, k, None)
    state, losses = jax.lax.scan(step, state, jax.random.split(jax.random.key(1), 500))
    w = state.hypernet(jnp.asarray(0.0))          # ≈ argmin = 1 / (1 + e⁰) = 0.5
    ```
    """
    return HypertrainGlobal(problem, optimizer, sample, num_samples)


class HypertrainState(NamedTuple):
    """The state of joint hypertraining (`bilevel.hypertrain_local`, `bilevel.hypertrain_simplified`).

    **Fields:**

    - `hypernet`: the hypernet h_φ.
    - `hypernet_opt_state`: the optimizer state of φ.
    - `variables`: what the outer optimizer moves, u; the hyperparameters are λ̂ = transform(u).
    - `outer_opt_state`: the outer optimizer's state.
    - `step`: the number of steps taken, an int32 scalar.
    """

    hypernet: PyTree
    hypernet_opt_state: PyTree
    variables: PyTree
    outer_opt_state: PyTree
    step: jax.Array


class HypertrainInfo(NamedTuple):
    """What one joint hypertraining step reports.

    **Fields:**

    - `train_loss`: the hypernet's training loss on this step's draws (before its update).
    - `value`: the validation loss L_V(h_φ(λ̂), λ̂) after the φ update, before the λ̂ update.
    - `grad_norm`: ‖dL_V/du‖, the norm of the hypergradient the outer optimizer received.
    - `hparams`: λ̂ = transform(u) at this step.
    - `stats`: `inner_grad_norm`, ‖∇_w L_T‖ at h_φ(λ̂) (how far the hypernet is from a best response).
    """

    train_loss: jax.Array
    value: jax.Array
    grad_norm: jax.Array
    hparams: PyTree
    stats: dict


class Hypertrain(eqx.Module):
    """Joint hypertraining as an `init`/`step` pair. See `bilevel.hypertrain_local`."""

    problem: Problem = eqx.field(static=True)
    hypernet_optimizer: optax.GradientTransformation = eqx.field(static=True)
    outer_optimizer: optax.GradientTransformation = eqx.field(static=True)
    perturb: Callable | None = eqx.field(static=True)
    transform: Callable = eqx.field(static=True)
    num_samples: int = eqx.field(static=True)
    hypernet_steps: int = eqx.field(static=True)
    linear_solver: AbstractLinearSolver | None = None

    def __check_init__(self):
        where = ("hypertrain_local(problem, hypernet_optimizer, outer_optimizer, ...)" if self.perturb is not None
                 else "hypertrain_simplified(problem, hypernet_optimizer, outer_optimizer, ...)")
        if not isinstance(self.problem, Problem):
            raise TypeError(f"{where} requires a bilevel.Problem; got {type(self.problem).__name__}.")
        refuse_start(self.problem, where)
        _check_optimizer(self.hypernet_optimizer, "hypernet_optimizer", where)
        _check_optimizer(self.outer_optimizer, "outer_optimizer", where)
        if self.perturb is not None and not callable(self.perturb):
            raise TypeError(
                f"{where} requires `perturb`, a function (key, hparams) -> hparams drawing "
                f"λ ~ p(λ | λ̂), e.g. bilevel.gaussian(0.1); got {type(self.perturb).__name__} {self.perturb!r}."
            )
        if not callable(self.transform):
            raise TypeError(f"{where} requires `transform` to be None or a function, e.g. jnp.exp; got {self.transform!r}.")
        _check_int(self.num_samples, "num_samples", where, 1)
        _check_int(self.hypernet_steps, "hypernet_steps", where, 1)
        if self.linear_solver is not None and not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                f"{where} requires `linear_solver` to be None (differentiate through the hypernet) or "
                "a linear solver such as bilevel.cg() (apply the IFT at its output); got "
                f"{type(self.linear_solver).__name__} {self.linear_solver!r}."
            )

    def _outer(self, hypernet) -> HyperOpt:
        method = best_response(hypernet)
        if self.linear_solver is not None:
            method = implicit(method, self.linear_solver)
        return HyperOpt(self.problem, method, self.outer_optimizer, self.transform, False)

    def init(self, hypernet, hparams0, params0) -> HypertrainState:
        """The state before the first step.

        **Arguments:**

        - `hypernet`: the hypernet (e.g. `bilevel.linear_hypernet(params0, hparams0)`).
        - `hparams0`: the starting variables u₀ of the outer optimizer (the hyperparameters
          when there is no `transform`).
        - `params0`: a params template the hypernet's output is checked against.

        **Returns:**

        A `HypertrainState`.
        """
        where = "Hypertrain.init(hypernet, hparams0, params0)"
        outer = self._outer(hypernet)
        outer_state = outer.init(hparams0, params0)      # checks hparams0 and the transform
        check_params0(params0, where)
        _check_hypernet(hypernet, self.transform(hparams0), params0, where)
        if self.perturb is not None:
            drawn = jax.eval_shape(self.perturb, jax.random.key(0), outer_state.variables)
            _check_like(drawn, outer_state.variables, "perturb(key, hparams)", where)
            if isinstance(self.perturb, Gaussian) and self.perturb.log_space:
                _check_positive(hparams0, where)
        net_state = self.hypernet_optimizer.init(eqx.filter(hypernet, eqx.is_inexact_array))
        state = HypertrainState(hypernet, net_state, outer_state.variables, outer_state.opt_state,
                                jnp.zeros((), jnp.int32))
        return jax.tree_util.tree_map(_strong, state)

    def _draws(self, key, variables):
        """The λ_i for one φ step: perturbations of u through the transform, or λ̂ itself."""
        if self.perturb is None:
            return jax.tree_util.tree_map(lambda x: x[None], self.transform(variables))
        us = jax.vmap(lambda k: self.perturb(k, variables))(jax.random.split(key, self.num_samples))
        return jax.vmap(self.transform)(us)

    def step(self, state: HypertrainState, key, inner_batch, outer_batch) -> tuple[HypertrainState, HypertrainInfo]:
        """`hypernet_steps` steps of φ on draws around λ̂, then one outer step of λ̂ through h_φ.

        **Arguments:**

        - `state`: a `HypertrainState`.
        - `key`: a PRNG key for this step's draws (`None` is accepted by the simplified algorithm).
        - `inner_batch`: the training batch for the φ steps (or `None`).
        - `outer_batch`: the validation batch for the λ̂ step (or `None`).

        **Returns:**

        `(state, info)`: the next `HypertrainState` and a `HypertrainInfo`.
        """
        if not isinstance(state, HypertrainState):
            raise TypeError(f"Hypertrain.step requires the HypertrainState from init/step; got {type(state).__name__}.")
        if self.perturb is not None or key is not None:
            _check_key(key, "Hypertrain.step(state, key, inner_batch, outer_batch)")
        keys = jax.random.split(key, self.hypernet_steps) if key is not None else None
        variables = jax.lax.stop_gradient(state.variables)

        def fit(carry, k):
            net, opt_state = carry
            net, opt_state, loss = _fit_step(self.problem, self.hypernet_optimizer, net, opt_state,
                                             self._draws(k, variables), inner_batch)
            return (net, opt_state), loss

        if self.hypernet_steps == 1:
            (net, net_state), loss = fit((state.hypernet, state.hypernet_opt_state), None if keys is None else keys[0])
        else:
            (net, net_state), losses = jax.lax.scan(fit, (state.hypernet, state.hypernet_opt_state), keys,
                                                    length=self.hypernet_steps)
            loss = losses[-1]
        template = net(self.transform(variables))
        outer_state, info = self._outer(net).step(
            HyperOptState(state.variables, state.outer_opt_state, template, state.step), inner_batch, outer_batch)
        new = HypertrainState(net, net_state, outer_state.variables, outer_state.opt_state, state.step + 1)
        return (jax.tree_util.tree_map(_like, new, state),
                HypertrainInfo(loss, info.value, info.grad_norm, info.hparams, info.stats))


def _check_positive(hparams, where: str) -> None:
    try:
        values = [np.asarray(x) for x in jax.tree_util.tree_leaves(hparams)]
    except jax.errors.TracerArrayConversionError:
        return
    if any(np.any(v <= 0) for v in values):
        raise ValueError(
            f"{where}: gaussian(scale, log_space=True) multiplies λ by exp(scale·ε), so it needs "
            f"positive hyperparameters; got {tree_summary(hparams)} with entries <= 0. Use the "
            "additive gaussian(scale) for hyperparameters that are already on a log scale."
        )


def hypertrain_local(
    problem: Problem,
    hypernet_optimizer: optax.GradientTransformation,
    outer_optimizer: optax.GradientTransformation,
    *,
    perturb: Callable = DEFAULT_PERTURBATION,
    transform: Callable | None = None,
    num_samples: int = 1,
    hypernet_steps: int = 1,
    linear_solver: AbstractLinearSolver | None = None,
) -> Hypertrain:
    """Joint optimisation of a hypernet and λ̂, the hypernet fitted locally (Lorraine & Duvenaud, Algorithm 3).

    Each step draws λ_i ~ p(λ | λ̂) = `transform(perturb(key, u))` around the current
    λ̂ = `transform(u)`, takes `hypernet_steps` optimizer steps on the hypernet's weights φ
    to lower the mean of `L_T(h_φ(λ_i), λ_i)`, then one `outer_optimizer` step on u with the
    hypergradient of `L_V(h_φ(λ̂), λ̂)` through the hypernet (`bilevel.best_response`).
    A hypernet of limited capacity (the linear one) only has to be right near λ̂, and as the
    perturbation shrinks its derivative approaches the true dw*/dλ there.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `hypernet_optimizer`: an optax optimizer for φ, e.g. `optax.adam(1e-3)`.
    - `outer_optimizer`: an optax optimizer for the hyperparameters, e.g. `optax.adam(0.03)`.
    - `perturb`: `(key, u) -> u`, a draw around the current variables; default
      `bilevel.gaussian(0.1)`. With log-scale hyperparameters (or `transform=jnp.exp`) this is
      the Gaussian in log space the paper uses for scales.
    - `transform`: optional function u -> hyperparameters (e.g. `jnp.exp`); default identity.
    - `num_samples`: draws per φ step, averaged (default 1, as in the paper).
    - `hypernet_steps`: φ steps per λ̂ step (default 1, as in the paper).
    - `linear_solver`: `None` (default, the paper: the λ̂ step differentiates through the
      hypernet) or a linear solver such as `bilevel.cg()`: the λ̂ step then applies the
      implicit function theorem at the hypernet's output, `bilevel.implicit(best_response(h), solver)`.

    **Returns:**

    A `Hypertrain` with `init(hypernet, hparams0, params0)` and
    `step(state, key, inner_batch, outer_batch)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, log_lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w,
        outer=lambda w, log_lam, _: 0.5 * jnp.sum((w - 0.7) ** 2),
    )
    lam0, w0 = jnp.asarray(1.0), jnp.zeros(3)
    driver = bl.hypertrain_local(problem, optax.adam(3e-2), optax.adam(3e-2),
                                 perturb=bl.gaussian(0.3), num_samples=8)
    state = driver.init(bl.linear_hypernet(w0, lam0), lam0, w0)
    step = lambda s, k: driver.step(s, k, None, None)
    state, info = jax.lax.scan(step, state, jax.random.split(jax.random.key(0), 1000))
    print(state.variables)        # → log(1/0.7 − 1) ≈ −0.85, where w* = 0.7
    ```
    """
    if perturb is None:
        raise ValueError(
            "hypertrain_local(..., perturb=None): the local algorithm needs a distribution "
            "p(λ | λ̂) with positive spread, e.g. bilevel.gaussian(0.1). Without one every draw is "
            "λ̂ itself: use bilevel.hypertrain_simplified."
        )
    return Hypertrain(problem, hypernet_optimizer, outer_optimizer, perturb,
                      _identity if transform is None else transform, num_samples, hypernet_steps, linear_solver)


def hypertrain_simplified(
    problem: Problem,
    hypernet_optimizer: optax.GradientTransformation,
    outer_optimizer: optax.GradientTransformation,
    *,
    transform: Callable | None = None,
    hypernet_steps: int = 1,
    linear_solver: AbstractLinearSolver | None = None,
) -> Hypertrain:
    """Simplified joint optimisation of a hypernet and λ̂ (Lorraine & Duvenaud, Algorithm 4).

    Like `bilevel.hypertrain_local` without sampling: each step takes `hypernet_steps`
    optimizer steps on φ to lower `L_T(h_φ(λ̂), λ̂)` at the current λ̂ itself, then one outer
    step on λ̂ through the hypernet. Cheapest of the three, but nothing ties the hypernet's
    derivative dh_φ/dλ to the best response's: it only learns what the path of λ̂ shows it.
    From a zero slope (both shipped hypernets start with one) λ̂ moves only through a direct
    dependence of L_V on λ; start the linear hypernet with random slopes (`key`,
    `init_scale`), or pass `linear_solver` to take the λ̂ step by the implicit function
    theorem at h_φ(λ̂), which needs no slope at all.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `hypernet_optimizer`: an optax optimizer for φ.
    - `outer_optimizer`: an optax optimizer for the hyperparameters.
    - `transform`: optional function u -> hyperparameters (e.g. `jnp.exp`); default identity.
    - `hypernet_steps`: φ steps per λ̂ step (default 1, as in the paper).
    - `linear_solver`: `None` (default, the paper) or a linear solver such as `bilevel.cg()`
      to take the λ̂ step by the implicit function theorem at the hypernet's output.

    **Returns:**

    A `Hypertrain` with `init(hypernet, hparams0, params0)` and
    `step(state, key, inner_batch, outer_batch)` (the key may be `None`).

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, log_lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w,
        outer=lambda w, log_lam, _: 0.5 * jnp.sum((w - 0.7) ** 2),
    )
    lam0, w0 = jnp.asarray(1.0), jnp.zeros(3)
    driver = bl.hypertrain_simplified(problem, optax.adam(3e-2), optax.adam(3e-2), hypernet_steps=5,
                                      linear_solver=bl.cg())
    state = driver.init(bl.linear_hypernet(w0, lam0), lam0, w0)
    step = lambda s, _: driver.step(s, None, None, None)
    state, info = jax.lax.scan(step, state, length=500)
    print(state.variables)        # → log(1/0.7 − 1) ≈ −0.85, where w* = 0.7
    ```
    """
    return Hypertrain(problem, hypernet_optimizer, outer_optimizer, None,
                      _identity if transform is None else transform, 1, hypernet_steps, linear_solver)
