"""Fixtures shared by the test suite (helpers live in fs_testing.py)."""

import pytest
from fs_testing import CPU_BACKENDS


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    return request.param
