"""Experimental operators whose interface may still change."""

from curvlinops.experimental.activation_hessian import ActivationHessianLinearOperator

__all__ = ["ActivationHessianLinearOperator"]
