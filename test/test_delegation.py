"""Operators built around an operand share one device/dtype/compile mechanism."""

import pytest
import torch

from curvlinops import CGInverseLinearOperator, KFACInverseLinearOperator
from curvlinops._torch_base import (
    _CompositeLinearOperator,
    _DelegatingLinearOperator,
    _ProductLinearOperator,
    _ScaledLinearOperator,
    _SumLinearOperator,
)
from curvlinops.examples import OuterProductLinearOperator, TensorLinearOperator
from curvlinops.inverse import LSMRInverseLinearOperator, NeumannInverseLinearOperator
from curvlinops.submatrix import SubmatrixLinearOperator

DT = torch.float64

DELEGATING = [
    _SumLinearOperator,
    _ScaledLinearOperator,
    _ProductLinearOperator,
    CGInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    KFACInverseLinearOperator,
    SubmatrixLinearOperator,
    TensorLinearOperator,
    OuterProductLinearOperator,
]


@pytest.mark.parametrize("cls", DELEGATING, ids=lambda c: c.__name__)
def test_one_mechanism(cls):
    """No operator built around an operand re-implements device, dtype or compile.

    The one exception is KFAC's inverse, whose product is algebra on stored factors: it
    compiles that whole product instead of ``A``'s (see ``kfac_inverse.py``).
    """
    assert issubclass(cls, _DelegatingLinearOperator)
    own = {"device", "dtype"} | ({"compile"} if cls is not KFACInverseLinearOperator else set())
    for klass in cls.__mro__[: cls.__mro__.index(_DelegatingLinearOperator)]:
        assert not own & set(vars(klass)), klass


class Recording(TensorLinearOperator):
    """A matrix operator that records its compile calls instead of compiling."""

    def __init__(self, A, log):
        super().__init__(A)
        self.log = log

    def compile(self, **kwargs):
        self.log.append((self, kwargs))
        return self


def test_composites_compile_both_operands():
    log = []
    A = Recording(torch.eye(3, dtype=DT), log)
    B = Recording(2 * torch.eye(3, dtype=DT), log)
    for op in (A + B, A - B, A @ B):
        log.clear()
        assert op.compile(mode="m") is op
        assert isinstance(op, _CompositeLinearOperator)
        compiled = [o for o, _ in log]
        assert A in compiled and B in compiled and all(k == {"mode": "m"} for _, k in log)
    log.clear()
    scaled = 3.0 * A
    assert scaled.compile() is scaled and [o for o, _ in log] == [A]
    assert scaled.device == A.device and scaled.dtype == DT


@pytest.mark.parametrize(
    "make",
    [
        lambda M: TensorLinearOperator(M),
        lambda M: OuterProductLinearOperator(torch.tensor([1.0, 2.0], dtype=M.dtype), M[:, :2]),
    ],
    ids=["tensor", "outer_product"],
)
def test_tensor_operands_compile_own_product(make):
    """Operators over tensors (no operator operand) compile their own product."""
    M = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    op = make(M)
    X = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    eager = op @ X
    matmat = op._matmat
    assert op.compile(backend="eager") is op
    assert op._matmat is not matmat  # replaced by the compiled product
    assert op.device == M.device and op.dtype == DT
    torch.testing.assert_close(op @ X, eager, rtol=1e-12, atol=1e-12)
