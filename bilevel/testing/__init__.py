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
  hypernet can represent exactly;
- [`bilevel.testing.BilevelQuadratic`][]: the quadratic of benchopt's `benchmark_bilevel`,
  inner and outer losses that are means of per-sample quadratics (for stochastic methods),
  with its unique optimal λ;
- [`bilevel.testing.QuadraticTasks`][]: a batch of quadratic meta-learning tasks with MAML,
  first-order MAML, Meta-SGD and iMAML meta-gradients in closed form;
- [`bilevel.testing.QuadraticSchedule`][]: T steps of (momentum) gradient descent on a
  quadratic with per-step learning rates and momenta as hyperparameters, their exact
  hypergradient by a hand-written adjoint recursion;
- [`bilevel.testing.BayesianLinearRegression`][]: the evidence of Bayesian linear regression,
  its gradient in the prior and noise precisions, the optimal diagonal Gaussian q and its ELBO;
- [`bilevel.testing.KFoldRidge`][]: k-fold cross-validated ridge regression with its exact
  hypergradient.

Problems whose inner solution is defined by an optimality condition rather than by
`∇_w L_T = 0` (for implicit differentiation through proximal-gradient, projected-gradient,
KKT and fixed-point conditions) share [`bilevel.testing.AbstractConditionProblem`][]; each
knows its response and hypergradient in closed form on the support or active set of its
solution, which it stores:

- [`bilevel.testing.Lasso`][], [`bilevel.testing.ElasticNet`][]: a least-squares loss plus an
  ℓ1 (and ℓ2) penalty handled by a prox;
- [`bilevel.testing.BoxQP`][], [`bilevel.testing.NonnegativeLeastSquares`][],
  [`bilevel.testing.SimplexLeastSquares`][]: quadratics over a box, the nonnegative orthant
  and the probability simplex, handled by a projection;
- [`bilevel.testing.EqualityQP`][], [`bilevel.testing.InequalityQP`][]: quadratic programs
  whose parameters are the KKT triple `(w, ν, μ)`;
- [`bilevel.testing.Contraction`][]: the fixed point of an affine contraction.

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
from ._affine import AffineResponse as AffineResponse
from ._bench_quadratic import BilevelQuadratic as BilevelQuadratic
from ._exact import AbstractExactProblem as AbstractExactProblem
from ._bayes import BayesianLinearRegression as BayesianLinearRegression, KFoldRidge as KFoldRidge
from ._meta_tasks import QuadraticTasks as QuadraticTasks
from ._schedules import QuadraticSchedule as QuadraticSchedule
from ._quadratic004 import Quadratic004 as Quadratic004
from ._ridge import Ridge as Ridge, RidgePerCoordinate as RidgePerCoordinate
from ._unrolled import UnrolledQuadratic as UnrolledQuadratic
from ._common import AbstractConditionProblem as AbstractConditionProblem
from ._constrained import (
    BoxQP as BoxQP,
    EqualityQP as EqualityQP,
    InequalityQP as InequalityQP,
    NonnegativeLeastSquares as NonnegativeLeastSquares,
    SimplexLeastSquares as SimplexLeastSquares,
)
from ._fixed_point import Contraction as Contraction
from ._sparse import ElasticNet as ElasticNet, Lasso as Lasso
