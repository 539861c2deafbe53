"""Minibatches drawn inside compiled code: one sampler shared by the stochastic drivers.

A `Sampler` holds a dataset (a pytree of arrays whose leading axis is the row) split into
`num_batches` fixed minibatches of `batch_size` rows. Which minibatch is used at draw `t` is
a pure function of a key and `t`, so a whole stochastic run is one `lax.scan`, a population
of seeds one `vmap`, and a reference implementation can replay the same draws. Fixed
minibatches are what variance-reduced methods (SABA) keep one memory entry for.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._problem import tree_summary

PyTree = Any


class Sampler(eqx.Module):
    """A dataset split into fixed minibatches, drawn by key and step. See `bilevel.sampler`."""

    batches: PyTree                       # every leaf: (num_batches, batch_size, ...)
    batch_size: int = eqx.field(static=True)
    num_batches: int = eqx.field(static=True)
    replace: bool = eqx.field(static=True)

    def index(self, key, t) -> jax.Array:
        """The minibatch index drawn at draw `t` with `key`.

        Without replacement every block of `num_batches` consecutive draws (an epoch) visits
        each minibatch once, in an order drawn from `key` and the epoch number; with
        replacement each draw is uniform and independent.

        **Arguments:**

        - `key`: a PRNG key (one per stream of draws, fixed for a run).
        - `t`: the draw count, an int (traced or not).

        **Returns:**

        An int32 scalar in [0, num_batches).
        """
        t = jnp.asarray(t, jnp.int32)
        if self.num_batches == 1:
            return jnp.zeros((), jnp.int32)
        if self.replace:
            return jax.random.randint(jax.random.fold_in(key, t), (), 0, self.num_batches, jnp.int32)
        # One sort of random 32-bit keys (jax.random.permutation sorts several times, which
        # compiles to far more code); ties, of probability < num_batches²/2³³, keep index order.
        bits = jax.random.bits(jax.random.fold_in(key, t // self.num_batches), (self.num_batches,), jnp.uint32)
        return jnp.argsort(bits)[t % self.num_batches].astype(jnp.int32)

    def batch(self, j) -> PyTree:
        """Minibatch `j`: rows `j·batch_size` to `(j+1)·batch_size − 1` of the data."""
        return jax.tree_util.tree_map(lambda x: x[j], self.batches)

    def draw(self, key, t) -> tuple[jax.Array, PyTree]:
        """The minibatch drawn at draw `t` with `key`, and its index.

        **Arguments:**

        - `key`: a PRNG key (one per stream of draws).
        - `t`: the draw count.

        **Returns:**

        `(j, batch)`: the index `index(key, t)` and minibatch `j` (a pytree of arrays with
        leading axis `batch_size`).
        """
        j = self.index(key, t)
        return j, self.batch(j)

    def indices(self, key, steps: int) -> jax.Array:
        """The indices drawn at draws 0..steps−1, to replay a run's draws elsewhere.

        **Arguments:**

        - `key`: the PRNG key of the stream.
        - `steps`: how many draws, a Python int.

        **Returns:**

        An int32 array of shape `(steps,)`.
        """
        return jax.vmap(lambda t: self.index(key, t))(jnp.arange(steps))

    @property
    def data(self) -> PyTree:
        """The whole dataset (the minibatches concatenated back into rows)."""
        return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), self.batches)


def sampler(data: PyTree, batch_size: int, *, replace: bool = False,
            drop_remainder: bool = False) -> Sampler:
    """Split a dataset into fixed minibatches that stochastic drivers draw from inside `jit`.

    The rows (the leading axis of every leaf) are split in order into minibatches of
    `batch_size` rows; shuffle the rows first if their order is not random (a dataset sorted
    by class gives unbiased but noisy minibatch estimates otherwise). Drivers draw minibatch
    `sampler.index(key, t)` at step `t`: without replacement (the default) each epoch of
    `num_batches` steps visits every minibatch once, in a random order; with `replace=True`
    every draw is uniform and independent. Either way a minibatch loss that is a mean over
    its rows is an unbiased estimate of the full-data loss. `batch_size` equal to the number
    of rows gives the deterministic full-batch method.

    **Arguments:**

    - `data`: a pytree of arrays with the same leading axis (the rows), e.g. `(X, y)`.
    - `batch_size`: rows per minibatch, a Python int between 1 and the number of rows.
    - `replace`: draw minibatches independently with replacement instead of by epochs.
    - `drop_remainder`: allow a row count that `batch_size` does not divide, dropping the
      last `n mod batch_size` rows (they are never drawn). Without it such a split raises.

    **Returns:**

    A `Sampler` (a pytree: pass it to a driver's `step` or `run`, through `jax.jit`).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    X, y = jnp.ones((100, 3)), jnp.zeros(100)
    s = bl.sampler((X, y), batch_size=20)
    j, (xb, yb) = s.draw(jax.random.key(0), 7)      # minibatch index and its 20 rows
    print(s.num_batches, xb.shape, s.indices(jax.random.key(0), 5))
    ```
    """
    where = "sampler(data, batch_size)"
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"{where} requires data with at least one array leaf; got {data!r}.")
    rows = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in rows or len(rows) != 1:
        raise ValueError(
            f"{where} requires every leaf of data to have the same leading axis (the rows); got "
            f"{tree_summary(data)}. Stack the rows of each array along axis 0."
        )
    (n,) = rows
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"{where} requires batch_size to be a Python int; got {batch_size!r}.")
    batch_size = int(batch_size)
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"{where} requires 1 <= batch_size <= {n} (the number of rows); got "
            f"batch_size={batch_size}."
        )
    for name, flag in (("replace", replace), ("drop_remainder", drop_remainder)):
        if not isinstance(flag, bool):
            raise TypeError(f"{where} requires `{name}` to be True or False; got {flag!r}.")
    num_batches, remainder = divmod(n, batch_size)
    if remainder and not drop_remainder:
        divisors = [d for d in range(max(1, batch_size - 32), batch_size + 33) if n % d == 0]
        hint = f" (e.g. {min(divisors, key=lambda d: abs(d - batch_size))})" if divisors else ""
        raise ValueError(
            f"{where}: batch_size={batch_size} does not divide the {n} rows, so the last "
            f"{remainder} rows would never be drawn and minibatch losses would be biased. Pick "
            f"a batch size that divides {n}{hint}, trim the data, or pass drop_remainder=True."
        )
    used = num_batches * batch_size
    batches = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x)[:used].reshape((num_batches, batch_size) + np.shape(x)[1:]), data)
    return Sampler(batches, batch_size, num_batches, replace)
