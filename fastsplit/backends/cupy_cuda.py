"""The CuPy backend: every task of a growth event in one kernel launch per dtype.

The kernel (``kernels/split.cu``) is a template compiled by NVRTC on first use,
once per dtype, and cached by CuPy (in memory and on disk); a fatbin built by
``make kernels`` is used instead when it matches the source. Tasks are grouped
by device and dtype; each group becomes one byte buffer (descriptor table +
column arrays, see :mod:`fastsplit.backends._cuda_layout`), one host-to-device
copy and one launch on the current stream. Tasks split on two axes
(``Task.rows``) go to a kernel of their own (``fastsplit_split2``), one more
launch per dtype when a batch holds them, so the one-axis kernel is compiled
exactly as it is without them. CuPy is imported on first use only.
Tuning constants (``CUDA_*``) live in :mod:`fastsplit._config` and are read at
call time, so tests can shrink them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .. import _config
from .._errors import SplitError
from . import _cuda_layout

#: dtype name -> (storage dtypes the CuPy arrays may have, kernel traits, compute dtype).
#: bfloat16 travels as 16-bit integers (uint16 from JAX/TensorFlow, int16 from PyTorch).
DTYPES = {
    "float16": ((np.dtype(np.float16),), "fs::F16", np.dtype(np.float32)),
    "bfloat16": ((np.dtype(np.uint16), np.dtype(np.int16)), "fs::BF16", np.dtype(np.float32)),
    "float32": ((np.dtype(np.float32),), "fs::F32", np.dtype(np.float32)),
    "float64": ((np.dtype(np.float64),), "fs::F64", np.dtype(np.float64)),
}
SOURCE = "split.cu"
FATBIN = "fastsplit_split.fatbin"
_REPO = Path(__file__).resolve().parents[2]

_kernels: dict = {}
_modules: dict = {}


def available() -> tuple[bool, str]:
    """Whether this backend can run here, and why not.

    Cost: imports CuPy and asks the CUDA runtime for its devices; compiles nothing.
    """
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); install fastsplit[cuda12] or fastsplit[cuda13]"
    except Exception as exc:  # a broken CuPy install raises anything at import
        return False, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        text = str(exc)
        if "InsufficientDriver" in text:
            return False, _driver_reason(cupy, text)
        if "NoDevice" in text:
            return False, f"no CUDA device ({text})"
        return False, f"CUDA is not usable: {type(exc).__name__}: {text}"
    if count < 1:
        return False, "no CUDA device"
    try:
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:
        return False, f"CUDA device 0 is not usable: {type(exc).__name__}: {exc}"
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # CuPy without its NVRTC library can still use a prebuilt fatbin
        if _fatbin(int(_config.CUDA_THREADS_PER_BLOCK), int(_config.CUDA_VECTORS_PER_THREAD)) is None:
            return False, (f"CuPy cannot load NVRTC to compile the kernels ({type(exc).__name__}: {exc}) "
                           "and there is no prebuilt fatbin (`make kernels`)")
    return True, f"CuPy {cupy.__version__} on {count} CUDA device(s), current: {name}"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _driver_reason(cupy, text: str) -> str:
    """Why the runtime refused the driver: none installed, or one older than CuPy's CUDA."""
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception:
        driver = 0
    if driver == 0:
        return f"no CUDA driver found (no GPU, or libcuda is not installed): {text}"
    try:
        runtime = _cuda_version(cupy.cuda.runtime.runtimeGetVersion())
    except Exception:
        runtime = "?"
    return f"the CUDA driver (CUDA {_cuda_version(driver)}) is older than CuPy's CUDA {runtime}: {text}"


def kernel_source() -> str:
    """The text of ``kernels/split.cu``: from the installed package, else the source tree."""
    try:
        from importlib.resources import files

        res = files("fastsplit.kernels").joinpath(SOURCE)
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (ImportError, OSError):
        pass
    return (_REPO / "kernels" / SOURCE).read_text(encoding="utf-8")


def _fatbin(threads: int, items: int):
    """``(path, manifest)`` of a prebuilt fatbin that matches the source and constants, else None."""
    env = os.environ.get("FASTSPLIT_FATBIN")
    path = Path(env) if env else _REPO / "build" / FATBIN
    if not path.is_file():
        if env:
            warnings.warn(f"FASTSPLIT_FATBIN={env} is not a file; compiling the kernels with NVRTC", stacklevel=3)
        return None
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring {path}: cannot read its manifest {manifest_path} ({exc})", stacklevel=3)
        return None
    digest = hashlib.sha256(kernel_source().encode("utf-8")).hexdigest()
    if manifest.get("sha256") != digest:
        warnings.warn(f"ignoring {path}: built from another version of {SOURCE}; run `make kernels`", stacklevel=3)
        return None
    built = (manifest.get("threads"), manifest.get("items"), manifest.get("min_blocks", 1))
    if built != (threads, items, int(_config.CUDA_MIN_BLOCKS_PER_SM)):
        return None  # built with other tuning constants (tests shrink them)
    return path, manifest


def _load(dtype: str, threads: int, items: int, two: bool = False, noise: bool = True):
    """The kernel function for ``dtype`` on the current device (compiled on first use).

    ``two`` picks the kernel of tasks split on two axes (``fastsplit_split2``); ``noise`` False, the
    instance with the draws compiled out (fewer registers, so more blocks per SM).
    """
    import cupy

    found = _fatbin(threads, items)
    if found is not None:
        path, manifest = found
        try:
            mod = _modules.get(str(path))
            if mod is None:
                mod = _modules[str(path)] = cupy.RawModule(path=str(path))
            kind = ("kernels2" if two else "kernels") + ("" if noise else "_exact")
            return mod.get_function(manifest[kind][dtype])
        except Exception as exc:  # e.g. no code for this GPU's architecture, driver older than nvcc
            warnings.warn(f"cannot load {path} ({type(exc).__name__}: {exc}); compiling with NVRTC", stacklevel=3)
    name = f"fastsplit_split{'2' if two else ''}<{DTYPES[dtype][1]}, {'true' if noise else 'false'}>"
    options = ("-std=c++17", f"-DFS_THREADS={threads}", f"-DFS_ITEMS={items}",
               f"-DFS_MIN_BLOCKS={int(_config.CUDA_MIN_BLOCKS_PER_SM)}")
    mod = cupy.RawModule(code=kernel_source(), options=options, name_expressions=[name])
    return mod.get_function(name)


def _kernel(dtype: str, threads: int, items: int, two: bool = False, noise: bool = True):
    import cupy

    key = (cupy.cuda.Device().id, dtype, threads, items, int(_config.CUDA_MIN_BLOCKS_PER_SM), two, noise)
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = _load(dtype, threads, items, two, noise)
    return fn


def _launch(fn, grid: int, block: int, args: tuple) -> None:
    """One kernel launch on the current stream (a seam for tests that count launches)."""
    fn((grid,), (block,), args)


def _check(task, index: int):
    import cupy

    if task.dtype not in DTYPES:
        raise SplitError(f"task {index}: unsupported dtype {task.dtype!r}")
    storage = DTYPES[task.dtype][0]
    x, out = task.x, task.out
    if not isinstance(x, cupy.ndarray) or not isinstance(out, cupy.ndarray):
        raise SplitError(f"task {index}: the cupy backend needs CuPy arrays, got {type(x).__name__} and {type(out).__name__}")
    m = int(np.shape(task.src)[0])
    if task.rows is None:
        if x.ndim != 3 or out.ndim != 3:
            raise SplitError(f"task {index}: x and out must be 3-D views, got shapes {x.shape} and {out.shape}")
        outer, _, inner = x.shape
        want = (outer, m, inner)
    else:
        if x.ndim != 5 or out.ndim != 5:
            raise SplitError(f"task {index}: a two-axis task needs 5-D views, got shapes {x.shape} and {out.shape}")
        outer, _, mid, _, inner = x.shape
        want = (outer, int(np.shape(task.rows.src)[0]), mid, m, inner)
    if out.shape != want:
        raise SplitError(f"task {index}: out has shape {out.shape}, expected {want}")
    if x.dtype not in storage or out.dtype != x.dtype:
        want = " or ".join(str(d) for d in storage)
        raise SplitError(f"task {index}: {task.dtype} arrays must be stored as {want}, got {x.dtype} and {out.dtype}")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise SplitError(f"task {index}: x and out must be C-contiguous")
    if x.data.ptr % x.itemsize or out.data.ptr % out.itemsize:  # a misaligned load is a sticky CUDA error
        raise SplitError(f"task {index}: x and out must start on a multiple of their element size")
    if x.device.id != out.device.id:
        raise SplitError(f"task {index}: x is on device {x.device.id}, out on device {out.device.id}")


def _spec(task) -> _cuda_layout.TaskSpec:
    shape = tuple(int(s) for s in task.x.shape)
    rows = None
    if task.rows is not None:
        r = task.rows
        rows = _cuda_layout.RowSpec(na=shape[1], mid=shape[2], src=r.src, scale=r.scale, add=r.add, noise=r.noise,
                                    key=int(r.key), first=bool(r.first),
                                    noise_by_source=bool(getattr(r, "noise_by_source", False)))
        shape = (shape[0], shape[3], shape[4])
    outer, n, inner = shape
    return _cuda_layout.TaskSpec(
        x=int(task.x.data.ptr), out=int(task.out.data.ptr), outer=outer, n=n, m=int(np.shape(task.src)[0]),
        inner=inner, src=task.src, scale=task.scale, add=task.add, noise=task.noise, key=int(task.key), rows=rows,
        noise_by_source=bool(getattr(task, "noise_by_source", False)),
    )


def prepare(tasks) -> list:
    """Check and lay out ``tasks``; upload their blobs; return one launcher per launch.

    Calling every returned launcher (no arguments) writes every task's ``out``;
    :func:`run` does just that. Split out so benchmarks can time the kernels
    apart from the host work.

    Cost: per (device, dtype, one or two axes) group, O(columns) numpy work to
    lay out the blob, one host-to-device copy of it (192 bytes per task plus
    the column arrays) and, on first use per dtype, compiling the kernel (about
    a second; CuPy caches it on disk).
    """
    import cupy

    groups: dict = {}
    for index, task in enumerate(tasks):
        _check(task, index)
        groups.setdefault((task.x.device.id, task.dtype, task.rows is not None), []).append(task)
    draws = {key: any(_draws(t) for t in group) for key, group in groups.items()}
    threads, items = int(_config.CUDA_THREADS_PER_BLOCK), int(_config.CUDA_VECTORS_PER_THREAD)
    launchers = []
    for (device, dtype, two), group in groups.items():
        storage, _, compute = DTYPES[dtype]
        layout = _cuda_layout.build([_spec(t) for t in group], itemsize=storage[0].itemsize, compute=compute,
                                    threads=threads, items=items)
        if layout.total_tiles == 0:
            continue
        with cupy.cuda.Device(device):
            fn = _kernel(dtype, threads, items, two, draws[(device, dtype, two)])
            blob = cupy.asarray(layout.blob)
        grid = int(min(layout.total_tiles, _config.CUDA_MAX_BLOCKS))
        args = (blob, np.int64(layout.ntasks), np.int64(layout.total_tiles))
        launchers.append(functools.partial(_launch_on, device, fn, grid, threads, args))
    return launchers


def _draws(task) -> bool:
    """Whether any gather of ``task`` adds draws (the launch then needs the kernel instance with them)."""
    return task.noise is not None or (task.rows is not None and task.rows.noise is not None)


def _launch_on(device, fn, grid: int, block: int, args: tuple) -> None:
    import cupy

    with cupy.cuda.Device(device):
        _launch(fn, grid, block, args)


def run(tasks) -> None:
    """Write every task's ``out``: one launch per (device, dtype) on the current stream (two with two-axis tasks).

    Cost: :func:`prepare`, then kernels that read each gathered element once
    and write each output element once. Does not synchronise.
    """
    for launch in prepare(tasks):
        launch()
