"""curvlinops: PyTorch linear operators for curvature matrices of neural networks."""

from curvlinops.diagonal.epperly2024xtrace import xdiag
from curvlinops.diagonal.hutchinson import hutchinson_diag
from curvlinops.eigen import eigsh as eigsh  # beyond 3.0.1: not in the contract's __all__
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.fisher import FisherMCLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient_moments import EFLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.inverse import (
    CGInverseLinearOperator,
    KFACInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.jacobian import (
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops.kfac import FisherType, KFACLinearOperator, KFACType
from curvlinops.norm.hutchinson import hutchinson_squared_fro
from curvlinops.papyan2020traces.spectrum import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.submatrix import SubmatrixLinearOperator
from curvlinops.trace.epperly2024xtrace import xtrace
from curvlinops.trace.hutchinson import hutchinson_trace
from curvlinops.trace.meyer2020hutch import hutchpp_trace

__version__ = "3.0.1.post1"

__all__ = [
    "HessianLinearOperator",
    "GGNLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "KFACLinearOperator",
    "EKFACLinearOperator",
    "JacobianLinearOperator",
    "TransposedJacobianLinearOperator",
    "FisherType",
    "KFACType",
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "KFACInverseLinearOperator",
    "SubmatrixLinearOperator",
    "lanczos_approximate_spectrum",
    "lanczos_approximate_log_spectrum",
    "LanczosApproximateSpectrumCached",
    "LanczosApproximateLogSpectrumCached",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diag",
    "xdiag",
    "hutchinson_squared_fro",
]
