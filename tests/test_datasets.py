"""bilevel.datasets: digits and MNIST splits (sizes, disjointness, determinism, train-only
standardisation), the docstring examples, and every bad input's error."""

import collections
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import bilevel as bl
from bilevel import datasets

try:
    import sklearn.datasets as sklearn_datasets
except ImportError:  # digits needs the optional scikit-learn; MNIST tests still run
    sklearn_datasets = None
needs_sklearn = pytest.mark.skipif(sklearn_datasets is None, reason="scikit-learn not installed")

REAL_MNIST = Path(__file__).parents[2] / "shared" / "data" / "mnist.npz"
N_DIGITS = 1797


@pytest.fixture(scope="module")
def raw_digits():
    d = sklearn_datasets.load_digits()
    return d.data, d.target


def _rows(X, y):
    """Multiset of (pixel row, label) pairs, as bytes."""
    return collections.Counter(
        (np.ascontiguousarray(x).tobytes(), int(label)) for x, label in zip(X, y)
    )


def _check_types(data):
    for X, y in (data.train, data.val, data.test):
        assert X.dtype == np.float32 and y.dtype == np.int32
        assert X.ndim == 2 and y.shape == (len(X),)


# ----------------------------------------------------------------------------- docs


def _examples():
    for name in ["Dataset", "digits", "mnist", "load"]:
        doc = inspect.getdoc(getattr(datasets, name))
        assert "**Example:**" in doc, name
        if name != "Dataset":
            assert "**Arguments:**" in doc and "**Returns:**" in doc, name
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc, re.S)):
            marks = [needs_sklearn] if "digits" in block else []
            yield pytest.param(block, id=f"{name}-{i}", marks=marks)


@pytest.mark.parametrize("code", list(_examples()))
def test_docstring_examples_run(code):
    exec(compile(code, "<docstring>", "exec"), {})


@needs_sklearn
def test_module_is_public_and_repr_is_short():
    assert bl.datasets is datasets
    assert set(datasets.__all__) == {"Dataset", "digits", "mnist", "load", "BenchProblem", "data_cleaning",
                                     "logreg_per_feature"}
    data = datasets.digits()
    assert repr(data) == (
        "Dataset(name='digits', num_classes=10, train=(899, 64), val=(449, 64), test=(449, 64))"
    )


# ----------------------------------------------------------------------------- digits


@needs_sklearn
def test_digits_default_split_sizes_and_types():
    data = datasets.digits()
    assert isinstance(data, datasets.Dataset)
    assert data.name == "digits" and data.num_classes == 10
    assert [len(s[0]) for s in data[:3]] == [899, 449, 449]
    assert all(s[0].shape[1] == 64 for s in data[:3])
    _check_types(data)


@needs_sklearn
@pytest.mark.parametrize("val, test", [(0.25, 0.25), (1 / 3, 1 / 3), (0.1, 0.3)])
def test_digits_splits_partition_the_data(raw_digits, val, test):
    data = datasets.digits(val_fraction=val, test_fraction=test, seed=5, standardize=False)
    sizes = [len(s[0]) for s in data[:3]]
    assert sum(sizes) == N_DIGITS
    assert sizes[1] == round(val * N_DIGITS) and sizes[2] == round(test * N_DIGITS)
    # Pixels in [0, 1], exactly raw / 16; the three splits together are the raw data,
    # each (image, label) exactly once, so they are disjoint.
    together = collections.Counter()
    for X, y in data[:3]:
        assert X.min() >= 0.0 and X.max() <= 1.0
        together += _rows(np.rint(X.astype(np.float64) * 16.0), y)
    assert together == _rows(*raw_digits)


@needs_sklearn
def test_digits_labels():
    data = datasets.digits()
    for _, y in data[:3]:
        assert y.min() >= 0 and y.max() <= 9
    assert set(data.train[1].tolist()) == set(range(10))


@needs_sklearn
def test_digits_deterministic_in_seed():
    a, b, c = datasets.digits(seed=7), datasets.digits(seed=7), datasets.digits(seed=8)
    for sa, sb in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(sa[0], sb[0])
        np.testing.assert_array_equal(sa[1], sb[1])
    assert not np.array_equal(a.train[1], c.train[1])
    assert not np.array_equal(a.val[0], c.val[0])


@needs_sklearn
def test_digits_standardised_with_train_statistics_only():
    raw = datasets.digits(seed=2, standardize=False)
    std = datasets.digits(seed=2, standardize=True)
    Xtr = raw.train[0].astype(np.float64)
    mean, sd = Xtr.mean(0), Xtr.std(0)
    varying = sd > 1e-8
    assert 0 < varying.sum() < 64  # digits has constant border pixels
    # Train: mean 0, std 1 on varying features; constant ones centred to exactly 0.
    np.testing.assert_allclose(std.train[0].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.train[0].std(0)[varying], 1.0, atol=1e-4)
    np.testing.assert_array_equal(std.train[0][:, ~varying], 0.0)
    # Validation and test use the same (train) shift and scale, not their own.
    scale = np.where(varying, sd, 1.0)
    for split_raw, split_std in ((raw.val, std.val), (raw.test, std.test)):
        expect = (split_raw[0] - mean) / scale
        np.testing.assert_allclose(split_std[0], expect, atol=1e-5)
        np.testing.assert_array_equal(split_std[1], split_raw[1])
    assert np.abs(std.val[0].mean(0)).max() > 1e-3
    assert np.all(np.isfinite(std.val[0])) and np.all(np.isfinite(std.test[0]))


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'bilevel\[demo\]'"):
        datasets.digits()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(val_fraction=0.0), ValueError, r"0 < val_fraction < 1.*val_fraction=0.25"),
        (dict(val_fraction=1.0), ValueError, r"0 < val_fraction < 1"),
        (dict(test_fraction=-0.1), ValueError, r"0 < test_fraction < 1.*test_fraction=0.25"),
        (dict(val_fraction="0.2"), TypeError, r"`val_fraction` to be a number.*got str"),
        (dict(test_fraction=True), TypeError, r"`test_fraction` to be a number.*got bool"),
        (dict(val_fraction=0.6, test_fraction=0.4), ValueError, r"val_fraction \+ test_fraction < 1.*Lower"),
        pytest.param(dict(val_fraction=0.0001), ValueError, r"0 validation.*at least one",
                     marks=needs_sklearn),
        pytest.param(dict(val_fraction=1795.6 / N_DIGITS, test_fraction=0.6 / N_DIGITS), ValueError,
                     r"0 training images.*at least one", marks=needs_sklearn),
        (dict(seed="0"), TypeError, r"`seed` to be a non-negative int.*seed=0"),
        (dict(seed=1.5), TypeError, r"`seed` to be a non-negative int"),
        (dict(seed=-1), ValueError, r"`seed` >= 0.*seed=0"),
        (dict(standardize="yes"), TypeError, r"`standardize` to be True or False"),
    ],
)
def test_digits_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        datasets.digits(**kwargs)


# ----------------------------------------------------------------------------- mnist (synthetic)

N_TRAIN, N_TEST = 200, 50


def _unique_images(n, offset, rng):
    """n random uint8 images whose first two pixels encode offset + index (so rows are unique)."""
    X = rng.integers(0, 256, (n, 784), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    X[:, 0], X[:, 1] = ids // 256, ids % 256
    X[:, 2:6] = 0  # constant pixels, like MNIST's border
    return X


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=_unique_images(N_TRAIN, 0, rng),
        y_train=(np.arange(N_TRAIN) % 10).astype(np.uint8),
        x_test=_unique_images(N_TEST, N_TRAIN, rng),
        y_test=(np.arange(N_TEST) % 10).astype(np.uint8),
    )
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_mnist_splits_sizes_and_disjointness(fake_mnist):
    path, a = fake_mnist
    data = datasets.mnist(path, num_val=40)
    assert data.name == "mnist" and data.num_classes == 10
    assert [s[0].shape for s in data[:3]] == [(160, 784), (40, 784), (50, 784)]
    _check_types(data)
    rows = [_rows(np.rint(X * 255.0).astype(np.uint8), y) for X, y in data[:3]]
    # train + val is exactly x_train (each image once); test is x_test, in file order.
    assert rows[0] + rows[1] == _rows(a["x_train"], a["y_train"])
    assert not set(rows[0]) & set(rows[1])
    np.testing.assert_array_equal(np.rint(data.test[0] * 255.0), a["x_test"])
    np.testing.assert_array_equal(data.test[1], a["y_test"])
    for X, _ in data[:3]:
        assert X.min() >= 0.0 and X.max() <= 1.0


def test_mnist_subsampling_is_deterministic(fake_mnist):
    path, a = fake_mnist
    kw = dict(num_train=30, num_val=20, num_test=10)
    d1, d2 = datasets.mnist(path, seed=3, **kw), datasets.mnist(path, seed=3, **kw)
    d3 = datasets.mnist(path, seed=4, **kw)
    assert [len(s[0]) for s in d1[:3]] == [30, 20, 10]
    for s1, s2 in zip(d1[:3], d2[:3]):
        np.testing.assert_array_equal(s1[0], s2[0])
        np.testing.assert_array_equal(s1[1], s2[1])
    assert not np.array_equal(d1.train[0], d3.train[0])
    assert not np.array_equal(d1.test[0], d3.test[0])
    # The test subsample is drawn from x_test, without repeats.
    test_rows = _rows(np.rint(d1.test[0] * 255.0).astype(np.uint8), d1.test[1])
    assert all(c == 1 for c in test_rows.values())
    assert not set(test_rows) - set(_rows(a["x_test"], a["y_test"]))


def test_mnist_accepts_28x28_images_and_path_strings(tmp_path, fake_mnist):
    _, a = fake_mnist
    path = tmp_path / "square.npz"
    np.savez(path, **{k: v.reshape(-1, 28, 28) if k.startswith("x") else v for k, v in a.items()})
    flat = datasets.mnist(fake_mnist[0], num_val=40)
    square = datasets.mnist(str(path), num_val=40)
    for s1, s2 in zip(flat[:3], square[:3]):
        np.testing.assert_array_equal(s1[0], s2[0])


def test_mnist_standardised_with_train_statistics_only(fake_mnist):
    path, _ = fake_mnist
    raw = datasets.mnist(path, num_val=40, num_train=100)
    std = datasets.mnist(path, num_val=40, num_train=100, standardize=True)
    mean, sd = raw.train[0].mean(0, dtype=np.float64), raw.train[0].std(0, dtype=np.float64)
    scale = np.where(sd > 1e-8, sd, 1.0)
    assert np.all(sd[2:6] == 0.0)  # constant pixels are only centred, not divided by 0
    np.testing.assert_array_equal(std.train[0][:, 2:6], 0.0)
    np.testing.assert_allclose(std.train[0].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.val[0], (raw.val[0] - mean) / scale, atol=1e-5)
    np.testing.assert_allclose(std.test[0], (raw.test[0] - mean) / scale, atol=1e-5)
    assert np.abs(std.val[0].mean(0)).max() > 1e-3


def test_mnist_missing_file_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*--data-path.*np\.savez"):
        datasets.mnist(missing)
    with pytest.raises(FileNotFoundError, match="--data-path"):
        datasets.mnist(tmp_path)  # a directory, not a file


def test_mnist_not_an_npz(tmp_path):
    text = tmp_path / "mnist.npz"
    text.write_text("not a numpy file\n")
    with pytest.raises(ValueError, match=r"could not read.*np\.savez with keys x_train, y_train"):
        datasets.mnist(text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((3, 784), np.uint8))
    with pytest.raises(ValueError, match=r"single array.*not an \.npz.*keys x_train"):
        datasets.mnist(single)


def test_mnist_wrong_keys_lists_expected_and_found(tmp_path, fake_mnist):
    _, a = fake_mnist
    path = tmp_path / "keys.npz"
    np.savez(path, images=a["x_train"], labels=a["y_train"], x_test=a["x_test"], y_test=a["y_test"])
    with pytest.raises(
        ValueError,
        match=r"expected an \.npz with keys x_train, y_train, x_test, y_test.*"
        r"has keys \['images', 'labels', 'x_test', 'y_test'\].*missing \['x_train', 'y_train'\]",
    ):
        datasets.mnist(path)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(y_train=np.zeros(7, np.uint8)), r"x_train and y_train do not have matching shapes"),
        (dict(x_test=np.zeros(N_TEST, np.uint8)), r"x_test and y_test do not have matching shapes"),
        (dict(x_train=np.zeros((N_TRAIN, 784), np.float32)), r"x_train and y_train must hold integers"),
        (dict(x_train=np.full((N_TRAIN, 784), 300, np.int32)), r"x_train has pixels outside 0-255"),
        (dict(y_test=np.full(N_TEST, 10, np.uint8)), r"y_test has labels outside 0-9"),
        (dict(x_test=np.zeros((N_TEST, 100), np.uint8)), r"different numbers of pixels"),
    ],
)
def test_mnist_wrong_shapes_or_values(tmp_path, fake_mnist, change, match):
    _, a = fake_mnist
    path = tmp_path / "bad.npz"
    np.savez(path, **{**a, **change})
    with pytest.raises(ValueError, match=match + r".*Expected x_train \(n, 784\)"):
        datasets.mnist(path, num_val=40)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_val=N_TRAIN), ValueError, rf"x_train holds {N_TRAIN} images, too few.*Ask for fewer"),
        (dict(num_val=100, num_train=101), ValueError, r"num_val=100 \+ num_train=101.*Ask for fewer"),
        (dict(num_val=40, num_test=N_TEST + 1), ValueError, rf"num_test <= {N_TEST}"),
        (dict(num_val=0), ValueError, r"`num_val` >= 1.*num_val=1000"),
        (dict(num_train=0), ValueError, r"`num_train` >= 1"),
        (dict(num_train=1.5), TypeError, r"`num_train` to be None .*or an int >= 1.*got float"),
        (dict(num_val=None), TypeError, r"`num_val` to be an int >= 1.*got NoneType"),
        (dict(num_test="10"), TypeError, r"`num_test` to be None"),
        (dict(num_val=40, seed=-2), ValueError, r"`seed` >= 0"),
        (dict(num_val=40, standardize=1), TypeError, r"`standardize` to be True or False"),
    ],
)
def test_mnist_bad_sizes_and_settings(fake_mnist, kwargs, error, match):
    with pytest.raises(error, match=match):
        datasets.mnist(fake_mnist[0], **kwargs)


def test_mnist_bad_path_type():
    with pytest.raises(TypeError, match=r"`path` to be a str or os\.PathLike.*got int"):
        datasets.mnist(3)


# ----------------------------------------------------------------------------- mnist (real file)


def test_real_mnist_file():
    if not REAL_MNIST.is_file():
        pytest.skip(f"{REAL_MNIST} not present")
    kw = dict(num_train=2000, num_val=500, num_test=300, seed=1)
    data = datasets.mnist(REAL_MNIST, **kw)
    assert [s[0].shape for s in data[:3]] == [(2000, 784), (500, 784), (300, 784)]
    _check_types(data)
    for X, y in data[:3]:
        assert X.min() >= 0.0 and X.max() <= 1.0 and X.max() > 0.99
        assert y.min() >= 0 and y.max() <= 9
    assert set(data.train[1].tolist()) == set(range(10))
    again = datasets.load("mnist", path=str(REAL_MNIST), **kw)
    for s1, s2 in zip(data[:3], again[:3]):
        np.testing.assert_array_equal(s1[0], s2[0])
        np.testing.assert_array_equal(s1[1], s2[1])


# ----------------------------------------------------------------------------- load


@needs_sklearn
def test_load_by_name(fake_mnist):
    a = datasets.load("digits", seed=4, val_fraction=0.2, test_fraction=0.3)
    b = datasets.digits(seed=4, val_fraction=0.2, test_fraction=0.3)
    np.testing.assert_array_equal(a.train[0], b.train[0])
    m = datasets.load("mnist", fake_mnist[0], num_val=40, num_train=10)
    assert m.name == "mnist" and m.train[0].shape == (10, 784)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("cifar",), {}, r"knows the datasets \['digits', 'mnist'\].*name='cifar'"),
        ((None,), {}, r"knows the datasets"),
        (("mnist",), {}, r"requires the MNIST \.npz.*path=.*--data-path"),
        (("digits",), dict(path="x.npz"), r"takes no path.*ship with scikit-learn.*Drop path="),
    ],
)
def test_load_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load(*args, **kwargs)
