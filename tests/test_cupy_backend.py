"""The CuPy backend: its host-side layout on the CPU, its kernel on a GPU.

CPU tests (always run, no CuPy needed): the descriptor-table / blob builder of
``fastsplit/backends/_cuda_layout.py``, and a line-by-line numpy emulation of
``kernels/split.cu`` that reads that blob exactly as the kernel does and must
write every output element exactly once, with the reference's values.

GPU tests (class ``TestGPU``, marked ``gpu``): skipped together, with the reason,
when CuPy is not importable or no CUDA device is usable.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from fs_testing import DTYPES, as_dtype

from fastsplit import _config, _noise, _reference
from fastsplit._core import Task, column_runs
from fastsplit.backends import _cuda_layout as lay
from fastsplit.backends import cupy_cuda

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _gpu_skip_reason():
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    ok, why = cupy_cuda.available()
    return None if ok else why


GPU_SKIP = _gpu_skip_reason()


def compute_of(dtype):
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


# ---------------------------------------------------------------------------
# host side: blob layout
# ---------------------------------------------------------------------------


def test_tuning_constants_are_in_config():
    assert isinstance(_config.CUDA_THREADS_PER_BLOCK, int) and _config.CUDA_THREADS_PER_BLOCK % 32 == 0
    assert 32 <= _config.CUDA_THREADS_PER_BLOCK <= 1024
    assert isinstance(_config.CUDA_VECTORS_PER_THREAD, int) and _config.CUDA_VECTORS_PER_THREAD >= 1
    assert 1 <= _config.CUDA_MAX_BLOCKS < 2**31


def test_tuning_defaults_agree_in_config_cmake_and_the_kernel_source():
    """The prebuilt fatbin (CMake) is used only when built with ``_config``'s constants, and split.cu's own
    defaults are what a direct nvcc build gets: the three must change together."""
    import re
    from pathlib import Path

    want = {"THREADS": _config.CUDA_THREADS_PER_BLOCK, "ITEMS": _config.CUDA_VECTORS_PER_THREAD,
            "MIN_BLOCKS": _config.CUDA_MIN_BLOCKS_PER_SM}
    src = cupy_cuda.kernel_source()
    cmake = (Path(__file__).resolve().parents[1] / "CMakeLists.txt").read_text(encoding="utf-8")
    for name, value in want.items():
        assert int(re.search(rf"#define FS_{name} (\d+)", src).group(1)) == value, name
        assert int(re.search(rf"set\(FASTSPLIT_{name} (\d+) ", cmake).group(1)) == value, name


def test_desc_fields_match_the_cuda_struct():
    src = cupy_cuda.kernel_source()
    body = src[src.index("struct Desc {"):]
    body = body[: body.index("};")]
    names = [line.split()[1].rstrip(";") for line in body.splitlines()[1:] if line.strip().startswith("i64 ")]
    assert tuple(names) == lay.FIELDS
    for flag in ("F_SCALE", "F_ADD", "F_NOISE", "F_XALIGN", "F_OALIGN", "F_TWO", "F_RFIRST", "F_RSCALE", "F_RADD",
                 "F_RNOISE", "F_NSRC", "F_RNSRC"):
        assert f"{flag} = {getattr(lay, flag)}," in src


@pytest.mark.parametrize("seed", range(5))
def test_run_remaining_is_the_length_of_the_consecutive_stretch(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 60))
    src = np.cumsum(rng.choice([1, 1, 1, 0, -3, 5], size=m)) + 10
    run = lay.run_remaining(src)
    for j in range(m):
        t = 1
        while j + t < m and src[j + t] == src[j] + t:
            t += 1
        assert run[j] == t


def _specs_for_table():
    src_a = np.array([0, 1, 2, 3, 1, 2], dtype=np.int64)
    src_b = np.array([0, 1, 2, 0], dtype=np.int64)
    return [
        lay.TaskSpec(x=4096, out=8192, outer=3, n=4, m=6, inner=1, src=src_a, scale=np.ones(6)),
        lay.TaskSpec(x=4098, out=8196, outer=0, n=4, m=6, inner=1, src=src_a, scale=np.ones(6)),  # empty
        lay.TaskSpec(x=16384, out=20482, outer=2, n=3, m=4, inner=5, src=src_b,
                     scale=np.array([1.0, 0.5, 1.0, 0.1]), add=np.array([0.0, 1e-3, 0.0, -1e-3]),
                     noise=np.array([0.0, 0.0, 0.0, 0.25]), key=(1 << 64) - 5),
        lay.TaskSpec(x=32768, out=40960, outer=7, n=4, m=6, inner=2, src=src_a, scale=np.full(6, 0.5)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_rows_describe_each_task(dtype):
    specs = _specs_for_table()
    threads, items = 4, 2
    L = lay.build(specs, itemsize=ITEMSIZE[dtype], compute=compute_of(dtype), threads=threads, items=items)
    tile = threads * items * (16 // ITEMSIZE[dtype])
    assert L.tile_elems == tile
    assert L.order == (0, 2, 3)
    assert L.ntasks == 3 and L.blob.dtype == np.uint8
    t = L.table
    fld = lay.F
    starts = 0
    for row, k in enumerate(L.order):
        s = specs[k]
        total = s.outer * s.m * s.inner
        assert tuple(t[row, [fld["x"], fld["out"], fld["outer"], fld["n"], fld["m"], fld["inner"]]]) == (
            s.x, s.out, s.outer, s.n, s.m, s.inner)
        assert t[row, fld["total"]] == total
        assert t[row, fld["tile_start"]] == starts
        starts += -(-total // tile)
        for name in ("src", "run"):
            off = t[row, fld[name]]
            assert off % 16 == 0 and off >= L.ntasks * lay.DESC_BYTES
        src = L.blob[t[row, fld["src"]]:][: 8 * s.m].view(np.int64)
        run = L.blob[t[row, fld["run"]]:][: 8 * s.m].view(np.int64)
        np.testing.assert_array_equal(src, s.src)
        np.testing.assert_array_equal(run, lay.run_remaining(s.src))
    assert L.total_tiles == starts
    # one plan, one copy of its columns
    assert t[0, fld["src"]] == t[2, fld["src"]] and t[0, fld["run"]] == t[2, fld["run"]]
    assert t[0, fld["src"]] != t[1, fld["src"]]
    # flags and the optional arrays
    ct = compute_of(dtype)
    f0, f1, f2 = t[:, fld["flags"]]
    assert f0 == lay.F_XALIGN | lay.F_OALIGN  # all-one scale: no multiply at all
    assert f1 == lay.F_SCALE | lay.F_ADD | lay.F_NOISE | lay.F_XALIGN  # out at 20482 is not 16-byte aligned
    assert f2 == lay.F_SCALE | lay.F_XALIGN | lay.F_OALIGN
    s = specs[2]
    scale = L.blob[t[1, fld["scale"]]:][: ct.itemsize * 4].view(ct)
    add = L.blob[t[1, fld["add"]]:][: ct.itemsize * 4].view(ct)
    noise = L.blob[t[1, fld["noise"]]:][: 32].view(np.float64)
    np.testing.assert_array_equal(scale, s.scale.astype(ct))
    np.testing.assert_array_equal(add, s.add.astype(ct))
    np.testing.assert_array_equal(noise, s.noise)
    assert t[1, fld["scale"]] % 16 == 0 and t[1, fld["add"]] % 16 == 0 and t[1, fld["noise"]] % 16 == 0
    assert np.array(t[1, fld["key"]]).view(np.uint64) == (1 << 64) - 5


def test_empty_and_bad_inputs():
    L = lay.build([], itemsize=4, compute=np.float32, threads=32, items=1)
    assert L.ntasks == 0 and L.total_tiles == 0 and L.blob.size == 0
    bad = lay.TaskSpec(x=0, out=0, outer=1, n=3, m=2, inner=1, src=np.array([0, 3]), scale=np.ones(2))
    with pytest.raises(ValueError, match=r"src must lie in \[0, 3\)"):
        lay.build([bad], itemsize=4, compute=np.float32, threads=32, items=1)
    bad = lay.TaskSpec(x=0, out=0, outer=1, n=3, m=2, inner=1, src=np.array([0, 1]), scale=np.ones(3))
    with pytest.raises(ValueError, match="scale must have shape"):
        lay.build([bad], itemsize=4, compute=np.float32, threads=32, items=1)


# ---------------------------------------------------------------------------
# numpy emulation of kernels/split.cu
# ---------------------------------------------------------------------------


def bf16_from_f32_bits(f):
    """BF16::from_c of split.cu, on float32 values (uint16 result)."""
    b = np.asarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return np.where(nan, ((b >> 16) & 0x8000) | 0x7FC0, rounded).astype(np.uint16)


def test_bfloat16_rounding_matches_ml_dtypes():
    import ml_dtypes

    rng = np.random.default_rng(1)
    bits = np.concatenate([
        rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32),
        np.array([0, 0x80000000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0x7F7FFFFF, 0xFF7FFFFF,
                  0x7F7F7FFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000, 0x3F80FFFF],
                 dtype=np.uint32),
    ])
    f = bits.view(np.float32)
    ours = bf16_from_f32_bits(f)
    with np.errstate(invalid="ignore"):
        theirs = f.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = np.isfinite(f)
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    assert np.all(np.isnan(ours[~np.isfinite(f) & np.isnan(f)].view(ml_dtypes.bfloat16).astype(np.float32)))


class Memory:
    """Fake device memory: arrays placed at chosen addresses of one byte arena."""

    BASE = 1 << 20

    def __init__(self, nbytes):
        self.arena = np.zeros(nbytes, dtype=np.uint8)
        self.used = 0

    def place(self, arr, misalign=0):
        """Copy ``arr`` in at a 256-byte boundary plus ``misalign`` bytes; return its address."""
        start = -(-self.used // 256) * 256 + misalign
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        self.arena[start:start + raw.size] = raw
        self.used = start + raw.size
        return self.BASE + start

    def view(self, address, dtype, count):
        start = address - self.BASE
        return self.arena[start:start + count * np.dtype(dtype).itemsize].view(dtype)


def u32(v):
    assert 0 <= v < 2**32, "a 32-bit division got a value that does not fit"
    return v


class Emulator:
    """kernels/split.cu statement by statement, for one dtype (integers are Python ints)."""

    def __init__(self, dtype, threads, items):
        self.dtype = dtype
        self.storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        self.vec = 16 // self.storage.itemsize
        self.threads, self.items = threads, items
        self.tile = threads * items * self.vec
        self.ct = compute_of(dtype)
        self.wide_loads = self.wide_stores = 0

    def to_c(self, s):
        if self.dtype == "bfloat16":
            return (np.uint32(s) << np.uint32(16)).view(np.float32)
        return self.ct.type(s)

    def from_c(self, y):
        if self.dtype == "bfloat16":
            return bf16_from_f32_bits(np.float32(y))[()]
        return self.storage.type(y)

    def locate_row(self, off, L, o0):
        if off < L:
            return o0, off
        if L >= self.tile:
            assert off < 2 * L
            return o0 + 1, off - L
        q = u32(off) // u32(L)
        return o0 + q, off - q * L

    @staticmethod
    def locate_col(c, inner, L):
        if inner == 1:
            return c, 0
        if L <= 0xFFFFFFFF:
            q = u32(c) // u32(inner)
            return q, c - q * inner
        return c // inner, c % inner

    def launch(self, layout, mem, grid, writes):
        blob = layout.blob
        table = layout.table
        fld = lay.F
        for block in range(grid):
            for tile in range(block, layout.total_tiles, grid):
                lo, hi = 0, layout.ntasks - 1
                while lo < hi:
                    mid = (lo + hi + 1) >> 1
                    if table[mid, fld["tile_start"]] <= tile:
                        lo = mid
                    else:
                        hi = mid - 1
                d = {name: int(table[lo, k]) for name, k in fld.items()}
                self.run_tile(d, tile, blob, mem, writes)

    def run_tile(self, d, tile, blob, mem, writes):
        VEC, TILE = self.vec, self.tile
        n, m, inner, total, flags = d["n"], d["m"], d["inner"], d["total"], d["flags"]
        x = mem.view(d["x"], self.storage, d["outer"] * n * inner)
        out = mem.view(d["out"], self.storage, total)
        wcount = writes[d["out"]]

        def col(name, dtype):
            return blob[d[name]:][: m * np.dtype(dtype).itemsize].view(dtype)

        src, run = col("src", np.int64), col("run", np.int64)
        scale = col("scale", self.ct) if flags & lay.F_SCALE else None
        addv = col("add", self.ct) if flags & lay.F_ADD else None
        noise = col("noise", np.float64) if flags & lay.F_NOISE else None
        key = d["key"] % (1 << 64)
        L = m * inner
        base = (tile - d["tile_start"]) * TILE
        o0 = base // L
        c0 = base - o0 * L

        def store(pos, value):
            out[pos] = value
            wcount[pos] += 1

        if flags & lay.F_NOISE:
            for it in range(self.items):
                for tid in range(self.threads):
                    rel = (it * self.threads + tid) * VEC
                    f = base + rel
                    if f >= total:
                        continue  # the kernel breaks: later items of this thread lie further on
                    o, c = self.locate_row(c0 + rel, L, o0)
                    j, i = self.locate_col(c, inner, L)
                    for k in range(min(total - f, VEC)):
                        y = self.to_c(x[(o * n + int(src[j])) * inner + i])
                        if scale is not None:
                            y = self.ct.type(y * scale[j])
                        if addv is not None:
                            y = self.ct.type(y + addv[j])
                        if noise[j] != 0.0:
                            at = (o * n + int(src[j])) * inner + i if flags & lay.F_NSRC else f + k
                            draw = self.ct.type(noise[j] * _noise.gauss(key, np.array([at]))[0])
                            y = self.ct.type(y + draw)
                        store(f + k, self.from_c(y))
                        i += 1
                        if i == inner:
                            i = 0
                            j += 1
                            if j == m:
                                j, o = 0, o + 1
            return

        for tid in range(self.threads):
            buf = {}
            for it in range(self.items):
                rel = (it * self.threads + tid) * VEC
                f = base + rel
                if f >= total:
                    continue
                o, c = self.locate_row(c0 + rel, L, o0)
                j, i = self.locate_col(c, inner, L)
                sj = int(src[j])
                wide = False
                if (flags & lay.F_XALIGN) and f + VEC <= total and c + VEC <= L:
                    rj = int(run[j])
                    xs = (o * n + sj) * inner + i
                    span = VEC - 1 if inner == 1 else (0 if i + VEC <= inner else (i + VEC - 1) // inner)
                    if xs & (VEC - 1) == 0 and rj > span:
                        assert (d["x"] + xs * self.storage.itemsize) % 16 == 0
                        buf[it] = x[xs:xs + VEC].copy()
                        self.wide_loads += 1
                        wide = True
                if not wide:
                    vals = np.zeros(VEC, dtype=self.storage)
                    for k in range(VEC):
                        if f + k < total:
                            vals[k] = x[(o * n + sj) * inner + i]
                            i += 1
                            if i == inner:
                                i = 0
                                j += 1
                                if j == m:
                                    j, o = 0, o + 1
                                if f + k + 1 < total:
                                    sj = int(src[j])
                    buf[it] = vals
            for it in range(self.items):
                rel = (it * self.threads + tid) * VEC
                f = base + rel
                if f >= total:
                    continue
                vals = buf[it]
                if flags & (lay.F_SCALE | lay.F_ADD):
                    o, c = self.locate_row(c0 + rel, L, o0)
                    j, i = self.locate_col(c, inner, L)
                    for k in range(VEC):
                        if f + k < total:
                            y = self.to_c(vals[k])
                            if scale is not None:
                                y = self.ct.type(y * scale[j])
                            if addv is not None:
                                y = self.ct.type(y + addv[j])
                            vals[k] = self.from_c(y)
                            i += 1
                            if i == inner:
                                i = 0
                                j += 1
                                if j == m:
                                    j = 0
                if (flags & lay.F_OALIGN) and f + VEC <= total:
                    assert (d["out"] + f * self.storage.itemsize) % 16 == 0
                    self.wide_stores += 1
                    for k in range(VEC):
                        store(f + k, vals[k])
                else:
                    for k in range(VEC):
                        if f + k < total:
                            store(f + k, vals[k])


def random_src(rng, n, extra):
    """A plan-like src: old units in place, then sorted extra copies."""
    return np.concatenate([np.arange(n), np.sort(rng.integers(0, n, size=extra))]).astype(np.int64)


# (outer, n, m-n extra copies, inner, x misalignment in elements, out misalignment, add, noise, scale);
# noise "source": drawn at the flat index of the element read (Task.noise_by_source), on every column
CASES = [
    (5, 13, 7, 1, 0, 0, False, False, False),     # dense producer, odd sizes, row < tile
    (4, 16, 8, 1, 0, 0, False, False, True),      # aligned rows: wide prefix loads
    (3, 32, 40, 1, 0, 0, False, False, False),    # long rows (row >= tile)
    (1, 97, 30, 1, 0, 0, True, False, False),     # bias with offsets
    (2, 7, 4, 5, 0, 0, False, False, True),       # consumer side, inner 5: vectors span columns
    (3, 5, 3, 16, 0, 0, False, False, True),      # consumer side, inner a multiple of every VEC
    (2, 6, 2, 3, 1, 0, False, False, True),       # misaligned x
    (3, 9, 5, 2, 0, 1, True, False, True),        # misaligned out
    (4, 11, 6, 1, 0, 0, False, True, False),      # incoming weights with noise
    (2, 6, 3, 4, 1, 1, True, True, True),         # everything at once
    (0, 4, 2, 3, 0, 0, False, False, False),      # empty
    (3, 1, 2, 1, 0, 0, False, False, True),       # a single unit
    (4, 11, 6, 1, 0, 0, False, "source", False),  # symmetry "direction": one draw per source element
    (2, 6, 3, 4, 1, 1, True, "source", True),     # ... with everything else
]


def _noise_vector(rng, n, m, with_noise):
    """None, noise on the extra copies, or (``"source"``) signed noise on every column, as "direction" has."""
    if not with_noise:
        return None
    if with_noise == "source":
        return rng.uniform(-0.1, 0.1, m)
    return np.where(np.arange(m) >= n, rng.uniform(0.01, 0.1, m), 0.0)


def _build_case(rng, dtype, mem, cases, shared_src=True):
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    tasks, specs, srcs = [], [], {}
    for (outer, n, extra, inner, xmis, omis, with_add, with_noise, with_scale) in cases:
        key = (n, extra)
        if key not in srcs or not shared_src:
            srcs[key] = random_src(rng, n, extra)
        src = srcs[key]
        m = src.shape[0]
        x = rng.standard_normal((outer, n, inner)).astype(as_dtype(dtype))
        scale = rng.uniform(0.1, 1.0, m) if with_scale else np.ones(m)
        add = rng.uniform(-1e-2, 1e-2, m) if with_add else None
        noise = _noise_vector(rng, n, m, with_noise)
        key = int(rng.integers(0, 2**63)) * 2 + 1
        xa = mem.place(x.view(storage), xmis * storage.itemsize)
        oa = mem.place(np.zeros((outer, m, inner), storage), omis * storage.itemsize)
        tasks.append((x, src, scale, add, noise, key, oa, (outer, m, inner), with_noise == "source"))
        specs.append(lay.TaskSpec(x=xa, out=oa, outer=outer, n=n, m=m, inner=inner, src=src, scale=scale,
                                  add=add, noise=noise, key=key, noise_by_source=with_noise == "source"))
    return tasks, specs


@pytest.mark.parametrize("threads,items,grid", [(4, 2, None), (8, 1, 3), (32, 4, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernel_writes_every_element_once_with_the_reference_value(dtype, threads, items, grid):
    rng = np.random.default_rng(7)
    mem = Memory(1 << 20)
    tasks, specs = _build_case(rng, dtype, mem, CASES)
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    layout = lay.build(specs, itemsize=storage.itemsize, compute=compute_of(dtype), threads=threads, items=items)
    emu = Emulator(dtype, threads, items)
    writes = {s.out: np.zeros(s.outer * s.m * s.inner, dtype=np.int64) for s in specs}
    emu.launch(layout, mem, layout.total_tiles if grid is None else grid, writes)
    for (x, src, scale, add, noise, key, oa, shape, by_source) in tasks:
        assert np.all(writes[oa] == 1), "an output element was written never or twice"
        got = mem.view(oa, storage, int(np.prod(shape))).reshape(shape)
        want = _reference.gather(x, src, scale, add, noise, key, by_source).view(storage)
        np.testing.assert_array_equal(got, want)
    assert emu.wide_loads > 0 and emu.wide_stores > 0


def test_emulated_kernel_loads_the_old_units_sixteen_bytes_at_a_time():
    # float32 rows of 16 old + 8 new units: every vector of the old prefix is one load
    rng = np.random.default_rng(3)
    mem = Memory(1 << 16)
    outer, n = 6, 16
    src = np.concatenate([np.arange(n), [4, 5, 6, 7, 12, 13, 14, 15]]).astype(np.int64)
    x = rng.standard_normal((outer, n, 1)).astype(np.float32)
    spec = lay.TaskSpec(x=mem.place(x), out=mem.place(np.zeros((outer, 24, 1), np.float32)), outer=outer, n=n,
                        m=24, inner=1, src=src, scale=np.ones(24))
    layout = lay.build([spec], itemsize=4, compute=np.float32, threads=4, items=2)
    emu = Emulator("float32", 4, 2)
    writes = {spec.out: np.zeros(outer * 24, np.int64)}
    emu.launch(layout, mem, layout.total_tiles, writes)
    assert np.all(writes[spec.out] == 1)
    assert emu.wide_loads == outer * 6  # 4 old-unit vectors and the runs 4..7, 12..15
    assert emu.wide_stores == outer * 6
    got = mem.view(spec.out, np.float32, outer * 24).reshape(outer, 24, 1)
    np.testing.assert_array_equal(got, x[:, src, :])


def test_emulated_index_arithmetic_past_two_to_the_32_elements():
    # Tiles at the far end of a tensor of 5e9 elements: row/column arithmetic in 64 bits,
    # 32-bit divisions only where they fit (u32 asserts it).
    for (outer, m, inner) in [(1, 5, 1_000_000_007), (50_000_000, 100, 1), (70_000, 7, 10_007),
                              (5_000_000_000, 1, 1)]:
        total = outer * m * inner
        for threads, items in [(256, 4), (32, 1)]:
            emu = Emulator("float16", threads, items)
            ntiles = -(-total // emu.tile)
            L = m * inner
            for tile in (0, 1, ntiles // 3, ntiles - 2, ntiles - 1):
                base = tile * emu.tile
                o0, c0 = divmod(base, L)
                for rel in range(0, emu.tile, emu.vec * 97):
                    if base + rel >= total:
                        break
                    o, c = emu.locate_row(c0 + rel, L, o0)
                    j, i = emu.locate_col(c, inner, L)
                    assert ((o * m + j) * inner + i) == base + rel
                    assert 0 <= j < m and 0 <= i < inner and 0 <= o < outer


# ---------------------------------------------------------------------------
# kernels/split.cu itself, compiled for the CPU: one std::thread per CUDA thread
# ---------------------------------------------------------------------------

HOST_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct FsDim3 { unsigned int x; };
static FsDim3 blockIdx, gridDim;
static thread_local FsDim3 threadIdx;
static std::barrier<>* fs_barrier;
inline void __syncthreads() { fs_barrier->arrive_and_wait(); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

#include "split.cu"

typedef void (*fs_kernel)(const char*, long long, long long);

extern "C" int fs_launch(int dtype, const char* blob, long long ntasks, long long total_tiles, int grid) {
    fs_kernel fns[16] = {fastsplit_split_float16, fastsplit_split_bfloat16, fastsplit_split_float32,
                         fastsplit_split_float64, fastsplit_split2_float16, fastsplit_split2_bfloat16,
                         fastsplit_split2_float32, fastsplit_split2_float64,
                         fastsplit_split_exact_float16, fastsplit_split_exact_bfloat16,
                         fastsplit_split_exact_float32, fastsplit_split_exact_float64,
                         fastsplit_split2_exact_float16, fastsplit_split2_exact_bfloat16,
                         fastsplit_split2_exact_float32, fastsplit_split2_exact_float64};
    fs_kernel fn = fns[dtype];
    std::barrier<> bar(FS_THREADS);
    fs_barrier = &bar;
    gridDim.x = grid;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::vector<std::thread> threads;
        for (int t = 0; t < FS_THREADS; ++t)
            threads.emplace_back([=] { threadIdx.x = t; fn(blob, ntasks, total_tiles); });
        for (auto& th : threads) th.join();
    }
    return FS_THREADS * 1000 + FS_ITEMS;
}
"""

HOST_PRIMITIVES = r"""
inline float f16_to_f32(u16 h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline u16 f32_to_f16(float f) { _Float16 v = (_Float16)f; u16 h; std::memcpy(&h, &v, 2); return h; }
inline float mul_rn(float a, float b) { return a * b; }
inline float add_rn(float a, float b) { return a + b; }
inline void narrow(double v, float& r) { r = (float)v; }
"""


@pytest.fixture(scope="module", params=[(32, 2), (256, 4)], ids=lambda p: f"threads{p[0]}-items{p[1]}")
def host_kernel(request, tmp_path_factory):
    """kernels/split.cu built with g++ as a shared library: ``(launch, threads, items)``."""
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: cannot run kernels/split.cu on the CPU")
    threads, items = request.param
    d = tmp_path_factory.mktemp(f"host_kernel_{threads}_{items}")
    (d / "split.cu").write_text(cupy_cuda.kernel_source(), encoding="utf-8")
    (d / "host_primitives.h").write_text(HOST_PRIMITIVES, encoding="utf-8")
    (d / "harness.cpp").write_text(HOST_PRELUDE, encoding="utf-8")
    lib = d / "libsplit.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-ffp-contract=off", "-pthread", "-shared", "-fPIC",
           f"-DFS_THREADS={threads}", f"-DFS_ITEMS={items}", '-DFS_HOST_PRIMITIVES="host_primitives.h"',
           f"-I{d}", str(d / "harness.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    so.fs_launch.restype = ctypes.c_int
    so.fs_launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
    assert so.fs_launch(2, None, 0, 0, 0) == threads * 1000 + items
    return so.fs_launch, threads, items


def _host_buffers(rng, dtype, cases):
    """numpy arrays standing in for device memory, misaligned as the cases ask."""
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    out = []
    for (outer, n, extra, inner, xmis, omis, with_add, with_noise, with_scale) in cases:
        src = random_src(rng, n, extra)
        m = len(src)
        x = rng.standard_normal((outer, n, inner)).astype(as_dtype(dtype))
        xbuf = np.zeros(x.size + 16, dtype=storage)
        start = (-xbuf.ctypes.data // storage.itemsize) % (16 // storage.itemsize) + xmis  # aligned + xmis
        xv = xbuf[start:start + x.size]
        xv[...] = x.view(storage).reshape(-1)
        obuf = np.full(outer * m * inner + 16, 0x55, dtype=storage)
        ostart = (-obuf.ctypes.data // storage.itemsize) % (16 // storage.itemsize) + omis
        ov = obuf[ostart:ostart + outer * m * inner]
        scale = rng.uniform(0.1, 1.0, m) if with_scale else np.ones(m)
        add = rng.uniform(-1e-2, 1e-2, m) if with_add else None
        noise = _noise_vector(rng, n, m, with_noise)
        key = int(rng.integers(0, 2**62)) * 4 + 3
        spec = lay.TaskSpec(x=xv.ctypes.data, out=ov.ctypes.data, outer=outer, n=n, m=m, inner=inner, src=src,
                            scale=scale, add=add, noise=noise, key=key, noise_by_source=with_noise == "source")
        out.append((spec, x, xbuf, ov, obuf))
    return out


HOST_CASES = CASES + [
    (33, 97, 40, 1, 0, 0, False, False, True),
    (3, 50, 25, 37, 1, 0, True, False, True),
    (1, 1025, 500, 1, 0, 1, False, False, False),
    (9, 64, 32, 64, 0, 0, False, False, True),
    (2, 300, 100, 1, 0, 0, False, True, False),
]


@pytest.mark.parametrize("grid", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_source_on_the_cpu_matches_the_reference(host_kernel, dtype, grid):
    launch, threads, items = host_kernel
    rng = np.random.default_rng(17)
    bufs = _host_buffers(rng, dtype, HOST_CASES)
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    layout = lay.build([b[0] for b in bufs], itemsize=storage.itemsize, compute=compute_of(dtype),
                       threads=threads, items=items)
    g = layout.total_tiles if grid is None else min(grid, layout.total_tiles)
    launch(DTYPES.index(dtype), layout.blob.ctypes.data, layout.ntasks, layout.total_tiles, g)
    for spec, x, _xbuf, ov, obuf in bufs:
        want = _reference.gather(x, spec.src, spec.scale, spec.add, spec.noise, spec.key, spec.noise_by_source)
        got = ov.reshape(want.shape)
        if spec.noise is None:
            np.testing.assert_array_equal(got, want.view(storage))
        else:  # glibc's log/cos against numpy's
            assert_noise_close(got.view(as_dtype(dtype)), want, dtype)
        # nothing written outside out
        before = obuf[: (ov.ctypes.data - obuf.ctypes.data) // storage.itemsize]
        after = obuf[(ov.ctypes.data - obuf.ctypes.data) // storage.itemsize + ov.size:]
        assert np.all(before == storage.type(0x55)) and np.all(after == storage.type(0x55))


def test_kernel_source_rounds_to_nearest_even_on_ties(host_kernel):
    # 1 + add lands exactly halfway between two bfloat16 (and float16) neighbours
    launch, threads, items = host_kernel
    for dtype, half_ulp in (("bfloat16", 2.0**-8), ("float16", 2.0**-11)):
        storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        m = 64
        x = np.ones((3, 1, 1), dtype=as_dtype(dtype))
        add = np.arange(m) * 2 * half_ulp + half_ulp
        xv = np.ascontiguousarray(x.view(storage))
        ov = np.zeros((3, m, 1), dtype=storage)
        spec = lay.TaskSpec(x=xv.ctypes.data, out=ov.ctypes.data, outer=3, n=1, m=m, inner=1,
                            src=np.zeros(m, np.int64), scale=np.ones(m), add=add)
        layout = lay.build([spec], itemsize=2, compute=np.float32, threads=threads, items=items)
        launch(DTYPES.index(dtype), layout.blob.ctypes.data, layout.ntasks, layout.total_tiles, layout.total_tiles)
        want = _reference.gather(x, spec.src, spec.scale, add).view(storage)
        np.testing.assert_array_equal(ov, want)
        assert len(np.unique(ov)) == m // 2 + 1  # ties went to the even neighbour, not all up


class FakeCupy:
    """Just enough of CuPy for cupy_cuda.run, on host memory, launching the g++-built kernel."""

    class ndarray(np.ndarray):  # noqa: N801 - the name cupy_cuda checks with isinstance
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

        @property
        def device(self):
            return types.SimpleNamespace(id=0)

    #: kernel name (NVRTC name expression or fatbin name) -> index of fs_launch's table:
    #: dtype + 4 for two axes + 8 for the instance without draws
    NAMES = {
        name: k + (4 if two else 0) + (0 if draws == "true" else 8)
        for k, (dt, tr) in enumerate([("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32"), ("float64", "F64")])
        for two in ("", "2")
        for draws, exact in (("true", ""), ("false", "_exact"))
        for name in (f"fastsplit_split{two}<fs::{tr}, {draws}>", f"fastsplit_split{two}{exact}_{dt}")
    }

    def __init__(self, launch, threads, items):
        self.launches = []
        self.modules = []
        fake = self

        class Device:
            def __init__(self, device=None):
                self.id = 0 if device is None else device

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class RawModule:
            def __init__(self, code=None, options=(), name_expressions=None, path=None):
                fake.modules.append(("path" if path else "nvrtc", options, name_expressions))
                if code is not None:
                    assert "-std=c++17" in options
                    assert f"-DFS_THREADS={threads}" in options and f"-DFS_ITEMS={items}" in options
                    assert "fastsplit_split" in code and len(name_expressions) == 1

            def get_function(self, name):
                dtype = FakeCupy.NAMES[name]

                def kernel(grid, block, args):
                    blob, ntasks, total_tiles = args
                    assert block == (threads,) and isinstance(blob, FakeCupy.ndarray)
                    assert isinstance(ntasks, np.int64) and isinstance(total_tiles, np.int64)
                    fake.launches.append((dtype, grid[0], int(total_tiles)))
                    launch(dtype, blob.ctypes.data, int(ntasks), int(total_tiles), grid[0])

                return kernel

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=Device)

    def asarray(self, a):
        return np.array(a, copy=True).view(FakeCupy.ndarray)


def test_backend_glue_on_the_cpu(host_kernel, monkeypatch):
    """cupy_cuda.run end to end with a stand-in CuPy: checks, grouping, layout, launch arguments."""
    import sys

    from fastsplit import SplitError

    launch, threads, items = host_kernel
    fake = FakeCupy(launch, threads, items)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_cuda, "_kernels", {})
    monkeypatch.setattr(cupy_cuda, "_modules", {})
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", threads)
    monkeypatch.setattr(_config, "CUDA_VECTORS_PER_THREAD", items)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 3)
    rng = np.random.default_rng(23)
    tasks, refs = [], []
    for k in range(40):
        dtype = DTYPES[k % 4]
        storage = np.dtype(np.int16 if k % 8 == 1 else np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        n = int(rng.integers(1, 30))
        src = random_src(rng, n, int(rng.integers(0, n + 1)))
        m = len(src)
        outer, inner = int(rng.integers(0, 5)), int(rng.integers(1, 5))
        x = rng.standard_normal((outer, n, inner)).astype(as_dtype(dtype))
        scale = rng.uniform(0.2, 1, m)
        add = rng.uniform(-1, 1, m) if k % 3 == 0 else None
        noise = None
        t = Task(x=np.ascontiguousarray(x.view(storage)).view(FakeCupy.ndarray),
                 out=np.zeros((outer, m, inner), storage).view(FakeCupy.ndarray), src=src, scale=scale, add=add,
                 noise=noise, key=k, dtype=dtype, runs=column_runs(src))
        tasks.append(t)
        refs.append(_reference.gather(x, src, scale, add).view(storage))
    cupy_cuda.run(tasks)
    assert sorted(d for d, _, _ in fake.launches) == [8, 9, 10, 11]  # one per dtype, the instances without draws
    assert all(g == min(3, total) for _, g, total in fake.launches)
    for t, want in zip(tasks, refs, strict=True):
        np.testing.assert_array_equal(np.asarray(t.out), want)
    assert len(cupy_cuda._kernels) == 4
    cupy_cuda.run(tasks[:4])
    assert len(fake.modules) in (1, 4)  # compiled once per dtype (or one fatbin), then cached

    bad = Task(x=np.zeros((1, 2, 1), np.float32), out=np.zeros((1, 2, 1), np.float32).view(FakeCupy.ndarray),
               src=np.arange(2), scale=np.ones(2), add=None, noise=None, key=0, dtype="float32")
    with pytest.raises(SplitError, match="needs CuPy arrays"):
        cupy_cuda.run([bad])
    bad.x = np.zeros((1, 2, 1), np.float64).view(FakeCupy.ndarray)
    with pytest.raises(SplitError, match="must be stored as float32"):
        cupy_cuda.run([bad])
    bad.x = np.zeros((1, 3, 1), np.float32).view(FakeCupy.ndarray)
    bad.out = np.zeros((1, 3, 1), np.float32).view(FakeCupy.ndarray)
    with pytest.raises(SplitError, match="out has shape"):
        cupy_cuda.run([bad])


def test_backend_module_imports_without_cupy_and_says_why():
    ok, why = cupy_cuda.available()
    if GPU_SKIP is not None:
        assert not ok and why
    assert isinstance(why, str) and why
    assert "fastsplit_split" in cupy_cuda.kernel_source()


# ---------------------------------------------------------------------------
# tasks split on two axes: layout, and kernels/split.cu's fastsplit_split2 on the CPU
# ---------------------------------------------------------------------------

#: (outer, nA, extra A, mid, nB, extra B, inner, x misalignment, out misalignment, rows first,
#:  rows (scale, add, noise), columns (scale, add, noise))
TWO_CASES = [
    (1, 13, 7, 1, 17, 9, 1, 0, 0, True, (True, False, False), (False, False, False)),  # Dense: outgoing x incoming
    (1, 16, 8, 1, 16, 8, 1, 0, 0, False, (True, False, False), (True, False, False)),  # moments, columns first
    (3, 5, 3, 2, 7, 4, 3, 1, 0, True, (False, True, False), (True, False, False)),  # mid and inner, misaligned x
    (2, 6, 2, 3, 9, 5, 1, 0, 1, False, (True, False, True), (False, True, False)),  # noise on the second step
    (2, 4, 3, 1, 11, 6, 2, 0, 0, True, (False, False, True), (True, False, True)),  # noise on both steps
    (0, 4, 2, 1, 3, 1, 1, 0, 0, True, (True, False, False), (True, False, False)),  # empty
    (4, 1, 2, 1, 1, 2, 1, 0, 0, False, (True, True, False), (True, True, False)),  # single units
    (1, 97, 40, 1, 33, 20, 1, 0, 0, True, (True, False, False), (False, False, False)),  # many tiles
    (2, 3, 1, 1, 64, 32, 16, 0, 0, False, (True, False, False), (True, False, False)),  # inner 16: wide loads
    (3, 7, 0, 2, 5, 0, 8, 0, 0, True, (False, False, False), (False, False, False)),  # identity on both axes
    # noise drawn by source ("direction"), on either step, rows first or not
    (2, 6, 2, 3, 9, 5, 1, 0, 1, False, (True, False, False), (False, False, "source")),
    (2, 6, 2, 3, 9, 5, 2, 0, 0, True, (True, False, False), (False, False, "source")),
    (3, 5, 3, 2, 7, 4, 3, 1, 0, True, (False, False, "source"), (True, True, False)),
    (3, 5, 3, 2, 7, 4, 3, 0, 0, False, (False, False, "source"), (True, False, True)),
    (2, 4, 3, 1, 11, 6, 2, 0, 0, False, (False, False, "source"), (True, False, "source")),
]


def _vectors(rng, n, m, flags):
    with_scale, with_add, with_noise = flags
    scale = rng.uniform(0.1, 1.0, m) if with_scale else np.ones(m)
    add = rng.uniform(-1e-2, 1e-2, m) if with_add else None
    noise = _noise_vector(rng, n, m, with_noise)
    return scale, add, noise, int(rng.integers(0, 2**62)) * 4 + 1, with_noise == "source"


def _two_axis_buffers(rng, dtype, cases):
    """Host arrays standing in for device memory, the specs, and the reference Task of each case."""
    from fastsplit._gather import Rows

    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    vec = 16 // storage.itemsize
    out = []
    for (outer, na, ea, mid, nb, eb, inner, xmis, omis, first, rflags, cflags) in cases:
        rsrc, csrc = random_src(rng, na, ea), random_src(rng, nb, eb)
        ma, mb = len(rsrc), len(csrc)
        x = rng.standard_normal((outer, na, mid, nb, inner)).astype(as_dtype(dtype))
        xbuf = np.zeros(x.size + 16, dtype=storage)
        start = (-xbuf.ctypes.data // storage.itemsize) % vec + xmis
        xv = xbuf[start:start + x.size]
        xv[...] = x.view(storage).reshape(-1)
        size = outer * ma * mid * mb * inner
        obuf = np.full(size + 16, 0x55, dtype=storage)
        ostart = (-obuf.ctypes.data // storage.itemsize) % vec + omis
        ov = obuf[ostart:ostart + size]
        rscale, radd, rnoise, rkey, rby = _vectors(rng, na, ma, rflags)
        scale, add, noise, key, by = _vectors(rng, nb, mb, cflags)
        rows = lay.RowSpec(na=na, mid=mid, src=rsrc, scale=rscale, add=radd, noise=rnoise, key=rkey, first=first,
                           noise_by_source=rby)
        spec = lay.TaskSpec(x=xv.ctypes.data, out=ov.ctypes.data, outer=outer, n=nb, m=mb, inner=inner, src=csrc,
                            scale=scale, add=add, noise=noise, key=key, rows=rows, noise_by_source=by)
        want = np.zeros((outer, ma, mid, mb, inner), dtype=x.dtype)
        _reference.run([Task(x, want, csrc, scale, add, noise, key, dtype, column_runs(csrc),
                             Rows(rsrc, rscale, radd, rnoise, rkey, first, column_runs(rsrc), rby), by)])
        out.append((spec, want, ov, obuf, xbuf))  # xbuf: the kernel reads it through an address
    return out


def test_two_axis_rows_in_the_table():
    rng = np.random.default_rng(31)
    bufs = _two_axis_buffers(rng, "float32", TWO_CASES)
    specs = [b[0] for b in bufs]
    L = lay.build(specs, itemsize=4, compute=np.float32, threads=4, items=2)
    fld, t = lay.F, L.table
    assert L.order == tuple(k for k in range(len(TWO_CASES)) if k != 5)  # the empty case is left out
    for row, k in enumerate(L.order):
        s = specs[k]
        r = s.rows
        ma = len(r.src)
        assert t[row, fld["outer"]] == s.outer * ma * r.mid == s.out_rows
        assert t[row, fld["total"]] == s.outer * ma * r.mid * s.m * s.inner
        assert tuple(t[row, [fld["na"], fld["ma"], fld["mid"]]]) == (r.na, ma, r.mid)
        flags = t[row, fld["flags"]]
        assert flags & lay.F_TWO and bool(flags & lay.F_RFIRST) == r.first
        assert bool(flags & lay.F_RSCALE) == bool(np.any(r.scale != 1))
        assert bool(flags & lay.F_RADD) == (r.add is not None)
        assert bool(flags & lay.F_RNOISE) == (r.noise is not None)
        assert bool(flags & lay.F_RNSRC) == (r.noise is not None and r.noise_by_source)
        assert bool(flags & lay.F_NSRC) == (s.noise is not None and s.noise_by_source)
        rsrc = L.blob[t[row, fld["rsrc"]]:][: 8 * ma].view(np.int64)
        np.testing.assert_array_equal(rsrc, r.src)
        if r.noise is not None:
            np.testing.assert_array_equal(L.blob[t[row, fld["rnoise"]]:][: 8 * ma].view(np.float64), r.noise)
        assert np.array(t[row, fld["rkey"]]).view(np.uint64) == r.key
    bad = dataclasses.replace(specs[0], rows=dataclasses.replace(specs[0].rows, src=np.array([0, 13])))
    with pytest.raises(ValueError, match=r"rows.src must lie in \[0, 13\)"):
        lay.build([bad], itemsize=4, compute=np.float32, threads=4, items=2)


@pytest.mark.parametrize("grid", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_axis_kernel_source_on_the_cpu_matches_the_reference(host_kernel, dtype, grid):
    """fastsplit_split2 of kernels/split.cu, built with g++, against two reference gathers through an intermediate."""
    launch, threads, items = host_kernel
    rng = np.random.default_rng(19)
    bufs = _two_axis_buffers(rng, dtype, TWO_CASES)
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    layout = lay.build([b[0] for b in bufs], itemsize=storage.itemsize, compute=compute_of(dtype),
                       threads=threads, items=items)
    g = layout.total_tiles if grid is None else min(grid, layout.total_tiles)
    launch(4 + DTYPES.index(dtype), layout.blob.ctypes.data, layout.ntasks, layout.total_tiles, g)
    for spec, want, ov, obuf, _xbuf in bufs:
        got = ov.reshape(want.shape)
        if spec.noise is None and spec.rows.noise is None:
            np.testing.assert_array_equal(got, want.view(storage))
        else:  # glibc's log/cos against numpy's
            assert_noise_close(got.view(as_dtype(dtype)), want, dtype)
        offset = (ov.ctypes.data - obuf.ctypes.data) // storage.itemsize
        assert np.all(obuf[:offset] == storage.type(0x55)) and np.all(obuf[offset + ov.size:] == storage.type(0x55))


def test_backend_glue_with_two_axis_tasks(host_kernel, monkeypatch):
    """cupy_cuda.run with one- and two-axis tasks of two dtypes: one launch per (dtype, kind), right values."""
    import sys

    from fastsplit import Job, plan
    from fastsplit._gather import _check, _prepare
    from fastsplit.interop import Native

    launch, threads, items = host_kernel
    fake = FakeCupy(launch, threads, items)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_cuda, "_kernels", {})
    monkeypatch.setattr(cupy_cuda, "_modules", {})
    monkeypatch.setattr(cupy_cuda, "_fatbin", lambda threads, items: None)
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", threads)
    monkeypatch.setattr(_config, "CUDA_VECTORS_PER_THREAD", items)
    rng = np.random.default_rng(29)
    p, q = plan(9, [1, 4, 4], symmetry="nudge"), plan(11, [0, 10], symmetry="none")
    jobs = []
    for dtype in ("float32", "float16"):
        w = rng.standard_normal((9, 11)).astype(dtype)
        jobs += [Job(w, p, 0, "outgoing", also=(q, 1, "incoming")), Job(w, q, 1, "moment2", also=(p, 0, "moment1")),
                 Job(w, p, 0, "outgoing"), Job(rng.standard_normal((2, 9, 3, 11)).astype(dtype), q, -1, "bias",
                                                also=(p, 1, "outgoing"))]
    tasks, wants = [], []
    for j in jobs:
        native = Native(j.x, "numpy", ("cpu", 0))
        task = _prepare(j, native, _check(j, native, 0, False)).task
        want = np.empty_like(task.out)
        _reference.run([dataclasses.replace(task, out=want)])
        task.x = task.x.view(FakeCupy.ndarray)
        task.out = np.zeros_like(task.out).view(FakeCupy.ndarray)
        tasks.append(task)
        wants.append(want)
    cupy_cuda.run(tasks)
    # per dtype: one one-axis and one two-axis launch, of the instances without draws
    assert sorted(d for d, _, _ in fake.launches) == [8, 10, 12, 14]
    for t, want in zip(tasks, wants, strict=True):
        np.testing.assert_array_equal(np.asarray(t.out), want)
    names = [n for _, _, n in fake.modules]
    assert ["fastsplit_split2<fs::F32, false>"] in names and ["fastsplit_split<fs::F16, false>"] in names


@pytest.mark.slow
def test_kernel_source_compiles_with_nvcc(tmp_path):
    """nvcc (when installed) compiles kernels/split.cu as the CMake fatbin does, without spilling registers."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "split.cu"
    src.write_text(cupy_cuda.kernel_source(), encoding="utf-8")
    done = subprocess.run([nvcc, "-std=c++17", "-O3", "-DFASTSPLIT_INSTANTIATE", "-arch=sm_80", "-cubin",
                           "-Xptxas", "-v", str(src), "-o", str(tmp_path / "split.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stderr
    for two in ("", "2"):
        for dtype in DTYPES:
            assert f"fastsplit_split{two}_{dtype}" in report
    assert " 0 bytes spill" in report and not any(
        "spill stores" in line and not line.strip().startswith("0 bytes") and " 0 bytes spill stores" not in line
        for line in report.splitlines())


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


def ulp(values, dtype):
    """Spacing of the output dtype at each value (normal range)."""
    mant = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}[dtype]
    a = np.maximum(np.abs(np.asarray(values, dtype=np.float64)), np.finfo(np.float64).tiny)
    return np.exp2(np.floor(np.log2(a)) - mant)


def assert_noise_close(got, want, dtype, base=None):
    """Within an ulp of the reference; with ``base`` (the same split without the draws), within an ulp
    of the larger of the result and the draw: CUDA's log and cos differ from the host's by float64
    ulps, which can round the draw to the next float32, and where the draw cancels most of the value
    that ulp of the draw is many ulps of the result (seen on an H100: 256 ulps of a small result)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    size = want if base is None else np.maximum(np.abs(want), np.abs(want - np.asarray(base, np.float64)))
    tol = ulp(size, dtype) * (1 if base is None else 2)
    if dtype == "float64":  # log/cos of CUDA and of numpy differ by a few float64 ulps
        tol = 8 * tol + 1e-15
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=f"needs a CUDA GPU with CuPy: {GPU_SKIP}")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _cupy(self):
        self.cp = pytest.importorskip("cupy")

    def storage(self, dtype):
        return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)

    def task(self, x, src, scale, add=None, noise=None, key=0, dtype=None, x_offset=0, out_offset=0,
             noise_by_source=False):
        """A Task on the GPU; ``*_offset`` elements of misalignment (views into larger buffers)."""
        cp = self.cp
        st = self.storage(dtype)
        outer, n, inner = x.shape
        m = len(src)
        xbuf = cp.zeros(x.size + x_offset, dtype=st)
        xbuf[x_offset:] = cp.asarray(np.ascontiguousarray(x).view(st).reshape(-1))
        obuf = cp.full(outer * m * inner + out_offset, 0x7E00 if st.itemsize == 2 else -1, dtype=st)
        return Task(x=xbuf[x_offset:].reshape(outer, n, inner), out=obuf[out_offset:].reshape(outer, m, inner),
                    src=np.asarray(src, np.int64), scale=np.asarray(scale, np.float64), add=add, noise=noise,
                    key=key, dtype=dtype, runs=column_runs(np.asarray(src, np.int64)), noise_by_source=noise_by_source)

    def fetch(self, task, dtype):
        return self.cp.asnumpy(task.out).view(as_dtype(dtype))

    def check(self, task, x, dtype):
        want = _reference.gather(x, task.src, task.scale, task.add, task.noise, task.key, task.noise_by_source)
        got = self.fetch(task, dtype)
        if task.noise is None:
            np.testing.assert_array_equal(got.view(self.storage(dtype)), want.view(self.storage(dtype)))
        else:
            assert_noise_close(got, want, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_every_case_matches_the_reference(self, dtype):
        rng = np.random.default_rng(11)
        tasks, xs = [], []
        for (outer, n, extra, inner, xmis, omis, with_add, with_noise, with_scale) in CASES:
            src = random_src(rng, n, extra)
            m = len(src)
            x = rng.standard_normal((outer, n, inner)).astype(as_dtype(dtype))
            scale = rng.uniform(0.1, 1.0, m) if with_scale else np.ones(m)
            add = rng.uniform(-1e-2, 1e-2, m) if with_add else None
            noise = _noise_vector(rng, n, m, with_noise)
            tasks.append(self.task(x, src, scale, add, noise, key=int(rng.integers(2**62)), dtype=dtype,
                                   x_offset=xmis, out_offset=omis, noise_by_source=with_noise == "source"))
            xs.append(x)
        cupy_cuda.run(tasks)
        self.cp.cuda.get_current_stream().synchronize()
        for t, x in zip(tasks, xs, strict=True):
            self.check(t, x, dtype)

    @pytest.mark.parametrize("shape,axis,width,role,channels", [
        ((4096, 97), 1, 97, "incoming", "last"),
        ((97, 1025), 0, 97, "outgoing", "last"),
        ((3, 3, 64, 96), 3, 96, "incoming", "last"),
        ((3, 3, 96, 40), 2, 96, "outgoing", "last"),
        ((7 * 7 * 24, 33), 0, 24, "outgoing", "last"),
        ((24 * 49, 33), 0, 24, "outgoing", "first"),
        ((1025,), 0, 1025, "bias", "last"),
        ((1025, 8), 0, 1025, "moment2", "last"),
        ((5, 1025), 1, 1025, "moment1", "last"),
    ])
    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    def test_split_through_the_public_api(self, shape, axis, width, role, channels, dtype):
        import fastsplit

        cp = self.cp
        rng = np.random.default_rng(5)
        p = fastsplit.plan(width, rng.integers(0, width, width // 3), symmetry="nudge", seed=3)
        x = rng.standard_normal(shape).astype(dtype)
        got = fastsplit.split(cp.asarray(x), p, axis, role=role, channels=channels, backend="cupy")
        want = fastsplit.split(x, p, axis, role=role, channels=channels, backend="numpy")
        assert isinstance(got, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(got), want)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_noise_plan_through_the_public_api(self, dtype):
        import fastsplit

        if dtype == "bfloat16":
            pytest.skip("CuPy has no bfloat16 arrays; bfloat16 is covered through Task objects")
        cp = self.cp
        rng = np.random.default_rng(6)
        chosen = rng.integers(0, 300, 120)
        p = fastsplit.plan(300, chosen, symmetry="noise", sigma=0.05, seed=9)
        x = rng.standard_normal((257, 300)).astype(dtype)
        got = cp.asnumpy(fastsplit.split(cp.asarray(x), p, -1, role="incoming", backend="cupy"))
        want = fastsplit.split(x, p, -1, role="incoming", backend="numpy")
        base = fastsplit.split(x, fastsplit.plan(300, chosen, symmetry="none"), -1, role="incoming", backend="numpy")
        np.testing.assert_array_equal(got[:, :300], want[:, :300])  # old units: no noise
        assert_noise_close(got, want, dtype, base)

    @pytest.mark.parametrize("symmetry", ["none", "nudge", "noise", "asymmetric", "direction", "fresh"])
    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    def test_every_symmetry_and_role_gives_the_cpu_result(self, symmetry, dtype):
        """The GPU split of every symmetry equals the numpy reference: exactly, and draws within an ulp."""
        import fastsplit

        cp = self.cp
        rng = np.random.default_rng(13)
        width = 203
        src = rng.choice(width, 90, replace=False)
        p = fastsplit.plan(width, src, symmetry=symmetry, seed=21)
        plain = fastsplit.plan(width, src, symmetry="none")
        for shape, axis, role in [((129, width), 1, "incoming"), ((width, 65), 0, "outgoing"), ((width,), 0, "bias"),
                                  ((3, 3, 17, width), 3, "moment1"), ((width, 33), 0, "moment2"),
                                  ((width, 9), 0, "copy")]:
            x = rng.standard_normal(shape).astype(dtype)
            if role == "moment2":
                x = np.abs(x)
            got = cp.asnumpy(fastsplit.split(cp.asarray(x), p, axis, role=role, backend="cupy"))
            want = fastsplit.split(x, p, axis, role=role, backend="numpy")
            if symmetry in ("noise", "direction", "fresh"):  # the draws: within an ulp; the rest exactly
                assert_noise_close(got, want, dtype, fastsplit.split(x, plain, axis, role=role, backend="numpy"))
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{symmetry} {role}")

    def test_torch_and_jax_gpu_tensors_in_and_out(self):
        """Framework tensors on the GPU go in and come out through DLPack, on the GPU, with the reference values."""
        import fastsplit

        rng = np.random.default_rng(14)
        p = fastsplit.plan(64, rng.integers(0, 64, 30), symmetry="nudge", seed=1)
        x = rng.standard_normal((48, 64)).astype(np.float32)
        want = fastsplit.split(x, p, 1, role="incoming", backend="numpy")
        tried = 0
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and torch.cuda.is_available():
            tried += 1
            got = fastsplit.split(torch.from_numpy(x).cuda(), p, 1, role="incoming")
            assert isinstance(got, torch.Tensor) and got.is_cuda
            np.testing.assert_array_equal(got.cpu().numpy(), want)
            b16 = torch.from_numpy(x).cuda().to(torch.bfloat16)
            got = fastsplit.split(b16, p, 1, role="incoming")
            assert got.dtype == torch.bfloat16 and got.is_cuda
            ref = fastsplit.split(b16.float().cpu().numpy().astype(as_dtype("bfloat16")), p, 1, role="incoming",
                                  backend="numpy")
            np.testing.assert_array_equal(got.view(torch.int16).cpu().numpy().view(np.uint16), ref.view(np.uint16))
        try:
            import jax
        except ImportError:
            jax = None
        if jax is not None and jax.default_backend() == "gpu":
            tried += 1
            got = fastsplit.split(jax.numpy.asarray(x), p, 1, role="incoming")
            assert list(got.devices())[0].platform == "gpu"
            np.testing.assert_array_equal(np.asarray(got), want)
        if not tried:
            pytest.skip("neither PyTorch nor JAX sees the GPU")

    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    def test_two_axis_jobs_through_the_public_api(self, dtype):
        """Dense, Conv and Flatten kernels split on both axes in one launch, against the numpy reference."""
        import fastsplit
        from fastsplit import Job

        cp = self.cp
        rng = np.random.default_rng(12)
        p = fastsplit.plan(97, rng.integers(0, 97, 40), symmetry="nudge")
        q_units = rng.integers(0, 1025, 300)
        q = fastsplit.plan(1025, q_units, symmetry="noise", sigma=0.05, seed=4)
        w = rng.standard_normal((97, 1025)).astype(dtype)
        conv = rng.standard_normal((3, 3, 97, 1025)).astype(dtype)
        flat = rng.standard_normal((97 * 9, 1025)).astype(dtype)
        specs = [(w, p, 0, "outgoing", "last", (q, 1, "copy")), (np.abs(w), q, 1, "moment2", "last", (p, 0, "moment2")),
                 (conv, p, 2, "moment1", "last", (q, 3, "moment1")), (flat, q, 1, "copy", "last", (p, 0, "outgoing", "first")),
                 (w, p, 0, "outgoing", "last", (q, 1, "incoming"))]
        got = fastsplit.split_many([Job(cp.asarray(x), pl, a, r, c, also=al) for x, pl, a, r, c, al in specs],
                                   backend="cupy")
        want = fastsplit.split_many([Job(x, pl, a, r, c, also=al) for x, pl, a, r, c, al in specs], backend="numpy")
        for g, wt in zip(got[:-1], want[:-1], strict=True):
            np.testing.assert_array_equal(cp.asnumpy(g), wt)
        plain = fastsplit.plan(1025, q_units, symmetry="none")
        base = fastsplit.split_many([Job(w, p, 0, "outgoing", "last", also=(plain, 1, "incoming"))], backend="numpy")[0]
        assert_noise_close(cp.asnumpy(got[-1]), want[-1], dtype, base)  # incoming weights of a noise plan

    def test_one_launch_per_dtype(self, monkeypatch):
        calls = []
        real = cupy_cuda._launch
        monkeypatch.setattr(cupy_cuda, "_launch", lambda fn, g, b, a: (calls.append(g), real(fn, g, b, a)))
        rng = np.random.default_rng(2)
        tasks, xs = [], []
        for k in range(120):
            dtype = DTYPES[k % 3]  # float16, bfloat16, float32
            n = int(rng.integers(1, 40))
            src = random_src(rng, n, int(rng.integers(0, n + 1)))
            x = rng.standard_normal((int(rng.integers(1, 6)), n, int(rng.integers(1, 4)))).astype(as_dtype(dtype))
            tasks.append(self.task(x, src, rng.uniform(0.2, 1, len(src)), dtype=dtype))
            xs.append((x, dtype))
        cupy_cuda.run(tasks)
        self.cp.cuda.get_current_stream().synchronize()
        assert len(calls) == 3
        for t, (x, dtype) in zip(tasks, xs, strict=True):
            self.check(t, x, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_shrunk_tiles_and_grid_stride(self, dtype, monkeypatch):
        monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 32)
        monkeypatch.setattr(_config, "CUDA_VECTORS_PER_THREAD", 1)
        monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 5)
        rng = np.random.default_rng(4)
        tasks, xs = [], []
        for (outer, n, extra, inner) in [(33, 97, 40, 1), (3, 50, 25, 37), (1, 1025, 500, 1), (9, 64, 32, 64)]:
            src = random_src(rng, n, extra)
            x = rng.standard_normal((outer, n, inner)).astype(as_dtype(dtype))
            tasks.append(self.task(x, src, rng.uniform(0.2, 1, len(src)), add=rng.uniform(-1, 1, len(src)),
                                   dtype=dtype, x_offset=1, out_offset=0))
            xs.append(x)
        cupy_cuda.run(tasks)
        self.cp.cuda.get_current_stream().synchronize()
        for t, x in zip(tasks, xs, strict=True):
            self.check(t, x, dtype)

    def test_subnormals_are_kept(self):
        # no flush to zero: float32 and bfloat16 subnormals times a scale, as numpy does it
        count = 4096
        patterns = {
            "float32": (np.arange(1, count + 1, dtype=np.uint32) * 2039) % 0x7FFFFF + 1,
            "bfloat16": (np.arange(count, dtype=np.uint16) % 0x7F) + 1,
        }
        for dtype, bits in patterns.items():
            st = self.storage(dtype)
            x = bits.view(as_dtype(dtype)).reshape(-1, 8, 1)
            src = np.array([0, 1, 2, 3, 4, 5, 6, 7, 3, 3], np.int64)
            t = self.task(x, src, np.linspace(0.3, 1.7, 10), add=np.zeros(10), dtype=dtype)
            cupy_cuda.run([t])
            got = self.fetch(t, dtype).view(st)
            want = _reference.gather(x, src, t.scale, t.add).view(st)
            assert np.count_nonzero(want) > want.size // 2
            np.testing.assert_array_equal(got, want)

    def test_bfloat16_as_int16_from_pytorch(self):
        cp = self.cp
        rng = np.random.default_rng(8)
        x = rng.standard_normal((5, 20, 3)).astype(as_dtype("bfloat16"))
        src = random_src(rng, 20, 9)
        t = self.task(x, src, rng.uniform(0.2, 1, len(src)), dtype="bfloat16")
        t.x = t.x.view(cp.int16)
        t.out = t.out.view(cp.int16)
        cupy_cuda.run([t])
        got = cp.asnumpy(t.out).view(np.uint16)
        np.testing.assert_array_equal(got, _reference.gather(x, src, t.scale).view(np.uint16))

    def test_nvrtc_and_fatbin_give_the_same_bits(self, monkeypatch):
        rng = np.random.default_rng(9)
        x = rng.standard_normal((64, 300, 1)).astype(np.float32)
        src = random_src(rng, 300, 100)
        scale, add = rng.uniform(0.2, 1, len(src)), rng.uniform(-1, 1, len(src))

        def once():
            cupy_cuda._kernels.clear()
            t = self.task(x, src, scale, add=add, dtype="float32")
            cupy_cuda.run([t])
            self.check(t, x, "float32")
            return self.fetch(t, "float32")

        with monkeypatch.context() as mp:
            mp.setattr(cupy_cuda, "_fatbin", lambda threads, items: None)
            nvrtc = once()
        if cupy_cuda._fatbin(_config.CUDA_THREADS_PER_BLOCK, _config.CUDA_VECTORS_PER_THREAD) is not None:
            np.testing.assert_array_equal(once(), nvrtc)
        cupy_cuda._kernels.clear()

    def test_bad_tasks_are_refused(self):
        from fastsplit import SplitError

        cp = self.cp
        x = np.ones((2, 3, 1), np.float32)
        t = self.task(x, [0, 1, 2, 0], np.ones(4), dtype="float32")
        t.out = cp.empty((2, 5, 1), cp.float32)
        with pytest.raises(SplitError, match="out has shape"):
            cupy_cuda.run([t])
        t = self.task(x, [0, 1, 2, 0], np.ones(4), dtype="float32")
        t.x = cp.asarray(np.ones((2, 3, 2), np.float32))[:, :, :1]
        with pytest.raises(SplitError, match="C-contiguous"):
            cupy_cuda.run([t])
        t = self.task(x, [0, 1, 2, 0], np.ones(4), dtype="float32")
        t.x = x
        with pytest.raises(SplitError, match="CuPy arrays"):
            cupy_cuda.run([t])

    @pytest.mark.slow
    def test_more_than_two_to_the_32_elements(self):
        cp = self.cp
        free, _ = cp.cuda.runtime.memGetInfo()
        inner = (1 << 30) + 5
        if free < 40 * inner:
            pytest.skip(f"needs about {40 * inner / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
        x = cp.arange(3 * inner, dtype=cp.uint16).view(cp.float16)
        x = cp.where(cp.isfinite(x), x, cp.float16(1.5)).reshape(1, 3, inner)
        src = np.array([0, 1, 2, 1], np.int64)
        for scale in (np.ones(4), np.array([1.0, 0.5, 1.0, 0.5])):
            out = cp.empty((1, 4, inner), cp.float16)
            t = Task(x=x, out=out, src=src, scale=scale, add=None, noise=None, key=0, dtype="float16",
                     runs=column_runs(src))
            cupy_cuda.run([t])
            for j in range(4):
                want = (x[0, src[j]].astype(cp.float32) * cp.float32(scale[j])).astype(cp.float16)
                assert bool((out[0, j].view(cp.uint16) == want.view(cp.uint16)).all()), j
                del want
            del out
