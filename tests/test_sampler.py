"""bilevel.sampler: fixed minibatches drawn by (key, draw count), inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel as bl


def _data(n=60):
    X = np.arange(n * 2, dtype=float).reshape(n, 2)
    return X, np.arange(n)


def test_minibatches_are_consecutive_rows_and_cover_the_data():
    X, y = _data()
    s = bl.sampler((X, y), batch_size=12)
    assert s.num_batches == 5
    for j in range(5):
        xb, yb = s.batch(j)
        np.testing.assert_array_equal(yb, np.arange(12 * j, 12 * (j + 1)))
        np.testing.assert_array_equal(xb, X[12 * j:12 * (j + 1)])
    np.testing.assert_array_equal(s.data[0], X)


def test_without_replacement_each_epoch_visits_every_minibatch_once():
    s = bl.sampler(_data(), batch_size=12)
    idx = np.asarray(s.indices(jax.random.key(0), 5 * 7))
    for epoch in idx.reshape(7, 5):
        assert sorted(epoch) == list(range(5))
    assert len({tuple(e) for e in idx.reshape(7, 5)}) > 1       # the order changes per epoch


def test_with_replacement_draws_are_uniform():
    s = bl.sampler(_data(), batch_size=12, replace=True)
    idx = np.asarray(s.indices(jax.random.key(1), 5000))
    counts = np.bincount(idx, minlength=5)
    # each count is Binomial(5000, 1/5): mean 1000, sd 28.3; 5 sd either side
    assert np.all(np.abs(counts - 1000) < 5 * 28.3), counts
    assert not all(sorted(e) == list(range(5)) for e in idx[:50].reshape(10, 5))


def test_draws_are_pure_functions_of_key_and_count_and_work_under_jit_and_vmap():
    s = bl.sampler(_data(), batch_size=12)
    key = jax.random.key(3)
    j, (xb, yb) = jax.jit(lambda smp, k, t: smp.draw(k, t))(s, key, 7)   # a sampler is a pytree
    assert int(j) == int(s.index(key, 7))
    np.testing.assert_array_equal(yb, s.batch(int(j))[1])
    keys = jax.random.split(key, 4)
    js = jax.vmap(lambda k: s.index(k, 0))(keys)
    assert js.shape == (4,)
    full = bl.sampler(_data(), batch_size=60)
    assert full.num_batches == 1 and int(full.index(key, 9)) == 0


def test_bad_arguments_raise():
    X, y = _data()
    with pytest.raises(ValueError, match="does not divide the 60 rows"):
        bl.sampler((X, y), batch_size=7)
    assert bl.sampler((X, y), batch_size=7, drop_remainder=True).num_batches == 8
    with pytest.raises(ValueError, match="1 <= batch_size <= 60"):
        bl.sampler((X, y), batch_size=0)
    with pytest.raises(TypeError, match="Python int"):
        bl.sampler((X, y), batch_size=2.0)
    with pytest.raises(ValueError, match="same leading axis"):
        bl.sampler((X, y[:10]), batch_size=5)
    with pytest.raises(ValueError, match="at least one array"):
        bl.sampler(None, batch_size=5)
    with pytest.raises(TypeError, match="replace"):
        bl.sampler((X, y), batch_size=6, replace="yes")
    with pytest.raises(ValueError, match="same leading axis"):
        bl.sampler((X, jnp.asarray(1.0)), batch_size=6)
