"""bilevel: composable, compiler-style hypergradients for JAX.

Declare a bilevel problem as two losses, pick a method (how the inner parameters are found
and how they are differentiated), and compile the pair into plain JAX functions:

    problem = bl.Problem(inner=train_loss, outer=val_loss)
    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=500), bl.cg(maxiter=50, tol=1e-10))
    hg = jax.jit(bl.hypergrad(problem, method))
"""

from . import datasets as datasets
from ._base import AbstractMethod as AbstractMethod
from ._best_response import BestResponse as BestResponse, best_response as best_response
from ._hypernets import (
    LinearHypernet as LinearHypernet,
    MLPHypernet as MLPHypernet,
    linear_hypernet as linear_hypernet,
    mlp_hypernet as mlp_hypernet,
)
from ._hypertrain import (
    Gaussian as Gaussian,
    Hypertrain as Hypertrain,
    HypertrainGlobal as HypertrainGlobal,
    HypertrainInfo as HypertrainInfo,
    HypertrainState as HypertrainState,
    HypernetState as HypernetState,
    gaussian as gaussian,
    hypertrain_global as hypertrain_global,
    hypertrain_local as hypertrain_local,
    hypertrain_simplified as hypertrain_simplified,
)
from ._compile import (
    HypergradResult as HypergradResult,
    hypergrad as hypergrad,
    response as response,
)
from ._curvature import GaussNewton as GaussNewton, gauss_newton as gauss_newton
from ._drmad import DrMAD as DrMAD, drmad as drmad
from ._mixflow import MixFlow as MixFlow, mixflow as mixflow
from ._hvp import FiniteDifference as FiniteDifference, finite_difference as finite_difference
from ._precision import Precision as Precision, precision as precision
from ._multiprocess import cpu_collectives_available as cpu_collectives_available, launch_local as launch_local
from ._forward import ForwardMode as ForwardMode, forward_mode as forward_mode
from ._first_order import (
    BOME as BOME,
    BOMEInfo as BOMEInfo,
    BOMEState as BOMEState,
    F2SA as F2SA,
    F2SAInfo as F2SAInfo,
    F2SAState as F2SAState,
    bome as bome,
    f2sa as f2sa,
)
from ._implicit import (
    Implicit as Implicit,
    Solver as Solver,
    implicit as implicit,
    solver as solver,
)
from ._linear_solvers import (
    BiCGStab as BiCGStab,
    CG as CG,
    NormalCG as NormalCG,
    GMRES as GMRES,
    AbstractLinearSolver as AbstractLinearSolver,
    Exact as Exact,
    Identity as Identity,
    Neumann as Neumann,
    bicgstab as bicgstab,
    cg as cg,
    exact as exact,
    gmres as gmres,
    identity as identity,
    neumann as neumann,
    normal_cg as normal_cg,
)
from ._optimality import (
    AbstractCondition as AbstractCondition,
    AbstractProx as AbstractProx,
    FixedPoint as FixedPoint,
    KKT as KKT,
    ProxFixedPoint as ProxFixedPoint,
    Stationary as Stationary,
    fixed_point as fixed_point,
    kkt as kkt,
    projected_fixed_point as projected_fixed_point,
    projection as projection,
    projection_box as projection_box,
    projection_l2_ball as projection_l2_ball,
    projection_nonneg as projection_nonneg,
    projection_simplex as projection_simplex,
    prox as prox,
    prox_elastic_net as prox_elastic_net,
    prox_fixed_point as prox_fixed_point,
    prox_group_l1 as prox_group_l1,
    prox_l1 as prox_l1,
    stationary as stationary,
)
from ._proximal import (
    ProximalGradient as ProximalGradient,
    projected_gradient as projected_gradient,
    proximal_gradient as proximal_gradient,
)
from ._online import Online as Online, OnlineInfo as OnlineInfo, OnlineState as OnlineState, online as online
from ._optimize import (
    History as History,
    HyperOpt as HyperOpt,
    OptimizeError as OptimizeError,
    OptimizeWarning as OptimizeWarning,
    HyperOptInfo as HyperOptInfo,
    HyperOptState as HyperOptState,
    OptimizeResult as OptimizeResult,
    hyperopt as hyperopt,
    optimize as optimize,
)
from ._sampler import Sampler as Sampler, sampler as sampler
from ._stochastic import (
    SABA as SABA,
    SABAMemory as SABAMemory,
    SOBA as SOBA,
    AmIGO as AmIGO,
    StocBiO as StocBiO,
    StochasticInfo as StochasticInfo,
    StochasticState as StochasticState,
    amigo as amigo,
    saba as saba,
    soba as soba,
    stocbio as stocbio,
)
from ._search import SearchResult as SearchResult, grid_search as grid_search, random_search as random_search
from ._problem import PerStep as PerStep, Problem as Problem, per_step as per_step
from ._objectives import (
    gaussian_elbo as gaussian_elbo,
    gaussian_q as gaussian_q,
    kfold as kfold,
    laplace_evidence as laplace_evidence,
    stack_folds as stack_folds,
)
from ._relax import (
    coupled_bernoulli as coupled_bernoulli,
    dropout_expectation as dropout_expectation,
    gumbel_softmax as gumbel_softmax,
)
from ._schedules import ScheduledSGDState as ScheduledSGDState, scheduled_sgd as scheduled_sgd
from ._meta import anchored as anchored, over_tasks as over_tasks, per_parameter_sgd as per_parameter_sgd
from ._unroll import (
    FirstOrder as FirstOrder,
    Truncate as Truncate,
    Unroll as Unroll,
    first_order as first_order,
    truncate as truncate,
    unroll as unroll,
)

__version__ = "0.1.0"
