"""Argument checks the growth callbacks share.

Each check raises :class:`GrowthError` (a ``ValueError``) naming the argument and the
value it got, in the callback's ``__init__``, so a bad value never costs an epoch.
A bool is never taken for a number, and a float is never finite unless it says so.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from ._errors import GrowthError


def is_int(x) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    """A real number that is not a bool (numpy floats and integers count)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, value, low: int) -> int:
    """``value`` as an int, or ``GrowthError`` naming ``name=value`` when it is not an integer >= ``low``."""
    if not is_int(value) or value < low:
        raise GrowthError(f"{name} must be an integer >= {low}; got {name}={value!r}")
    return int(value)


def check_real(name: str, value, *, low: float | None = None, optional: bool = False) -> float | None:
    """``value`` as a float: a finite real number (not a bool), >= ``low`` when given; None passes when ``optional``."""
    if value is None and optional:
        return None
    if not is_real(value) or not math.isfinite(value) or (low is not None and value < low):
        what = "a finite number" + ("" if low is None else f" >= {low:g}")
        raise GrowthError(f"{name} must be {'None or ' if optional else ''}{what}; got {name}={value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """``value`` as a bool; anything but ``True``/``False`` (numpy's too) raises, so ``"no"`` is never true."""
    if not isinstance(value, (bool, np.bool_)):
        raise GrowthError(f"{name} must be True or False; got {name}={value!r}")
    return bool(value)


def check_choice(name: str, value, choices: tuple) -> str:
    """``value`` when it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise GrowthError(f"{name} must be one of {choices}; got {name}={value!r}")
    return value


def check_dir(name: str, value) -> str | None:
    """None, or a folder path (str or ``os.PathLike``) that is not an existing file; nothing is created."""
    if value is None:
        return None
    try:
        path = os.fspath(value)
    except TypeError:
        raise GrowthError(f"{name} must be None or a folder path; got {name}={value!r}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise GrowthError(f"{name} must be None or a folder path; got {name}={value!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise GrowthError(f"{name} must be a folder; got {name}={value!r}, which is a file")
    return path
