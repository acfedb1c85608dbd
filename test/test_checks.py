"""The shared argument checks (``curvlinops._checks``) and what is built on them (issue 13).

The solvers, estimators, spectral densities and the report check their arguments through one
module; these tests pin its messages (name, range, value) and that ``bool`` is no number.
"""

import re

import numpy as np
import pytest
import torch

from curvlinops import SubmatrixLinearOperator
from curvlinops._checks import (
    check_count,
    check_generator,
    check_int,
    check_number,
    is_finite_number,
    is_int,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.inverse import CGInverseLinearOperator, NeumannInverseLinearOperator


def test_is_int_and_is_finite_number():
    assert is_int(3) and is_int(np.int64(3))
    assert not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_finite_number(0.5) and is_finite_number(np.float32(2)) and is_finite_number(4)
    for value in (True, float("nan"), float("inf"), "1", None):
        assert not is_finite_number(value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_int("n", 0, 1), "n must be an integer >= 1, got 0."),
        (lambda: check_int("n", True, 0), "n must be an integer >= 0, got True."),
        (lambda: check_int("n", 5, 1, 4), "n must be an integer in [1, 4], got 5."),
        (
            lambda: check_int("n", 2.0, 1, optional=True, note=" (why)"),
            "n must be None or an integer >= 1 (why), got 2.0.",
        ),
        (
            lambda: check_int("k", 7, 1, 6, bounds="in [1, 7)"),
            "k must be an integer in [1, 7), got 7.",
        ),
        (lambda: check_number("x", -1.0, 0), "x must be a finite number >= 0, got -1.0."),
        (lambda: check_number("x", 0.0, 0, strict=True), "x must be a finite number > 0, got 0.0."),
        (lambda: check_number("x", float("nan"), 0), "x must be a finite number >= 0, got nan."),
        (lambda: check_count("m", 2.5, 1), "m must be an integer, got 2.5 (float)"),
        (lambda: check_count("m", 0, 1), "m must be at least 1, got 0."),
        (
            lambda: check_count("m", 1, 2, " for an interval", name_value=True),
            "m=1 must be at least 2 for an interval.",
        ),
        (lambda: check_generator(0), "generator must be a torch.Generator or None, got int."),
    ],
)
def test_messages_name_range_and_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_valid_values_pass():
    check_int("n", 4, 1, 4)
    check_int("n", None, 1, optional=True)
    check_number("x", 0, 0)
    check_number("x", None, 0, strict=True, optional=True)
    check_count("seed", -3, None)
    check_generator(None)
    check_generator(torch.Generator())


def test_wrapping_operators_follow_the_wrapped_one():
    """Inverses and sub-matrices take device and dtype from ``A``; compiling compiles ``A``."""
    compiled = []

    class Recording(TensorLinearOperator):
        def compile(self, **kwargs):
            compiled.append(kwargs)
            return self

    A = Recording(torch.eye(4, dtype=torch.float64))
    wrappers = [
        CGInverseLinearOperator(A),
        NeumannInverseLinearOperator(A, num_terms=2),
        SubmatrixLinearOperator(A, [0, 2], [1, 3]),
    ]
    for wrapper in wrappers:
        assert wrapper.dtype == torch.float64 and wrapper.device == A.device
        assert wrapper.compile(mode="x") is wrapper
    assert compiled == [{"mode": "x"}] * len(wrappers)
