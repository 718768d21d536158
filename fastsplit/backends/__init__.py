"""Backend implementations, and ``fastsplit.backends()``.

The issue's API names a function ``fastsplit.backends()`` while DESIGN.md's layout
names this subpackage ``fastsplit/backends/``: importing a backend module binds
the subpackage to ``fastsplit.backends`` and would hide the function. So the
subpackage itself is callable: ``fastsplit.backends()`` reports which backends
are usable here, whatever has been imported.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict:
        """``{name: (usable, reason)}`` for "numpy", "numba" and "cupy"; see ``_dispatch.backends``."""
        from .._dispatch import backends

        return backends()


sys.modules[__name__].__class__ = _CallableModule
