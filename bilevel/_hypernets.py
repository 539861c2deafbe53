"""Hypernetworks λ -> w that a user can point at any parameter pytree.

From Lorraine & Duvenaud, *Stochastic Hyperparameter Optimization through Hypernetworks*.

Both hypernets are built from a template params tree and a template hparams tree. They
flatten the hyperparameters into one vector, map it to one flat parameter vector, and put
that back into the template's layout (non-array leaves of the template, such as an
activation function inside an equinox module, are carried through unchanged). The output
starts at the template itself: `hypernet(hparams_template) == params_template` at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._problem import check_hparams, tree_summary, typed_summary

PyTree = Any


class Layout(eqx.Module):
    """The flat-vector layout of a pytree of arrays: structure, shapes and dtypes (all static)."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple = eqx.field(static=True)
    dtypes: tuple = eqx.field(static=True)

    @classmethod
    def of(cls, tree) -> Layout:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return cls(treedef, tuple(tuple(jnp.shape(x)) for x in leaves),
                   tuple(np.dtype(jnp.result_type(x)) for x in leaves))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def matches(self, tree) -> bool:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return treedef == self.treedef and tuple(tuple(jnp.shape(x)) for x in leaves) == self.shapes

    def describe(self) -> str:
        return typed_summary(jax.tree_util.tree_unflatten(
            self.treedef, [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes)]))

    def ravel(self, tree, dtype, where: str) -> jax.Array:
        """All leaves of `tree` (checked against the layout) as one vector of `dtype`."""
        if not self.matches(tree):
            raise ValueError(
                f"{where} requires hyperparameters shaped like the template the hypernet was built "
                f"from, {self.describe()}; got {typed_summary(tree)}. Pass hparams with that tree "
                "and shapes, or build the hypernet from a template like the hparams you pass."
            )
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])

    def unravel(self, flat: jax.Array) -> PyTree:
        """The inverse of `ravel`: one vector back into the layout's tree, shapes and dtypes."""
        sizes = [int(np.prod(s)) for s in self.shapes]
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
        leaves = [p.reshape(s).astype(d) for p, s, d in zip(pieces, self.shapes, self.dtypes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _check_key(key, where: str) -> None:
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(
            f"{where} requires `key` to be a JAX PRNG key from jax.random.key(seed); got "
            f"{type(key).__name__} {key!r}."
        )


def _templates(params, hparams, where: str):
    """Check the two templates; return params' array part, its other leaves, and both layouts."""
    check_hparams(hparams, f"{where} (the hparams template)")
    arrays, rest = eqx.partition(params, eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(arrays):
        raise ValueError(
            f"{where} requires a params template with at least one floating-point array leaf "
            f"(the hypernet's output); got {tree_summary(params)}. Pass the inner parameters "
            "the hypernet should produce, e.g. params0."
        )
    dtypes = {np.dtype(jnp.result_type(x)) for x in jax.tree_util.tree_leaves(arrays)}
    if len(dtypes) > 1:
        raise TypeError(
            f"{where} requires the params template's arrays to share one dtype (the hypernet's "
            f"weights have one); got {sorted(str(d) for d in dtypes)}. Cast params to one dtype."
        )
    hparams = jax.tree_util.tree_map(jnp.asarray, hparams)
    return arrays, rest, Layout.of(arrays), Layout.of(hparams), dtypes.pop()


def _center(center, hparams, layout: Layout, dtype, where: str) -> jax.Array:
    center = hparams if center is None else center
    return layout.ravel(jax.tree_util.tree_map(jnp.asarray, center), dtype, f"{where} (center)")


def _check_scale(scale, size: int, dtype, where: str) -> jax.Array:
    scale = np.asarray(scale, dtype=dtype)
    if scale.shape not in ((), (size,)) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(
            f"{where} requires `scale` to be a positive finite number, or one per flattened "
            f"hyperparameter (shape ({size},)); got {scale!r}. The input is (λ − center) / scale: "
            "use about half the range of λ the hypernet should cover."
        )
    return jnp.broadcast_to(jnp.asarray(scale), (size,))


def _standardised(net, hparams, where: str) -> jax.Array:
    """The flattened hyperparameters as the hypernet's input, (λ − center) / scale (both held fixed)."""
    x = net.hparams_layout.ravel(hparams, net.bias.dtype, where)
    return (x - jax.lax.stop_gradient(net.center)) / jax.lax.stop_gradient(net.scale)


class LinearHypernet(eqx.Module):
    """An affine hypernet `w = b + A (λ − center) / scale`. See `bilevel.linear_hypernet`."""

    weight: jax.Array
    bias: jax.Array
    center: jax.Array
    scale: jax.Array
    rest: PyTree
    params_layout: Layout
    hparams_layout: Layout

    def __call__(self, hparams) -> PyTree:
        """The parameters `b + A (λ − center) / scale` in the template's layout."""
        x = _standardised(self, hparams, "LinearHypernet(hparams)")
        flat = self.bias + self.weight @ x
        return eqx.combine(self.params_layout.unravel(flat), self.rest)


class MLPHypernet(eqx.Module):
    """`w = b + MLP((λ − center) / scale)`. See `bilevel.mlp_hypernet`."""

    weights: tuple     # depth hidden layers, then the output layer (no bias: `bias` is it)
    biases: tuple
    bias: jax.Array
    center: jax.Array
    scale: jax.Array
    rest: PyTree
    params_layout: Layout
    hparams_layout: Layout
    activation: Callable = eqx.field(static=True)

    def __call__(self, hparams) -> PyTree:
        """The parameters `b + MLP((λ − center) / scale)` in the template's layout."""
        x = _standardised(self, hparams, "MLPHypernet(hparams)")
        for W, c in zip(self.weights[:-1], self.biases):
            x = self.activation(W @ x + c)
        flat = self.bias + self.weights[-1] @ x
        return eqx.combine(self.params_layout.unravel(flat), self.rest)


def linear_hypernet(
    params: PyTree,
    hparams: PyTree,
    *,
    center: PyTree | None = None,
    scale: float | np.ndarray = 1.0,
    key: jax.Array | None = None,
    init_scale: float = 0.0,
) -> LinearHypernet:
    """An affine hypernet `w = b + A (λ − center) / scale` producing a pytree shaped like `params`.

    The papers' "linear hypernet": around a point λ̂ it can represent the best response's
    first-order Taylor expansion `w*(λ̂) + (dw*/dλ)(λ − λ̂)` exactly, so trained locally
    (`bilevel.hypertrain_local`) its derivative approaches dw*/dλ, and trained on a
    problem whose best response is affine in λ it is exact everywhere. `A` has one row per
    scalar parameter and one column per scalar hyperparameter (P × H numbers).

    At build time `b = params` and `A = 0` (or, with `key` and `init_scale`, random with
    entries of standard deviation `init_scale / sqrt(H)`), so the hypernet starts by returning
    `params` at the center. `center` and `scale` are held fixed (`jax.lax.stop_gradient`):
    they only condition the fit, and matter for it: trained on draws of spread σ around λ̂
    (`bilevel.hypertrain_local`), the slope's curvature is σ²/scale², so with SGD-type
    optimizers `scale ≈ σ` keeps the fit as fast for a small σ as for a large one (Adam's
    per-weight step sizes make it less sensitive). A random start matters for `bilevel.hypertrain_simplified`, which
    trains the hypernet only at λ̂ itself: from `A = 0` the hypergradient through the hypernet
    has no response term to move λ̂ with.

    **Arguments:**

    - `params`: a template of the inner parameters (any pytree; its floating-point arrays
      are produced, other leaves are carried through). Its arrays set the dtype.
    - `hparams`: a template of the hyperparameters the hypernet will be called with.
    - `center`: the point the affine map is expanded around; default `hparams`.
    - `scale`: λ − center is divided by it: a positive number or one per flattened
      hyperparameter (default 1).
    - `key`: a JAX PRNG key, needed only when `init_scale > 0`.
    - `init_scale`: the scale of the random initial `A` (default 0: `A` starts at zero).

    **Returns:**

    A `LinearHypernet`, an equinox module called as `hypernet(hparams) -> params`; pass it
    to `bilevel.best_response` or to the hypertraining drivers.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    params = {"W": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    log_lam = jnp.full(2, -1.0)
    net = bl.linear_hypernet(params, log_lam)
    out = net(log_lam + 0.1)          # a params tree; equal to `params` until trained
    assert out["W"].shape == (3, 2) and net.weight.shape == (8, 2)
    ```
    """
    where = "linear_hypernet(params, hparams)"
    arrays, rest, p_layout, h_layout, dtype = _templates(params, hparams, where)
    c = _center(center, hparams, h_layout, dtype, where)
    s = _check_scale(scale, h_layout.size, dtype, where).astype(dtype)
    bias = p_layout.ravel(arrays, dtype, where)
    weight = jnp.zeros((p_layout.size, h_layout.size), dtype)
    if not (isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool)
            and np.isfinite(init_scale) and init_scale >= 0):
        raise ValueError(f"{where} requires `init_scale` to be a finite number >= 0; got {init_scale!r}.")
    if init_scale > 0:
        _check_key(key, f"{where} with init_scale > 0")
        weight = init_scale / np.sqrt(h_layout.size) * jax.random.normal(key, weight.shape, dtype)
    return LinearHypernet(weight, bias, c, s, rest, p_layout, h_layout)


def mlp_hypernet(
    params: PyTree,
    hparams: PyTree,
    *,
    key: jax.Array,
    width: int = 64,
    depth: int = 2,
    activation: Callable = jax.nn.tanh,
    center: PyTree | None = None,
    scale: float | np.ndarray = 1.0,
) -> MLPHypernet:
    """A multilayer-perceptron hypernet `w = b + MLP((λ − center) / scale)` shaped like `params`.

    For global best responses (`bilevel.hypertrain_global`): unlike the linear hypernet it
    can follow a curved best response over a wide range of λ. The MLP's last layer starts
    at zero and `b = params`, so the hypernet starts by returning `params`. `center` and
    `scale` are held fixed; choose them so that (λ − center)/scale spans about [−1, 1] over
    the range of hyperparameters you sample.

    **Arguments:**

    - `params`: a template of the inner parameters (any pytree; its floating-point arrays
      are produced, other leaves are carried through).
    - `hparams`: a template of the hyperparameters.
    - `key`: a JAX PRNG key for the hidden layers' initialisation.
    - `width`: hidden units per layer (a positive int).
    - `depth`: number of hidden layers (a positive int).
    - `activation`: the hidden activation (default `jax.nn.tanh`).
    - `center`: subtracted from λ; default `hparams`.
    - `scale`: λ − center is divided by it: a positive number or one per flattened
      hyperparameter.

    **Returns:**

    An `MLPHypernet`, an equinox module called as `hypernet(hparams) -> params`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    params = {"W": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    net = bl.mlp_hypernet(params, jnp.asarray(-4.0), key=jax.random.key(0), width=16, scale=4.0)
    curve = jax.vmap(net)(jnp.linspace(-8.0, 0.0, 5))     # five params trees, stacked
    assert curve["W"].shape == (5, 3, 2)
    ```
    """
    from ._unroll import _check_int

    where = "mlp_hypernet(params, hparams, key=...)"
    _check_int(width, "width", where, 1)
    _check_int(depth, "depth", where, 1)
    if not callable(activation):
        raise TypeError(f"{where} requires `activation` to be a function such as jax.nn.tanh; got {activation!r}.")
    _check_key(key, where)
    arrays, rest, p_layout, h_layout, dtype = _templates(params, hparams, where)
    c = _center(center, hparams, h_layout, dtype, where)
    s = _check_scale(scale, h_layout.size, dtype, where).astype(dtype)
    sizes = [h_layout.size] + [width] * depth
    keys = jax.random.split(key, depth)
    weights, biases = [], []
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:]):   # LeCun-uniform hidden layers
        bound = 1.0 / np.sqrt(n_in)
        kw, kb = jax.random.split(k)
        weights.append(jax.random.uniform(kw, (n_out, n_in), dtype, -bound, bound))
        biases.append(jax.random.uniform(kb, (n_out,), dtype, -bound, bound))
    weights.append(jnp.zeros((p_layout.size, width), dtype))     # output starts at the template
    return MLPHypernet(tuple(weights), tuple(biases), p_layout.ravel(arrays, dtype, where), c, s, rest,
                       p_layout, h_layout, activation)
