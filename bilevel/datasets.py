"""Small classification datasets for examples and benchmarks, as train/validation/test splits.

- `digits()`: scikit-learn's bundled 8x8 handwritten digits (1797 images, 64 features, no
  download; needs the optional `demo` extra, `pip install 'bilevel[demo]'`).
- `mnist(path)`: MNIST read from an `.npz` file you give (keys `x_train`, `y_train`, `x_test`,
  `y_test`); nothing is downloaded.
- `load(name, path=None, **kwargs)`: either of the above by name, e.g. from a command line.
- `data_cleaning(...)`, `logreg_per_feature(...)`: benchopt `benchmark_bilevel`'s data
  cleaning and per-feature-ridge logistic regression on either dataset, as ready-made
  bilevel problems (`BenchProblem`) whose losses are means over rows.

Every split is a tuple `(X, y)` of numpy arrays, `X` float32 of shape `(n, features)` and `y`
int32 labels, and is a deterministic function of `seed`. The training split is the inner
problem's data, the validation split the outer problem's, and the test split is held out.

**Example:**

```python
import bilevel as bl

data = bl.datasets.load("digits", seed=0)
X_train, y_train = data.train
print(data)  # Dataset(name='digits', num_classes=10, train=(899, 64), val=(449, 64), ...)
```
"""

from __future__ import annotations

import numbers
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["BenchProblem", "Dataset", "data_cleaning", "digits", "load", "logreg_per_feature", "mnist"]

Split = tuple  # (X: float32 (n, features), y: int32 (n,))

_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NAMES = ("digits", "mnist")


class Dataset(NamedTuple):
    """A classification dataset split three ways (a `NamedTuple`: unpack it or use the fields).

    **Fields:**

    - `train`: `(X, y)` for the inner (training) loss.
    - `val`: `(X, y)` for the outer (validation) loss.
    - `test`: `(X, y)` held out from both, for reporting.
    - `num_classes`: the number of classes; labels are `0 .. num_classes - 1`.
    - `name`: the dataset's name, e.g. `"digits"`.

    In each `(X, y)`, `X` is a float32 numpy array of shape `(n, features)` and `y` an int32
    numpy array of shape `(n,)`. `repr(dataset)` shows the shapes, not the arrays.

    **Example:**

    ```python
    import numpy as np
    import bilevel as bl

    X = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 0, 1], np.int32)
    data = bl.datasets.Dataset(train=(X, y), val=(X, y), test=(X, y), num_classes=2, name="toy")
    (X_train, y_train), (X_val, y_val), _, num_classes, _ = data
    print(data)  # Dataset(name='toy', num_classes=2, train=(4, 2), val=(4, 2), test=(4, 2))
    ```
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{field}={tuple(np.shape(split[0]))}"
            for field, split in zip(("train", "val", "test"), self[:3])
        )
        return f"Dataset(name={self.name!r}, num_classes={self.num_classes}, {shapes})"


# ----------------------------------------------------------------------------- argument checks


def _check_fraction(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} requires `{name}` to be a number strictly between 0 and 1; got "
            f"{type(value).__name__} {value!r}. Pass e.g. {name}=0.25."
        )
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{where} requires 0 < {name} < 1 (the share of all examples in that split); got "
            f"{name}={value!r}. Pass e.g. {name}=0.25."
        )
    return float(value)


def _check_size(value, name: str, where: str, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "None (use all) or an int >= 1" if optional else "an int >= 1"
        raise TypeError(
            f"{where} requires `{name}` to be {allowed}; got {type(value).__name__} {value!r}. "
            f"Pass a whole number of examples, e.g. {name}=1000."
        )
    if value < 1:
        raise ValueError(
            f"{where} requires `{name}` >= 1 (a number of examples); got {name}={value}. "
            f"Pass a positive size, e.g. {name}=1000."
        )
    return int(value)


def _check_seed(seed, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{where} requires `seed` to be a non-negative int (it seeds "
            f"numpy.random.default_rng); got {type(seed).__name__} {seed!r}. Pass e.g. seed=0."
        )
    if seed < 0:
        raise ValueError(
            f"{where} requires `seed` >= 0 (it seeds numpy.random.default_rng); got "
            f"seed={seed}. Pass e.g. seed=0."
        )
    return int(seed)


def _check_bool(value, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{where} requires `{name}` to be True or False; got {type(value).__name__} {value!r}."
        )
    return bool(value)


# ----------------------------------------------------------------------------- helpers


def _standardize(train, *others):
    """Shift and scale every split by the training split's per-feature mean and std.

    Features constant on the training split (std 0) are only centred.
    """
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(((x - mean) / std).astype(np.float32) for x in (train,) + others)


def _dataset(xs, ys, num_classes: int, name: str, standardize: bool) -> Dataset:
    xs = _standardize(*xs) if standardize else tuple(x.astype(np.float32) for x in xs)
    splits = tuple((x, np.asarray(y, dtype=np.int32)) for x, y in zip(xs, ys))
    return Dataset(*splits, num_classes=num_classes, name=name)


# ----------------------------------------------------------------------------- digits


def digits(
    *,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, split into train / validation / test.

    The 1797 images (64 pixels each, 10 classes) ship with scikit-learn, so nothing is
    downloaded. A permutation from `numpy.random.default_rng(seed)` assigns
    `round(val_fraction * 1797)` images to validation, `round(test_fraction * 1797)` to test
    and the rest to training: with the defaults 899 / 449 / 449 (50% / 25% / 25%). Pixels
    (0-16) are scaled to [0, 1]; with `standardize=True` every feature is then shifted and
    scaled by the mean and standard deviation of the **training** split only (features that
    are constant there are only centred), so no validation or test statistics leak in.

    scikit-learn is an optional dependency: `pip install 'bilevel[demo]'` (or
    `pip install scikit-learn`).

    **Arguments:**

    - `val_fraction`: share of the images in the validation split, in (0, 1).
    - `test_fraction`: share in the test split, in (0, 1); `val_fraction + test_fraction < 1`.
    - `seed`: non-negative int seeding the split.
    - `standardize`: standardise features with training statistics (default) or keep [0, 1].

    **Returns:**

    A `bilevel.datasets.Dataset` with `num_classes=10` and `name="digits"`.

    **Example:**

    ```python
    import bilevel as bl

    data = bl.datasets.digits(val_fraction=0.2, test_fraction=0.2, seed=1)
    X, y = data.train
    print(X.shape, X.dtype, y.dtype, data.num_classes)  # (1079, 64) float32 int32 10
    ```
    """
    where = "bilevel.datasets.digits(val_fraction=..., test_fraction=..., seed=...)"
    val_fraction = _check_fraction(val_fraction, "val_fraction", where)
    test_fraction = _check_fraction(test_fraction, "test_fraction", where)
    seed = _check_seed(seed, where)
    standardize = _check_bool(standardize, "standardize", where)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"{where} requires val_fraction + test_fraction < 1 so that training data is left; "
            f"got {val_fraction} + {test_fraction} = {val_fraction + test_fraction}. Lower "
            "them, e.g. val_fraction=0.25, test_fraction=0.25."
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "bilevel.datasets.digits() needs scikit-learn, which ships the digits images, but "
            "it could not be imported. Install the optional extra with "
            "`pip install 'bilevel[demo]'` (or `pip install scikit-learn`)."
        ) from e
    raw = load_digits()
    X, y = raw.data / 16.0, raw.target
    n = len(X)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(
            f"{where}: with {n} images, val_fraction={val_fraction} and "
            f"test_fraction={test_fraction} give {n_val} validation, {n_test} test and "
            f"{n - n_val - n_test} training images; every split needs at least one. Use "
            "fractions between about 0.001 and 0.99 that leave room for training."
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = (perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test])
    return _dataset([X[i] for i in parts], [y[i] for i in parts], 10, "digits", standardize)


# ----------------------------------------------------------------------------- mnist


def _read_npz(path: Path, where: str) -> dict:
    """The four MNIST arrays from `path`, checked; raise FileNotFoundError / ValueError."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{where} found no file at {str(path)!r}. MNIST is not bundled with bilevel: pass "
            "the path of an .npz with keys x_train (n, 784) uint8, y_train (n,), x_test, "
            "y_test (on the command line: --data-path PATH). Make one from any MNIST copy "
            "(e.g. keras.datasets.mnist.load_data()) with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        )
    expected = ", ".join(_MNIST_KEYS)
    not_npz = f"Expected a file written by np.savez with keys {expected}."
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where} could not read {str(path)!r} as an .npz ({e}). {not_npz}") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{where}: {str(path)!r} holds a single array of shape {np.shape(f)}, not an .npz "
            f"archive. {not_npz}"
        )
    with f:
        found = sorted(f.files)
        missing = [k for k in _MNIST_KEYS if k not in found]
        if missing:
            raise ValueError(
                f"{where} expected an .npz with keys {expected}; {str(path)!r} has keys "
                f"{found} (missing {missing}). Re-save it with "
                "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
            )
        try:
            arrays = {k: f[k] for k in _MNIST_KEYS}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"{where} could not read the arrays in {str(path)!r} ({e}). {not_npz}"
            ) from e
    _check_mnist_arrays(arrays, path, where)
    return arrays


def _check_mnist_arrays(a: dict, path: Path, where: str) -> None:
    shapes = ", ".join(f"{k} {a[k].shape} {a[k].dtype}" for k in _MNIST_KEYS)
    fix = (
        f"Expected x_train (n, 784) and x_test (m, 784) with integer pixels 0-255 (uint8), and "
        f"y_train (n,), y_test (m,) with labels 0-9; {str(path)!r} has {shapes}."
    )
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        X, Y = a[x], a[y]
        if X.ndim < 2 or Y.ndim != 1 or len(X) != len(Y) or len(X) == 0:
            raise ValueError(f"{where}: {x} and {y} do not have matching shapes. {fix}")
        if not np.issubdtype(X.dtype, np.integer) or not np.issubdtype(Y.dtype, np.integer):
            raise ValueError(f"{where}: {x} and {y} must hold integers. {fix}")
        if X.dtype != np.uint8 and (X.min() < 0 or X.max() > 255):
            raise ValueError(f"{where}: {x} has pixels outside 0-255. {fix}")
        if Y.min() < 0 or Y.max() > 9:
            raise ValueError(f"{where}: {y} has labels outside 0-9. {fix}")
    if a["x_train"][0].size != a["x_test"][0].size:
        raise ValueError(f"{where}: x_train and x_test have different numbers of pixels. {fix}")


def _take(X, idx) -> np.ndarray:
    """Rows `idx` of uint8 pixels, flattened and scaled to [0, 1] as float32."""
    return (X[idx].reshape(len(idx), -1) / np.float32(255.0)).astype(np.float32)


def mnist(
    path: str | os.PathLike,
    *,
    num_train: int | None = None,
    num_val: int = 10_000,
    num_test: int | None = None,
    seed: int = 0,
    standardize: bool = False,
) -> Dataset:
    """MNIST from an `.npz` file, split into train / validation / test.

    The file must hold `x_train` (n, 784) and `x_test` (m, 784) uint8 pixels 0-255 (shape
    (n, 28, 28) is flattened) and labels `y_train` (n,), `y_test` (m,) in 0-9; nothing is
    downloaded. A permutation of `x_train` from `numpy.random.default_rng(seed)` gives its
    first `num_val` images to validation and the next `num_train` (default: all the rest) to
    training: 50000 / 10000 from the usual 60000. The test split is `x_test`, all of it in file
    order by default, or `num_test` images drawn at random. Pixels are scaled to [0, 1];
    `standardize=True` then standardises features with training-split statistics (constant
    pixels, like the border, are only centred).

    **Arguments:**

    - `path`: the `.npz` file (str or path-like). On the command line: `--data-path`.
    - `num_train`: training images, an int >= 1, or None for all not used for validation.
    - `num_val`: validation images carved from `x_train`, an int >= 1.
    - `num_test`: test images, an int >= 1, or None for all of `x_test`.
    - `seed`: non-negative int seeding the split and subsampling.
    - `standardize`: standardise features with training statistics; default False ([0, 1]).

    **Returns:**

    A `bilevel.datasets.Dataset` with `num_classes=10` and `name="mnist"`.

    **Example:**

    ```python
    import os, tempfile
    import numpy as np
    import bilevel as bl

    # A tiny stand-in file in the MNIST format (pass the real file's path instead).
    rng = np.random.default_rng(0)
    path = os.path.join(tempfile.mkdtemp(), "mnist.npz")
    np.savez(path,
             x_train=rng.integers(0, 256, (100, 784), dtype=np.uint8),
             y_train=rng.integers(0, 10, 100, dtype=np.uint8),
             x_test=rng.integers(0, 256, (20, 784), dtype=np.uint8),
             y_test=rng.integers(0, 10, 20, dtype=np.uint8))
    data = bl.datasets.mnist(path, num_train=60, num_val=30, num_test=10)
    X_train, y_train = data.train
    print(X_train.shape, data.val[0].shape, data.test[0].shape)  # (60, 784) (30, 784) (10, 784)
    ```
    """
    where = "bilevel.datasets.mnist(path, num_train=..., num_val=..., num_test=..., seed=...)"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{where} requires `path` to be a str or os.PathLike naming an .npz file; got "
            f"{type(path).__name__} {path!r}. Pass e.g. path='data/mnist.npz'."
        )
    num_train = _check_size(num_train, "num_train", where, optional=True)
    num_val = _check_size(num_val, "num_val", where, optional=False)
    num_test = _check_size(num_test, "num_test", where, optional=True)
    seed = _check_seed(seed, where)
    standardize = _check_bool(standardize, "standardize", where)
    a = _read_npz(Path(path), where)
    n, m = len(a["x_train"]), len(a["x_test"])
    wanted = num_val + (1 if num_train is None else num_train)
    if wanted > n:
        asked = f"num_val={num_val} + num_train={num_train}" if num_train else f"num_val={num_val}"
        raise ValueError(
            f"{where}: x_train holds {n} images, too few for {asked} (the training split "
            f"needs at least one image too). Ask for fewer, e.g. num_val={max(1, n // 6)}, "
            f"num_train={max(1, n - max(1, n // 6))}."
        )
    if num_test is not None and num_test > m:
        raise ValueError(
            f"{where}: x_test holds {m} images, fewer than num_test={num_test}. Ask for "
            f"num_test <= {m}, or None for all of them."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    val_idx = perm[:num_val]
    train_idx = perm[num_val:] if num_train is None else perm[num_val:num_val + num_train]
    test_idx = np.arange(m) if num_test is None else rng.permutation(m)[:num_test]
    xs = [_take(a["x_train"], i) for i in (train_idx, val_idx)] + [_take(a["x_test"], test_idx)]
    ys = [a["y_train"][train_idx], a["y_train"][val_idx], a["y_test"][test_idx]]
    return _dataset(xs, ys, 10, "mnist", standardize)


# ----------------------------------------------------------------------------- by name


def load(name: str, path: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """A dataset by name: `"digits"` (bundled with scikit-learn) or `"mnist"` (from `path`).

    Meant for command lines and benchmark scripts that take `--dataset NAME --data-path PATH`.

    **Arguments:**

    - `name`: `"digits"` or `"mnist"`.
    - `path`: the `.npz` file for `"mnist"` (required there); `"digits"` takes no path.
    - `**kwargs`: passed on to `bilevel.datasets.digits` or `bilevel.datasets.mnist`
      (`seed`, `standardize`, split sizes).

    **Returns:**

    A `bilevel.datasets.Dataset`.

    **Example:**

    ```python
    import bilevel as bl

    data = bl.datasets.load("digits", seed=3, standardize=False)
    print(data.name, data.train[0].min(), data.train[0].max())  # digits 0.0 1.0
    ```
    """
    if not isinstance(name, str) or name not in _NAMES:
        raise ValueError(
            f"bilevel.datasets.load(name, ...) knows the datasets {list(_NAMES)}; got "
            f"name={name!r}. Pass one of those names."
        )
    if name == "digits":
        if path is not None:
            raise ValueError(
                "bilevel.datasets.load('digits', ...) takes no path: the digits ship with "
                f"scikit-learn; got path={path!r}. Drop path= (and --data-path), or use "
                "name='mnist' to read an .npz file."
            )
        return digits(**kwargs)
    if path is None:
        raise ValueError(
            "bilevel.datasets.load('mnist', ...) requires the MNIST .npz file: MNIST is not "
            "bundled with bilevel. Pass path='.../mnist.npz' (on the command line: "
            "--data-path PATH); see bilevel.datasets.mnist for the expected format."
        )
    return mnist(path, **kwargs)


# At the end: bilevel._bench_problems imports this module (lazily, inside its functions).
from ._bench_problems import (
    BenchProblem as BenchProblem,
    data_cleaning as data_cleaning,
    logreg_per_feature as logreg_per_feature,
)
