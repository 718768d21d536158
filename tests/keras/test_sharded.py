"""Growth under keras.distribution.ModelParallel with a LayoutMap (JAX, 4 and 8 host devices).

Each test runs scenarios of ``sharded_scenarios.py`` in a fresh process (the device count must be set
before JAX is imported; this process has JAX on one device already). The scenarios assert: the function
is kept (<= 1e-5 relative, float32) with symmetry "none" and the default "fresh", every variable and
Adam slot keeps its sharding, replicas of a shard stay bit-identical, each device receives exactly the
ideal bytes (and less than a gather of the whole tensors), training goes on; and refusals leave the model
bit-identical.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.ModelParallel is grown on JAX")

SCRIPT = pathlib.Path(__file__).with_name("sharded_scenarios.py")
#: the worker processes of one session share a JAX compilation cache (compiling is most of their time)
_CACHE: list = []


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    _CACHE.append(str(tmp_path_factory.mktemp("jax_cache")))
    yield
    _CACHE.clear()


def _run(devices: int, *names: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_COMPILATION_CACHE_DIR": _CACHE[-1],
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), *names], env=env, capture_output=True,
                          text=True, timeout=180)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["name"]] = r
    assert proc.returncode == 0 and set(results) == set(names), proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in results.values():
        assert r["ok"], r["error"]
    return results


def _moved(result: dict) -> tuple[int, int]:
    """(bytes received, bytes a gather of the whole tensors would bring), summed over devices and events."""
    events = [v for v in result.values() if isinstance(v, dict) and "transfers" in v]
    got = sum(t["received"] for e in events for t in e["transfers"].values())
    gather = sum(t["gather"] for e in events for t in e["transfers"].values())
    return got, gather


def test_kernels_sharded_on_the_produced_axis_four_devices():
    r = _run(4, "produced")["produced"]
    got, gather = _moved(r)
    assert 0 < got < gather / 2


def test_kernels_sharded_on_the_consumed_axis_batch_by_model_mesh():
    r = _run(4, "consumed")["consumed"]
    got, gather = _moved(r)
    assert 0 < got < gather / 2


def test_kernel_sharded_on_both_axes_split_on_both():
    _run(4, "both_axes")


def test_embedding_table_sharded():
    _run(4, "embedding")


def test_transformer_block_heads_ffn_and_d_model():
    _run(4, "transformer")


def test_growth_inside_fit():
    _run(4, "fit_callback")


def test_refused_before_anything_changes():
    _run(4, "refusals")


def test_draws_at_the_scale_of_the_whole_unit_with_no_transfers():
    _run(4, "draws")


def test_eight_devices():
    _run(8, "produced", "consumed")
