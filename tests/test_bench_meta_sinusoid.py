"""benchmarks/meta_sinusoid.py runs at a tiny size and writes what it promises.

As in tests/test_benchmarks.py, nearly all of the time is XLA compiling, so the script runs
with `jax_disable_most_optimizations`.
"""

import importlib.util
import json
import math
import pathlib

import jax
import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


@pytest.fixture
def quick_compilation():
    """Compile with few optimisations while a script runs; restore the setting after."""
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, True)
    yield
    jax.config.update(name, previous)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meta_sinusoid_quick_runs_every_method_and_reports_speed_and_memory(tmp_path, quick_compilation):
    script = _load("meta_sinusoid")
    script.main(["--quick", "--out", str(tmp_path), "--assets", str(tmp_path)])
    result = json.loads((tmp_path / "sinusoid.json").read_text())
    assert list(result["methods"]) == list(script.METHODS)
    for name, method in result["methods"].items():
        curve = method["curve"]
        assert curve["iteration"][-1] == result["settings"]["iterations"], name
        for column in ("pre", "own", "sgd10"):
            for point in curve[column]:
                assert math.isfinite(point["mean"]) and point["mean"] > 0 and math.isfinite(point["ci95"]), name
        assert all(math.isfinite(x) for x in curve["train_loss"]), name
    assert result["speed"] and all(r["loop_seconds"] > 0 and r["vmap_seconds"] > 0 for r in result["speed"])
    # the vmapped call's mean gradient is the loop's (float32)
    assert all(r["max_rel_diff"] < 1e-4 for r in result["speed"])
    assert result["memory"] and all(r["temp_size_in_bytes"] > 0 for r in result["memory"])
    markdown = (tmp_path / "sinusoid.md").read_text()
    for section in ("table", "curve", "speed", "memory"):
        assert f"[start:{section}]" in markdown and f"[end:{section}]" in markdown, section
    assert markdown.count("\n| ") >= 1 + len(script.METHODS)
    assert (tmp_path / "meta_sinusoid.png").stat().st_size > 0
