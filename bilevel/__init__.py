"""bilevel: composable, compiler-style hypergradients for JAX."""

from ._problem import PerStep as PerStep, Problem as Problem, per_step as per_step

__version__ = "0.1.0"
