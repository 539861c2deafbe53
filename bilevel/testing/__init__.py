"""Exact bilevel problems for testing hypergradient methods.

Each problem knows its response `w*(λ)`, validation value, inner Hessian, exact (IFT)
hypergradient and the `H⁻¹ ≈ I` approximation in closed form, computed without autodiff of
the losses, so a method can be checked against it at float64 precision:

- [`bilevel.testing.Ridge`][]: ridge regression with one log-penalty;
- [`bilevel.testing.RidgePerCoordinate`][]: one log-penalty per coordinate;
- [`bilevel.testing.Quadratic004`][]: the quadratic of *Online Hyper-parameter Optimization* §4.1 with its analytic λ†;
- [`bilevel.testing.UnrolledQuadratic`][]: T gradient-descent steps on a quadratic, with the
  unrolled hypergradient known exactly;
- [`bilevel.testing.AffineResponse`][]: a best response affine in λ, which a linear
  hypernet can represent exactly.

[`bilevel.testing.hypergrad_error`][] and [`bilevel.testing.assert_hypergrad_close`][] compare
any method's hypergradient with the exact one.

Hypothesis strategies drawing them at random within a conditioning bound live in
`bilevel.testing.strategies` (which needs `hypothesis`; this module does not).

**Example:**

```python
import bilevel as bl
import bilevel.testing as blt

exact = blt.Ridge.sample(0, dim=3)
problem: bl.Problem = exact.problem
g = exact.hypergrad(exact.hparams)
```
"""

from ._check import (
    assert_hypergrad_close as assert_hypergrad_close,
    Comparison as Comparison,
    hypergrad_error as hypergrad_error,
)
from ._problems import (
    AbstractExactProblem as AbstractExactProblem,
    AffineResponse as AffineResponse,
    Quadratic004 as Quadratic004,
    Ridge as Ridge,
    RidgePerCoordinate as RidgePerCoordinate,
    UnrolledQuadratic as UnrolledQuadratic,
)
