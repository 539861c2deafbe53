"""Several JAX processes on localhost (jax.distributed + gloo CPU collectives).

Every multi-process result is compared with the same function called plainly in this one
process, on one device, without any mesh: the hypergradient `bilevel` computes must not depend
on how its batches or its population are split across processes. Tolerance 1e-6 (float64) on
value, hypergradient, inner parameters and CG's residual; CG's iteration counts are equal.
The runs actually differ only in the order of floating-point sums (~1e-16).

The fast tests take 30-60 s on 2 busy cores (mostly process start-up and compilation; the
2-process test itself 20-30 s); the 4-process and 2 × 2-device runs are marked slow.
"""

from __future__ import annotations

import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel._multiprocess import (
    cpu_collectives_available,
    combine_population,
    demo_data,
    demo_hypergrad,
    differences,
    launch_local,
    main,
)

pytestmark = pytest.mark.skipif(
    not cpu_collectives_available(),
    reason="this jaxlib has no gloo CPU collectives, so CPU processes cannot combine results",
)

TOL = 1e-6
SEED = 0


@pytest.fixture(scope="module")
def single():
    """The independent single-process computation: plain jit and vmap on one device."""
    data = demo_data(SEED)
    device = jax.devices()[0]
    put = lambda tree: jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree), device)
    hg = demo_hypergrad()
    one = jax.jit(hg)(*put((data["log_lam"], data["w0"], data["train"], data["val"])))
    many = jax.jit(jax.vmap(hg, in_axes=(0, None, None, None)))(
        *put((data["population"], data["w0"], data["train"], data["val"])))
    assert one.grad.dtype == jnp.float64
    # CG needs 11 to 16 iterations across the population: the counts compared below tell members apart.
    assert len(np.unique(many.stats["solve_iterations"])) > 3
    return one, many


def _assert_equal_to(got: dict, want, where: str):
    """got: a launched result dict; want: a HypergradResult from this process."""
    np.testing.assert_allclose(got["value"], want.value, rtol=TOL, atol=0, err_msg=f"{where}: value")
    np.testing.assert_allclose(got["grad"], want.grad, rtol=TOL, atol=TOL * 1e-3, err_msg=f"{where}: grad")
    np.testing.assert_allclose(got["params"], want.params, rtol=TOL, atol=TOL * 1e-3, err_msg=f"{where}: params")
    np.testing.assert_array_equal(got["solve_iterations"], want.stats["solve_iterations"],
                                  err_msg=f"{where}: CG iterations")
    # CG's relative residual is ~1e-16 in both runs (tol 1e-10): compare it absolutely.
    np.testing.assert_allclose(got["solve_residual"], want.stats["solve_residual"], rtol=0, atol=TOL,
                               err_msg=f"{where}: CG residual")
    assert np.all(np.asarray(got["solve_residual"]) <= 1e-10), where
    np.testing.assert_allclose(got["inner_grad_norm"], want.stats["inner_grad_norm"], rtol=TOL, atol=1e-12,
                               err_msg=f"{where}: inner gradient norm")


def _check_run(results, single, processes: int, devices: int):
    one, many = single
    assert len(results) == processes
    for i, r in enumerate(results):
        dp = r["data_parallel"]
        # Each process held only its own rows, and the program combined shards by all-reduce:
        # the agreement below is a data-parallel solve, not a replicated one.
        assert dp["local_rows"] == 96 // processes, i
        assert "all-reduce" in dp["collectives"], (i, dp["collectives"])
        _assert_equal_to(dp, one, f"data parallel, process {i}")
        pop = r["population"]
        per_process = 8 // processes
        np.testing.assert_array_equal(pop["members"], np.arange(i * per_process, (i + 1) * per_process))
        mine = jax.tree_util.tree_map(lambda x, rows=pop["members"]: x[rows], many)
        _assert_equal_to(pop, mine, f"population, process {i}")
    _assert_equal_to(combine_population([r["population"] for r in results]), many, "population, combined")
    _assert_equal_to(combine_population([r["population_shard_map"] for r in results]), many, "shard_map pop.")
    assert all(r["population_shard_map"]["collectives"] == [] for r in results)    # no communication


def test_two_processes_equal_one(single):
    results = launch_local("bilevel._multiprocess:demo", 2, args=(SEED, 96, 16, 0), timeout=240)
    _check_run(results, single, 2, 1)


def test_differences_and_combine_population():
    base = {"value": np.array([1.0, 2.0]), "grad": np.zeros((2, 3)), "params": np.ones((2, 3)),
            "solve_iterations": np.array([4, 5]), "solve_residual": np.array([1e-12, 2e-12]),
            "inner_grad_norm": np.array([1e-7, 1e-7]), "members": np.array([2, 3]), "run_seconds": 1.0}
    moved = {**base, "grad": base["grad"] + np.array([0.0, 3e-6, 0.0]), "members": np.array([0, 1]),
             "solve_iterations": np.array([6, 5]), "run_seconds": 2.0}
    diff = differences(moved, base)
    assert diff["grad"] == pytest.approx(3e-6) and diff["solve_iterations"] == 2.0 and diff["value"] == 0.0
    whole = combine_population([base, moved])         # process 0 held members 2, 3
    np.testing.assert_array_equal(whole["members"], [0, 1, 2, 3])
    np.testing.assert_array_equal(whole["solve_iterations"], [6, 5, 4, 5])
    assert whole["run_seconds"] == 2.0


def test_command_one_process(capsys):
    # The printing and exit status of `bilevel multiprocess`, whose reference (one process, no
    # mesh) must match a launched process; processes=1 keeps it cheap (the 2-process equality
    # is tested above).
    assert main(["--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK: largest difference" in out
    assert re.search(r"each process held 96 of 96 training rows", out)


def test_launch_reports_a_failing_process():
    # population(split="pmap") raises inside the launched process.
    with pytest.raises(RuntimeError, match=r"process 0 of 1 .*exited with status(.|\n)*split='jit' or 'shard_map'"):
        launch_local("bilevel._multiprocess:population", 1, args=(SEED, 96, 16, "pmap"), timeout=120)


def test_launch_stops_a_process_past_its_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish within timeout=3 s"):
        launch_local("time:sleep", 1, args=(120,), timeout=3)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": "bilevel._multiprocess.demo", "processes": 2}, ValueError, "'package.module:function'"),
        ({"target": lambda: 0, "processes": 2}, ValueError, "not a lambda"),
        ({"target": 3, "processes": 2}, TypeError, "function or a 'module:function'"),
        ({"target": "bilevel._multiprocess:demo", "processes": 0}, ValueError, "processes >= 1; got 0"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2.0}, TypeError, "processes as a positive int"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2, "devices_per_process": True}, TypeError,
         "devices_per_process as a positive int"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2, "timeout": -1}, ValueError, "timeout"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2, "timeout": float("nan")}, ValueError, "timeout"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2, "args": 0}, TypeError, "args as a tuple"),
        ({"target": "bilevel._multiprocess:demo", "processes": 2, "x64": 1}, TypeError, "x64 as a bool"),
    ],
)
def test_launch_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        launch_local(**kwargs)


@pytest.mark.parametrize("argv", [["--processes", "0"], ["--processes", "3"],
                                  ["--processes", "2", "--devices-per-process", "3"], ["--timeout", "0"],
                                  ["--processes", "4", "--rows", "90"], ["--dim", "0"]])
def test_command_checks_its_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "bilevel multiprocess: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_four_processes_equal_one(single):
    results = launch_local("bilevel._multiprocess:demo", 4, args=(SEED, 96, 16, 0), timeout=480)
    _check_run(results, single, 4, 1)


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one(single):
    results = launch_local("bilevel._multiprocess:demo", 2, args=(SEED, 96, 16, 0), devices_per_process=2, timeout=480)
    one, many = single
    for i, r in enumerate(results):
        assert r["data_parallel"]["local_rows"] == 48
        _assert_equal_to(r["data_parallel"], one, f"data parallel, process {i}")
        np.testing.assert_array_equal(r["population"]["members"], np.arange(4 * i, 4 * i + 4))
    _assert_equal_to(combine_population([r["population"] for r in results]), many, "population, combined")
    _assert_equal_to(combine_population([r["population_shard_map"] for r in results]), many, "shard_map pop.")
    assert all(r["population_shard_map"]["collectives"] == [] for r in results)    # no communication


@pytest.mark.slow
def test_launch_refuses_to_return_an_array_split_across_processes():
    with pytest.raises(RuntimeError, match="split across processes"):
        launch_local(f"{__name__}:split_array", 2, timeout=240)


def split_array():
    """A launched target returning a global array that no process holds whole."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("x",))
    return jax.make_array_from_callback((4,), NamedSharding(mesh, P("x")), lambda idx: np.arange(4.0)[idx])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
