"""Test configuration: float64 on, and hypothesis profiles.

x64 is enabled for the whole test session so that exactness tests can compare against closed
forms at 1e-9; float32 tests build float32 arrays explicitly.

Hypothesis profiles: `ci` (default, a meaningful but bounded number of examples) and `thorough`
(select with HYPOTHESIS_PROFILE=thorough for long local runs).
"""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU's newer fusion emitters cost far more compile time than the older loop emitters on the
# suite's thousands of tiny programs (a documentation page: 26-29 s -> 18 s; `bilevel check`'s
# backend compile 14.4 s -> 5.8 s); the HLO, and so fusion and memory planning, are unchanged.
# XLA aborts on a flag it does not know, so it is set only for the jaxlib it was measured on.
from importlib.metadata import version as _version  # noqa: E402

if _version("jaxlib").startswith("0.10.") and "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def quick_compilation():
    """Compile with XLA's optimisations mostly off (`jax_disable_most_optimizations`).

    For modules whose time is compilation of many small programs: the same programs, with
    fewer backend passes (fusion, algebraic simplification), roughly halve in compile time
    and stay far inside float64 tolerances. A module opts in with
    `pytestmark = pytest.mark.usefixtures("quick_compilation")`.
    """
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, True)
    yield
    jax.config.update(name, previous)


@pytest.fixture
def full_optimization():
    """Undo `quick_compilation` for one test: one that reads what the compiler made of a
    program (its memory use), which should be the default pipeline's."""
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, False)
    yield
    jax.config.update(name, previous)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compilation caches after each test module.

    Every compiled XLA:CPU program keeps its machine code in memory mappings of its own until
    it is freed, and JAX's caches keep every program a jitted function ever compiled. Over the
    whole suite (thousands of programs) one process passes Linux's default limit of 65,530
    mappings per process (`vm.max_map_count`), and the next compilation dies with a
    segmentation fault. Programs a module still holds (module-level compiled objects) stay.
    """
    yield
    jax.clear_caches()
    gc.collect()
