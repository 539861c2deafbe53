"""benchmarks/approximations.py (the lecture's table of approximations, measured) at --quick size.

The script is run once; its hypergradients are then checked against closed forms computed
here: the exact rows (implicit with exact / CG / GMRES / Gauss-Newton on ridge, whose forward
solve converges; unroll and forward mode against the T-step unrolled value and DrMAD against
its own closed form on UnrolledQuadratic) to 1e-8, and every approximate row against the
formula of the approximation it implements where the script knows one. Nothing is compared
with numbers from an earlier run.
"""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("approximations", BENCHMARKS / "approximations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory, quick_compilation):
    script = _load()
    out = tmp_path_factory.mktemp("approximations")
    result = script.main(["--quick", "--repeats", "1", "--out", str(out)])
    return script, result, out


def _rel(g, want):
    g, want = np.atleast_1d(np.asarray(g, np.float64)), np.atleast_1d(np.asarray(want, np.float64))
    return np.linalg.norm(g - want) / np.linalg.norm(want)


def _ridge_ift_numpy(exact):
    """dL_V/dλ_i = −e^{λ_i} w*_i (H⁻¹ ∂L_V/∂w)_i by a NumPy dense solve."""
    X, y, Xv, yv = (np.asarray(a, np.float64) for a in (exact.X, exact.y, exact.Xv, exact.yv))
    rho = np.exp(np.asarray(exact.hparams, np.float64))
    H = X.T @ X / X.shape[0] + np.diag(rho)
    w = np.linalg.solve(H, X.T @ y / X.shape[0])
    g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    return -rho * w * np.linalg.solve(H, g)


def test_writes_json_and_a_markdown_row_per_approximation(run):
    _script, result, out = run
    saved = json.loads((out / "approximations.json").read_text())
    assert saved["dtype"] == "float64" and saved["quick"] and set(saved["problems"]) == {"ridge", "unrolled"}
    markdown = (out / "approximations.md").read_text()
    keys = list(result["problems"]["ridge"]["rows"])
    assert keys == list(result["problems"]["unrolled"]["rows"])
    assert len(keys) == 17
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(keys)   # header + one row per approximation


def test_exact_rows_match_the_closed_forms(run):
    script, result, _ = run
    ridge = script.ridge_problem(script.QUICK)["exact"]
    want = _ridge_ift_numpy(ridge)
    rows = result["problems"]["ridge"]["rows"]
    for key in ("exact_ift", "bengio", "cg", "gmres", "larsen", "unroll", "forward_mode"):
        assert _rel(rows[key]["grad"], want) < 1e-8, (key, rows[key]["grad"], want)

    uq = script.unrolled_problem(script.QUICK)["exact"]
    rows = result["problems"]["unrolled"]["rows"]
    assert _rel(rows["exact_ift"]["grad"], uq.hypergrad(uq.hparams)) < 1e-8
    for key in ("unroll", "forward_mode"):
        assert _rel(rows[key]["grad"], uq.unrolled_hypergrad(uq.hparams)) < 1e-8, key
    assert _rel(rows["drmad"]["grad"], uq.drmad_hypergrad(uq.hparams)) < 1e-8


def test_approximate_rows_follow_their_own_formulas_and_differ_from_the_ift(run):
    _, result, _ = run
    for name, problem in result["problems"].items():
        for key, row in problem["rows"].items():
            if "grad" not in row:
                continue
            assert all(math.isfinite(x) for x in row["grad"]), (name, key)
            assert math.isfinite(row["error_ift"]) and row["cost_ratio"] > 0, (name, key)
            if row["error_target"] is not None and key != "per_term":
                assert row["error_target"] < 1e-8, (name, key, row["error_target"])
        rows = problem["rows"]
        # The approximations are visible: H⁻¹ ≈ I, a few Neumann terms, truncation, clipping.
        for key in ("identity", "neumann", "truncate", "clip", "cg_few"):
            assert rows[key]["error_ift"] > 1e-3, (name, key)
        assert rows["clip"]["clip_fraction"] > 0, name
    # The unrolled problem stops short of w*: the T-step and IFT values differ.
    assert result["problems"]["unrolled"]["rows"]["unroll"]["error_ift"] > 1e-3
    # The stochastic Neumann draw is an estimate of the full-batch series, not equal to it.
    per_term = result["problems"]["ridge"]["rows"]["per_term"]
    assert 0 < per_term["single_draw_error_target"] and math.isfinite(per_term["error_target"])


def test_rows_without_a_measurement_say_why(run):
    _, result, _ = run
    for problem in result["problems"].values():
        rows = problem["rows"]
        assert rows["first_order"]["status"].startswith("refused") and "first_order" in rows["first_order"]["message"]
        assert rows["bayes_opt"]["status"] == "not implemented"
    assert result["problems"]["unrolled"]["rows"]["per_term"]["status"].startswith("n/a")
