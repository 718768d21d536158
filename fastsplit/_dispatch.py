"""Which backend runs a split: from the memory the arrays live in and ``backend=``.

Backends are imported on first use only: ``import fastsplit`` pulls in numpy
and nothing heavier.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from ._errors import SplitError

BACKENDS = ("numpy", "numba", "cupy")
_MODULES = {"numpy": "fastsplit._reference", "numba": "fastsplit.backends.numba_cpu",
            "cupy": "fastsplit.backends.cupy_cuda"}


def array_module(native):
    """numpy for CPU memory, cupy for CUDA memory."""
    if native.device[0] == "cuda":
        import cupy

        return cupy
    return np


def _probe(name: str) -> tuple[bool, str]:
    if name == "numpy":
        return True, "numpy reference (always available)"
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # the backend's own dependency is missing
        return False, f"not installed: {exc}"
    return mod.available()


def backends() -> dict[str, tuple[bool, str]]:
    """Which backends are usable here, and why a missing one is not.

    Returns:
        ``{name: (usable, reason)}`` for ``"numpy"``, ``"numba"`` and ``"cupy"``,
        e.g. ``{"cupy": (False, "no CUDA device: ...")}``.

    Cost: imports Numba and CuPy (seconds on the first call).
    """
    return {name: _probe(name) for name in BACKENDS}


def chosen(backend: str, device: tuple) -> str:
    """The name of the backend that ``backend`` (``"auto"`` or a name) picks for arrays on ``device``."""
    if backend != "auto":
        return backend
    if device[0] == "cuda":
        return "cupy"
    return "numba" if _numba_ok() else "numpy"


def resolve(backend: str, device: tuple):
    """The backend module that will run jobs on ``device``."""
    if backend not in ("auto",) + BACKENDS:
        raise SplitError(f"backend must be 'auto', 'numpy', 'numba' or 'cupy', got {backend!r}")
    on_gpu = device[0] == "cuda"
    backend = chosen(backend, device)
    if on_gpu and backend != "cupy":
        raise SplitError(f"backend {backend!r} runs on the CPU, but the arrays are in CUDA memory; use 'cupy' or 'auto'")
    if not on_gpu and backend == "cupy":
        raise SplitError("backend 'cupy' needs CUDA arrays, but the arrays are in CPU memory; use 'numba' or 'auto'")
    ok, why = _probe(backend) if backend != "numpy" else (True, "")
    if not ok:
        raise SplitError(f"backend {backend!r} is not usable here: {why}")
    return importlib.import_module(_MODULES[backend])


_numba_state: list = []


def _numba_ok() -> bool:
    if not _numba_state:
        _numba_state.append(_probe("numba")[0])
    return _numba_state[0]


def synchronize(device: tuple) -> None:
    """Wait for the device's work so results can be handed to another framework."""
    if device[0] == "cuda" and "cupy" in sys.modules:
        import cupy

        cupy.cuda.get_current_stream().synchronize()
