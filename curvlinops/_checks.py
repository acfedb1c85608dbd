"""Argument checks shared by the solvers, estimators and reports.

Every check raises a ``ValueError`` that names the argument, the allowed range and the value
it got. ``bool`` never counts as a number: ``k=True`` is a mistake, not 1.
"""

from math import isfinite
from numbers import Integral, Real
from typing import Optional

import torch


def is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a finite real number (Python or NumPy), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and isfinite(value)


def check_int(
    name: str,
    value,
    low: int,
    high: Optional[int] = None,
    *,
    optional: bool = False,
    bounds: Optional[str] = None,
    note: str = "",
):
    """Raise unless ``value`` is an integer in ``[low, high]`` (or ``None`` if ``optional``).

    The message reads ``"{name} must be [None or ]an integer {bounds}{note}, got {value!r}."``.

    Args:
        name: The argument's name.
        value: Its value.
        low: Smallest allowed value.
        high: Largest allowed value (``None``: no upper limit).
        optional: Whether ``None`` is allowed.
        bounds: The range as the message states it; ``">= low"`` or ``"in [low, high]"`` by
            default.
        note: Explanation appended to the range, e.g. ``" (number of restarts)"``.
    """
    if optional and value is None:
        return
    if is_int(value) and low <= value and (high is None or value <= high):
        return
    if bounds is None:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    none = "None or " if optional else ""
    raise ValueError(f"{name} must be {none}an integer {bounds}{note}, got {value!r}.")


def check_number(
    name: str, value, low: float, *, strict: bool = False, optional: bool = False, note: str = ""
):
    """Raise unless ``value`` is a finite number ``>= low`` (``> low`` if ``strict``).

    The message reads ``"{name} must be a finite number >= {low}{note}, got {value!r}."``.

    Args:
        name: The argument's name.
        value: Its value.
        low: The lower limit.
        strict: Whether ``low`` itself is excluded.
        optional: Whether ``None`` is allowed.
        note: Explanation appended to the range.
    """
    if optional and value is None:
        return
    if is_finite_number(value) and (value > low if strict else value >= low):
        return
    relation = ">" if strict else ">="
    raise ValueError(f"{name} must be a finite number {relation} {low:g}{note}, got {value!r}.")


def check_count(name: str, value, minimum: Optional[int], why: str = "", name_value: bool = False):
    """Raise unless ``value`` is an integer of at least ``minimum``: type first, then size.

    The messages are ``"{name} must be an integer, got {value!r} (type); ..."`` and then
    ``"{name} must be at least {minimum}{why}, got {value}."`` (or, with ``name_value``,
    ``"{name}={value} must be at least {minimum}{why}."``, the report's style).

    Args:
        name: The argument's name.
        value: Its value.
        minimum: Smallest allowed value (``None``: any integer).
        why: Explanation of the minimum, e.g. ``" for an interval"``.
        name_value: Whether the size message starts with ``name=value``.
    """
    if not is_int(value):
        raise ValueError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. "
            f"{name}=int(...)."
        )
    if minimum is not None and value < minimum:
        if name_value:
            raise ValueError(f"{name}={value} must be at least {minimum}{why}.")
        raise ValueError(f"{name} must be at least {minimum}{why}, got {value}.")


def check_generator(generator):
    """Raise unless ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}."
        )
