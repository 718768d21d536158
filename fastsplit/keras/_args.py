"""Argument checks the growth callbacks share; each ``ValueError`` names the value it got."""

from __future__ import annotations

import numbers


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_int(name: str, value, low: int) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name=value`` when it is not an integer >= ``low``."""
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {name}={value!r}")
    return int(value)
