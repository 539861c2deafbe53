"""The reproduction scripts in benchmarks/ run (at a tiny size) and write what they promise.

At these sizes nearly all of the time is XLA compiling the scripts' programs, most of it in
LLVM's backend optimisation, so the scripts run with `jax_disable_most_optimizations` (as
tests/test_docs_pages.py runs the documentation pages): the same programs, compiled with
fewer backend optimisations, which roughly halves the time.
"""

import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
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


def test_seed004_table1_runs_and_writes_json_and_markdown(tmp_path, quick_compilation):
    script = _load("seed004_table1")
    script.main(["--problems", "3", "--steps", "3000", "--eta", "1e-2", "1e-3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "seed004_table1.json").read_text())
    assert list(result["methods"]) == ["Unroll1", "Unroll5", "Unroll10", "Clip2", "Clip5"]
    assert result["runs"] == 15 and result["run_seconds"] > 0
    markdown = (tmp_path / "seed004_table1.md").read_text()
    assert markdown.count("\n| ") == 6  # header + 5 methods
    # at η = 1e-2 for 3000 steps Clip5 has converged to the closed-form λ† (the bound is loose)
    assert result["methods"]["Clip5"]["phase2"]["lam_err"] < 1e-3
    # the first-order fixed point is computed from the closed form and is not λ†
    assert np.isfinite(result["first_order_fixed_point_err"]) and result["first_order_fixed_point_err"] > 1e-3


def test_hypernet_figures_run_and_write_figures_table_and_json(tmp_path, quick_compilation):
    """Tiny run of all three figures on digits; the curves must be the hypernets' real fits."""
    script = _load("hypernet_figures")
    result = script.main(["--grid", "5", "--cv-steps", "200", "--hypernet-steps", "300", "--width", "16",
                          "--budget", "1", "--max-outer-steps", "4", "--chunk", "2", "--inner-steps", "10",
                          "--eval-steps", "50", "--out", str(tmp_path)])
    for name in ("fig1_digits.png", "fig5_digits.png", "fig6_digits.png", "fig6_digits.md",
                 "hypernet_figures_digits.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "fig6_digits.md").read_text()
    assert table.count("\n| ") == 5  # start + 4 methods below the header
    fig = result["figures_1_5"]
    assert len(fig["cv"]["val"]) == 5 and fig["global"]["seconds"] > 0
    # a linear hypernet fitted at λ̂ is right within its distribution's mass, wrong far away
    local = fig["local"]
    assert local["max_abs_gap_within_2_sigma"]["val"] < local["max_abs_gap_to_cv"]["val"]
    assert result["figure_6"]["n_hparams"] == 650
    assert set(result["figure_6"]["methods"]) == {"hypernet (local, linear)", "unroll", "implicit (neumann)",
                                                  "random search"}


def test_stochastic_benchmark_quick_runs_every_method_and_answers_the_goal(tmp_path, quick_compilation):
    """Tiny data cleaning run of benchmarks/stochastic.py: every method, finite curves, the goal line."""
    script = _load("stochastic")
    summary = script.main(["--quick", "--problems", "data_cleaning", "--out", str(tmp_path),
                           "--assets", str(tmp_path)])
    result = json.loads((tmp_path / "data_cleaning.json").read_text())
    assert set(result["methods"]) == set(script.METHODS)
    for name, method in result["methods"].items():
        run = method["runs"][method["best"]]
        assert np.all(np.isfinite(run["median"])) and np.all(np.isfinite(run["time"])), name
        assert run["oracle_calls"][-1] >= result["settings"]["budget"] and run["time"][-1] > 0, name
        assert 0.0 <= run["final_median"] <= 1.0, name
    assert result["methods"]["random_search"]["check"]["agree"]
    goal = result["goal"]
    assert goal["verdict_first_reach"] in (True, False) and goal["verdict_stays"] in (True, False)
    assert goal["statement"].startswith("Target:") and np.isfinite(goal["target"])
    assert summary["goal"]["best"] in script.STOCHASTIC
    assert (tmp_path / "stochastic_data_cleaning.png").stat().st_size > 0
    markdown = (tmp_path / "data_cleaning.md").read_text()
    assert markdown.count("\n| ") == 1 + len(script.METHODS) and "**Goal:**" in markdown  # header + rows
    assert "## Goal" in (tmp_path / "summary.md").read_text()


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
