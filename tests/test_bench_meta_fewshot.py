"""benchmarks/meta_fewshot.py runs at a tiny size (--quick) on MNIST and writes what it promises.

Skipped when the MNIST file (../shared/data/mnist.npz from the repository root) is absent. The
time is XLA compiling the script's programs, so it runs with `jax_disable_most_optimizations`
(the `quick_compilation` fixture), as tests/test_benchmarks.py runs the other scripts.
"""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"

pytestmark = [pytest.mark.usefixtures("quick_compilation"),
              pytest.mark.skipif(not MNIST.exists(), reason=f"MNIST file {MNIST} not present")]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_method_and_shot_setting(tmp_path):
    script = _load("meta_fewshot")
    script.main(["--quick", "--mnist", str(MNIST), "--out", str(tmp_path / "out"),
                 "--assets", str(tmp_path / "assets")])
    assert (tmp_path / "assets" / "meta_fewshot.png").stat().st_size > 0
    doc = json.loads((tmp_path / "out" / "fewshot.json").read_text())
    assert set(doc["results"]) == {"1-shot", "5-shot"}
    for shots, res in doc["results"].items():
        assert set(res) == {"baseline", *script.METHODS}, shots
        for name, r in res.items():
            assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["ci95"]) and r["ci95"] >= 0, (shots, name)
            for point in r.get("curve", []):
                assert 0.0 <= point["accuracy"] <= 1.0
            assert np.all(np.isfinite(r.get("meta_loss", [])))
        assert len(res["maml"]["curve"]) == 3          # --quick: 4 meta-iterations, evaluated at 0, 2, 4
    table = (tmp_path / "out" / "fewshot.md").read_text()
    assert table.count("\n| ") == 6          # header, baseline, 3 methods, iMAML's inner run from scratch
    for name in ("MAML", "first-order MAML", "iMAML", "no meta-learning (5 SGD steps from the random init)"):
        assert f"| {name} |" in table


def test_tasks_are_five_distinct_classes_of_distinct_images_with_the_rotation_applied():
    import jax
    import jax.numpy as jnp

    script = _load("meta_fewshot")
    # image i of base b carries b + 1 in pixel 0 and i + 1 in pixel 1; a half turn moves them to 783, 782
    tags = np.zeros((3, 40, 784), np.uint8)
    tags[:, :, 0], tags[:, :, 1] = np.arange(1, 4)[:, None], np.arange(1, 41)[None, :]
    classes = [(b, 0) for b in range(3)] + [(b, 2) for b in range(3)]
    pool = script.Pool(jnp.asarray(tags), jnp.asarray(classes, jnp.int32))
    u = script.uniforms(jax.random.key(0), (8,), pool, 5)
    (xs, ys), (xq, yq) = script.sample_tasks(u, pool, jnp.asarray(script.rotations()), 5)
    assert xs.shape == (8, 25, 784) and xq.shape == (8, 75, 784) and ys.dtype == jnp.int32
    for t in range(8):
        x = np.rint(np.concatenate([xs[t], xq[t]]) * 255).astype(int)
        y = np.concatenate([ys[t], yq[t]])
        half = x[:, 0] == 0
        base = np.where(half, x[:, 783], x[:, 0])
        index = np.where(half, x[:, 782], x[:, 1])
        assert np.all(base > 0) and np.all(index > 0)
        found = {(int(base[y == c][0]), bool(half[y == c][0])) for c in range(5)}
        assert len(found) == 5                                    # five different classes
        for c in range(5):
            rows = y == c
            assert rows.sum() == 20 and len(set(zip(base[rows], half[rows]))) == 1
            assert len(set(index[rows])) == 20                    # no image twice in a task
