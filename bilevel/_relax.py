"""Hyperparameters that are not continuous inputs of the loss: dropout keep probabilities
(a stochastic finite-difference derivative with coupled masks) and discrete choices (the
Gumbel-softmax / concrete relaxation).

- `coupled_bernoulli`: two Bernoulli masks from one uniform draw, the low one inside the high one.
- `dropout_expectation`: fn(mask, *args) with mask ~ Bernoulli(keep), whose derivative in `keep`
  is the coupled central difference of "Online hyper-parameter optimization" (ICLR 2018
  submission, §3.5.2) and whose derivative in `args` is ordinary autodiff at the drawn mask.
- `gumbel_softmax`: a relaxed one-hot sample (Jang et al. 2017; Maddison et al. 2017), with the
  straight-through hard variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_DOCS = "See docs/guide/dropout_discrete.md."


# ---------------------------------------------------------------------------- argument checks


def _check_key(key, where: str) -> None:
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = (
        isinstance(key, (jax.Array, np.ndarray))
        and key.dtype == np.uint32
        and key.shape == (2,)
    )
    if not (typed and key.shape == ()) and not raw:
        what = f"{type(key).__name__}"
        if hasattr(key, "dtype"):
            what += f" of dtype {key.dtype} and shape {tuple(key.shape)}"
        raise TypeError(
            f"{where} requires `key`, one JAX random key (jax.random.key(0) or "
            f"jax.random.PRNGKey(0)); got {what}. To draw several estimates, jax.vmap over "
            "jax.random.split(key, n)."
        )


def _concrete(x) -> np.ndarray | None:
    """x as a NumPy array when its value is known now (not traced), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.TracerArrayConversionError):  # pragma: no cover
        return None


def _float_array(x, name: str, where: str) -> jax.Array:
    if isinstance(x, bool) or (hasattr(x, "dtype") and np.dtype(x.dtype) == np.bool_):
        raise TypeError(f"{where} requires `{name}` to be a float number or array; got a boolean {x!r}.")
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(
            f"{where} requires `{name}` to be a float number or array; got {type(x).__name__} {x!r}."
        ) from err
    if jnp.issubdtype(arr.dtype, jnp.complexfloating) or not (
        jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
    ):
        raise TypeError(f"{where} requires `{name}` to be a real float number or array; got dtype {arr.dtype}.")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return arr


def _check_probabilities(p, name: str, where: str) -> None:
    value = _concrete(p)
    if value is not None and not np.all((value >= 0) & (value <= 1)):
        bad = value[~((value >= 0) & (value <= 1))].ravel()[:3]
        raise ValueError(
            f"{where} requires `{name}` to be probabilities in [0, 1] (finite); got values "
            f"{bad.tolist()}. A learned probability is usually kept inside with a sigmoid, e.g. "
            "keep = jax.nn.sigmoid(h['keep_logit'])."
        )


def _check_shape(shape, where: str) -> tuple[int, ...]:
    ok = isinstance(shape, (tuple, list)) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    if not ok:
        raise TypeError(
            f"{where} requires `shape`, a tuple of non-negative ints such as (5,); got {shape!r}."
        )
    return tuple(int(n) for n in shape)


def _check_broadcast(p: jax.Array, name: str, shape: tuple[int, ...], where: str) -> None:
    try:
        broadcast = np.broadcast_shapes(p.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{where}: `{name}` of shape {p.shape} does not broadcast to the mask shape {shape}. "
            f"Give one probability per unit (shape {shape}), a scalar shared by all units, or a "
            "shape that broadcasts (e.g. (1, n) for per-column probabilities)."
        )


# ---------------------------------------------------------------------------- coupled masks


def coupled_bernoulli(key, low, high, shape) -> tuple[jax.Array, jax.Array]:
    """Two Bernoulli masks drawn together so that the low one lies inside the high one.

    With one uniform draw u ~ U[0, 1) per unit, `mask_low = u < low` and `mask_high = u < high`.
    Each mask has the right marginal (P(u < p) = p), and `mask_low` ⊆ `mask_high` when
    low ≤ high. This is the coupling of "Online hyper-parameter optimization" (ICLR 2018
    submission, §3.5.2), B(p₁) = B(p₂)·B(p₁/p₂) for p₁ < p₂, written as one threshold: given
    u < p₂, u is uniform on [0, p₂), so P(u < p₁ | u < p₂) = p₁/p₂ — the product of a
    B(p₂) mask and an independent B(p₁/p₂) mask has exactly the joint law of the pair.
    Differences L(mask_high) − L(mask_low) then only see the units with low ≤ u < high, which
    is what makes the finite difference of `bilevel.dropout_expectation` low-variance.

    **Arguments:**

    - `key`: a JAX random key.
    - `low`, `high`: probabilities in [0, 1] with low ≤ high entrywise; scalars or arrays that
      broadcast to `shape`. Checked when their values are known; traced values are not
      checked (with low > high the masks are still B(low) and B(high), but not nested).
    - `shape`: the masks' shape, a tuple of ints.

    **Returns:**

    `(mask_low, mask_high)`, boolean arrays of shape `shape`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    lo, hi = bl.coupled_bernoulli(jax.random.key(0), 0.3, 0.7, (10_000,))
    assert not jnp.any(lo & ~hi)                       # mask_low ⊆ mask_high
    assert abs(lo.mean() - 0.3) < 0.03 and abs(hi.mean() - 0.7) < 0.03
    ```
    """
    where = "coupled_bernoulli(key, low, high, shape)"
    _check_key(key, where)
    shape = _check_shape(shape, where)
    low = _float_array(low, "low", where)
    high = _float_array(high, "high", where)
    _check_probabilities(low, "low", where)
    _check_probabilities(high, "high", where)
    _check_broadcast(low, "low", shape, where)
    _check_broadcast(high, "high", shape, where)
    lo_c, hi_c = _concrete(low), _concrete(high)
    if lo_c is not None and hi_c is not None and np.any(lo_c > hi_c):
        raise ValueError(
            f"{where} requires low ≤ high entrywise (mask_low ⊆ mask_high); got low={lo_c.tolist()} "
            f"and high={hi_c.tolist()}. Swap them."
        )
    u = jax.random.uniform(key, shape, dtype=jnp.result_type(low, high))
    return u < low, u < high


# ---------------------------------------------------------------------------- dropout rates


def _check_eps(eps, where: str) -> float:
    ok = isinstance(eps, (int, float, np.floating)) and not isinstance(eps, bool)
    if not ok or not math.isfinite(eps) or not 0 < eps <= 0.5:
        raise ValueError(
            f"{where} requires `eps`, the finite-difference half-width, a Python number with "
            f"0 < eps ≤ 0.5; got {eps!r}. Use about 0.05 when one keep probability is shared by "
            "many units (bias O(eps²), variance O(1/eps)) and up to 0.5 for one probability per "
            f"unit (exact in expectation for any eps). {_DOCS}"
        )
    return float(eps)


def _finite_difference(fn, keep, u, args, eps):
    """g_j = (fn(m₊ʲ, *args) − fn(m₋ʲ, *args)) / (p₊ʲ − p₋ʲ), one j per entry of `keep`.

    The masks depend on keep's value only (they are constants for autodiff); g keeps its
    dependence on `args`, so its derivatives in args are the mixed partials.
    """
    p = jax.lax.stop_gradient(keep)
    k = p.size
    basis = jnp.eye(k, dtype=p.dtype).reshape((k, *p.shape))
    p_plus = jnp.clip(p + eps * basis, 0.0, 1.0)            # (k, *keep.shape)
    p_minus = jnp.clip(p - eps * basis, 0.0, 1.0)
    width = (p_plus - p_minus).reshape(k, k).sum(axis=1)    # only entry j differs
    masks_plus = (u < p_plus.reshape((k,) + (1,) * (u.ndim - p.ndim) + p.shape)).astype(u.dtype)
    masks_minus = (u < p_minus.reshape((k,) + (1,) * (u.ndim - p.ndim) + p.shape)).astype(u.dtype)
    evaluate = jax.vmap(lambda m: jnp.asarray(fn(m, *args)))
    diff = evaluate(masks_plus) - evaluate(masks_minus)
    return diff / width.reshape((k,) + (1,) * (diff.ndim - 1))


def _check_output(out, where: str) -> None:
    if not isinstance(out, jax.ShapeDtypeStruct) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"{where} requires `fn(mask, *args)` to return one float array (usually a scalar "
            f"loss); got {out!r}."
        )


def dropout_expectation(fn: Callable, keep, args: tuple, key, *, eps: float = 0.05, shape=None):
    """One dropout sample of `fn`, differentiable in the keep probability by coupled finite differences.

    The training loss with dropout is an expectation over masks, L̄(λ) = E_{m ~ B(λ)} fn(m),
    with keep probability λ. Its derivative in λ has no autodiff rule (the mask is discrete);
    following "Online hyper-parameter optimization" (ICLR 2018 submission, §3.5.2) it is the
    central difference (E_{λ+ε} fn − E_{λ−ε} fn)/(2ε), with one mask per side. The masks are
    coupled through one uniform draw u (see `bilevel.coupled_bernoulli`): m₋ = u < λ−ε,
    m = u < λ, m₊ = u < λ+ε, so m₋ ⊆ m ⊆ m₊ and fn(m₊) − fn(m₋) sees only the units in the
    band λ−ε ≤ u < λ+ε. Here:

    - value: fn(m, *args) at the one mask m;
    - derivative in `args`: ordinary autodiff of fn at m (any order);
    - derivative in `keep`: (fn(m₊, *args) − fn(m₋, *args))/(2ε), one central difference per
      entry of `keep` (for an array of per-unit probabilities, entry j moves only the units
      that share it);
    - mixed derivative ∂²/∂λ∂args (what `bilevel.implicit`, `bilevel.unroll` and
      `bilevel.forward_mode` need when `keep` is in the inner loss): the same difference of
      the args-derivatives, (∇fn(m₊) − ∇fn(m₋))/(2ε).

    **This is a stochastic estimate, not an exact derivative.** Over the draw it has mean
    (E_{λ+ε} fn − E_{λ−ε} fn)/(2ε): when each entry of `keep` governs one unit, E fn is affine
    in it and the mean is the exact derivative for any ε; when an entry is shared by n units,
    E fn is a polynomial of degree n in it and the bias is ε²/6 · ∂³E fn/∂λ³ + O(ε⁴). The
    noise has variance O(1/ε) (the band holds a fraction 2ε of the units), against O(1/ε²)
    with independent masks. Choose ε ≈ 0.05 for a shared probability; up to 0.5 for
    per-unit ones. When λ ± ε leaves [0, 1] the difference is clamped to the interval (a
    one-sided difference over [max(λ−ε, 0), min(λ+ε, 1)], bias O(ε) there) rather than
    refused, because λ is usually a traced hyperparameter whose value is unknown when the
    function is built. Derivatives of second order in `keep` itself are not estimated: they
    are 0.

    Implemented as a `jax.custom_jvp` (only the one evaluation of fn runs when nothing is
    differentiated) whose rule is the JVP of the surrogate fn(m, *args) + Σⱼ (λⱼ −
    stop_gradient(λⱼ))·gⱼ(args), with gⱼ the difference above: its tangent is linear, so
    reverse mode, forward mode and mixed derivatives of any order in `args` compose. A
    derivative costs 2·keep.size + 1 evaluations of fn (vmapped).

    **Arguments:**

    - `fn`: `fn(mask, *args) -> float array` (usually a scalar loss); `mask` is a float array
      of `shape` with 1.0 for kept units and 0.0 for dropped ones. For inverted dropout
      (scaling by 1/λ) pass λ among `args` as well and divide inside fn: that explicit
      dependence is then differentiated exactly. Everything to differentiate must come
      through `keep` or `args`: fn may close over constants (data), not over values being
      differentiated.
    - `keep`: the keep probability λ in [0, 1], a scalar or an array that broadcasts to
      `shape` (e.g. one per unit). Out-of-range or NaN values give NaN (an error when the
      value is known, i.e. not traced).
    - `args`: a tuple of the other inputs of fn (pytrees).
    - `key`: a JAX random key; average over keys (`jax.vmap`) for a lower-variance estimate.
    - `eps`: the half-width ε of the central difference, 0 < ε ≤ 0.5 (default 0.05).
    - `shape`: the mask's shape; default `keep`'s shape.

    **Returns:**

    fn(m, *args) at one mask m ~ B(keep), with the derivatives above.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X = jax.random.normal(jax.random.key(0), (20, 5)); y = X @ jnp.ones(5)
    def loss(mask, w):                                  # dropout on the inputs
        return jnp.mean((y - X @ (mask * w)) ** 2)

    def sample(keep, w, key):
        return bl.dropout_expectation(loss, keep, (w,), key, shape=(5,))

    keys = jax.random.split(jax.random.key(1), 2000)
    grads = jax.vmap(jax.grad(sample), (None, None, 0))(0.7, jnp.ones(5), keys)
    print(grads.mean(), grads.std() / jnp.sqrt(2000.0))  # estimate of dE[loss]/dkeep, its std. error
    ```
    """
    where = "dropout_expectation(fn, keep, args, key, *, eps=0.05, shape=None)"
    if not callable(fn):
        raise TypeError(
            f"{where} requires `fn`, a function (mask, *args) -> loss; got {type(fn).__name__} {fn!r}."
        )
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"{where} requires `args`, a tuple of fn's other inputs (e.g. (w,) or (w, batch)); "
            f"got {type(args).__name__}. Write (w,) for a single one."
        )
    args = tuple(args)
    _check_key(key, where)
    eps = _check_eps(eps, where)
    keep = _float_array(keep, "keep", where)
    _check_probabilities(keep, "keep", where)
    shape = keep.shape if shape is None else _check_shape(shape, where)
    _check_broadcast(keep, "keep", shape, where)
    u = jax.random.uniform(key, shape, dtype=keep.dtype)
    mask = lambda p: (u < p).astype(u.dtype)
    out_struct = jax.eval_shape(lambda a: jnp.asarray(fn(mask(keep), *a)), args)
    _check_output(out_struct, where)

    def guard(p, a):
        """A factor 1, or NaN when keep is out of [0, 1] or NaN (NaN fails both comparisons).

        It multiplies the float args too, so every derivative is NaN as well: a NaN that only
        multiplied the output could be dropped where fn multiplies by a zero mask.
        """
        p = jax.lax.stop_gradient(p)
        scale = jnp.where(jnp.all((p >= 0) & (p <= 1)), 1.0, jnp.nan).astype(p.dtype)
        inexact = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        a = jax.tree_util.tree_map(lambda x: x * scale if inexact(x) else x, a)
        return scale, a

    def surrogate(p, a):
        scale, a = guard(p, a)
        g = _finite_difference(fn, p, u, a, eps)          # (keep.size, *out)
        delta = (p - jax.lax.stop_gradient(p)).reshape(-1)
        value = jnp.asarray(fn(mask(jax.lax.stop_gradient(p)), *a))
        return scale * (value + jnp.tensordot(delta, g, axes=1))

    @jax.custom_jvp
    def estimate(p, a):
        scale, a = guard(p, a)
        return scale * jnp.asarray(fn(mask(p), *a))

    @estimate.defjvp
    def _(primals, tangents):
        return jax.jvp(surrogate, primals, tangents)

    return estimate(keep, args)


# ---------------------------------------------------------------------------- discrete choices


def _check_temperature(temperature, where: str) -> jax.Array:
    t = _float_array(temperature, "temperature", where)
    value = _concrete(t)
    if value is not None and not np.all(np.isfinite(value) & (value > 0)):
        raise ValueError(
            f"{where} requires `temperature` > 0 and finite; got {value.tolist()}. Small values "
            "(0.1-0.5) give nearly one-hot samples with noisy gradients, large ones (≥ 1) "
            "smooth samples near the uniform vector; anneal from about 1 toward 0.1."
        )
    return t


def gumbel_softmax(key, logits, temperature, *, hard: bool = False, axis: int = -1) -> jax.Array:
    """A relaxed one-hot sample of the categorical distribution softmax(logits).

    The Gumbel-softmax / concrete distribution (Jang et al. 2017; Maddison et al. 2017):
    y = softmax((logits + g)/τ) with g_k = −log(−log U_k), U_k ~ U(0, 1) independent. y lies on
    the simplex, is differentiable in the logits (and in τ), and as τ → 0 it tends to the
    one-hot vector of argmax(logits + g), which is an exact sample of Categorical(softmax
    (logits)) (the Gumbel-max trick). A discrete hyperparameter with K options becomes K
    logits λ: gate the options with y(λ) in the losses and follow hypergradients in λ; the
    chosen option is argmax λ. The relaxation changes the problem — a gradient through y is
    the derivative of the relaxed objective, not of the discrete one; lower τ is closer but
    noisier.

    With `hard=True` the forward value is exactly the one-hot vector of argmax y, and the
    gradient is the relaxed one (straight-through Gumbel-softmax, Jang et al. 2017). That
    gradient is biased: it is the derivative of the soft sample, used as if it were the
    derivative of the hard one.

    **Arguments:**

    - `key`: a JAX random key.
    - `logits`: unnormalised log-probabilities, a float array with at least one dimension
      (−inf marks an impossible option; NaN gives NaN).
    - `temperature`: τ > 0 and finite, a number or an array that broadcasts against `logits`
      (a traced τ ≤ 0 gives NaN).
    - `hard`: straight-through one-hot forward value (default False).
    - `axis`: the axis of the K options (default −1).

    **Returns:**

    An array of `logits`' shape that sums to 1 along `axis`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    logits = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    soft = bl.gumbel_softmax(jax.random.key(0), logits, 0.5)
    hard = bl.gumbel_softmax(jax.random.key(0), logits, 0.5, hard=True)
    assert jnp.allclose(soft.sum(), 1.0) and hard.argmax() == soft.argmax() and hard.max() == 1.0
    ```
    """
    where = "gumbel_softmax(key, logits, temperature, *, hard=False, axis=-1)"
    _check_key(key, where)
    logits = _float_array(logits, "logits", where)
    if logits.ndim == 0:
        raise ValueError(
            f"{where} requires `logits` with at least one dimension (the K options); got a "
            "scalar. Pass e.g. jnp.zeros(K) for K equally likely options."
        )
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -logits.ndim <= axis < logits.ndim:
        raise ValueError(
            f"{where} requires `axis`, an int in [-{logits.ndim}, {logits.ndim}) for logits of "
            f"shape {logits.shape}; got {axis!r}."
        )
    if not isinstance(hard, (bool, np.bool_)):
        raise TypeError(f"{where} requires `hard` to be True or False; got {hard!r}.")
    t = _check_temperature(temperature, where)
    try:
        np.broadcast_shapes(t.shape, logits.shape)
    except ValueError:
        raise ValueError(
            f"{where}: `temperature` of shape {t.shape} does not broadcast against logits of "
            f"shape {logits.shape}; pass a scalar."
        ) from None
    dtype = jnp.result_type(logits, t)
    gumbel = jax.random.gumbel(key, logits.shape, dtype=dtype)
    t = jnp.where(t > 0, t, jnp.nan)                       # a traced τ ≤ 0 gives NaN, not a sample
    soft = jax.nn.softmax((logits + gumbel) / t, axis=axis)
    if not hard:
        return soft
    index = jnp.argmax(soft, axis=axis, keepdims=True)
    positions = jax.lax.broadcasted_iota(jnp.int32, soft.shape, axis % soft.ndim)
    one_hot = (positions == index).astype(soft.dtype)
    return one_hot + (soft - jax.lax.stop_gradient(soft))   # exactly one-hot forward: x − x = 0
