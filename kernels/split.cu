// fastsplit: every tensor of a growth event is a gather along the middle axis of a
// 3-D view, done for all tensors of one dtype in ONE launch.
//
//   out[o, j, i] = x[o, src[j], i] * scale[j] + add[j] + noise[j] * gauss(key, (o*m + j)*inner + i)
//
// computed in float64 for double and in float32 for float, half and bfloat16, with
// every product and sum rounded on its own (no FMA contraction, no flush to zero),
// so the result equals the numpy reference bit for bit (noise: within an ulp).
//
// Launch: a 1-D grid of FS_THREADS-thread blocks walks the tiles of all tasks
// (grid-stride). A tile is FS_THREADS * FS_ITEMS * VEC consecutive elements of
// one task's flat output, VEC = 16 / sizeof(element); thread t of the block
// handles the VEC-element vectors t, t + FS_THREADS, ... of the tile. A block
// finds its task by binary search over the tasks' first tiles.
//
// Everything the kernel reads besides x lives in one device byte buffer `blob`:
// the descriptor table (one Desc per task) at offset 0, then per-column arrays
// referred to by their byte offsets in `blob`. fastsplit/backends/_cuda_layout.py
// builds it. tests/test_cupy_backend.py emulates this kernel in numpy and also
// compiles this very file with g++ (FS_HOST_PRIMITIVES, one std::thread per CUDA
// thread) to check it against the numpy reference without a GPU.
//
// Two axes (F_TWO, kernel fastsplit_split2, launched apart from the one-axis tasks):
// a tensor split on two axes is read as a 5-D view (outer, nA, mid, n, inner) and
// written as (outer, mA, mid, m, inner), in one pass, with no intermediate array.
// Its descriptor describes the output as R = outer * mA * mid rows of (m, inner),
// gathered along the columns like a one-axis task; output row r = (o, a, q) reads
// row (o, rsrc[a], q) of x and takes a second factor (rscale[a], radd[a],
// rnoise[a]). The two steps apply in the job's order (F_RFIRST: the rows first),
// the first step's value rounded to the element type in between, so the result
// equals two one-axis splits; each step's noise is drawn at the element's flat
// index in that step's result (the intermediate for the first step, out for the
// second).
//
// Noise: tasks with F_NOISE go element by element; a column whose noise[j] is 0
// (the original units) gets no draw at all, where the reference adds 0 * gauss,
// which differs only in the sign of a zero result. With F_NSRC (F_RNSRC for the
// rows) the draw is made at the flat index of the element read, (o*n + src[j])*inner + i,
// instead of the element written, so every copy of a unit gets the same draws
// (symmetry "direction"); in a two-axis task that is the index in the step's
// input: x for the first step, the intermediate for the second.
//
// No #include: NVRTC compiles this file as it is. Half and bfloat16 travel as
// 16-bit integers (PTX cvt for half, round-to-nearest-even by hand for bfloat16).
// Compiled by nvcc (the CMake fatbin, or `nvcc -c` for a resource report) it also
// defines extern "C" kernels fastsplit_split_<dtype> and fastsplit_split2_<dtype>, and their
// instances without the draws, fastsplit_split_exact_<dtype> and fastsplit_split2_exact_<dtype>;
// NVRTC (__CUDACC_RTC__) compiles only the template instance it is asked for,
// unless FASTSPLIT_INSTANTIATE.

#ifndef FS_THREADS
#define FS_THREADS 128  // threads per block (the host launches exactly this many)
#endif
#ifndef FS_ITEMS
#define FS_ITEMS 4      // 16-byte vectors per thread per tile
#endif
#ifndef FS_MIN_BLOCKS
#define FS_MIN_BLOCKS 8 // blocks per SM the register budget must allow (__launch_bounds__)
#endif
// The drawing instances need about 96 registers (float64 log/cos); a min-blocks bound that leaves
// fewer would make them spill, so theirs is capped at what 96 registers per thread allow.
#define FS_NOISE_REGS 96
#define FS_NOISE_MIN_BLOCKS_CAP (65536 / (FS_THREADS * FS_NOISE_REGS) > 0 ? 65536 / (FS_THREADS * FS_NOISE_REGS) : 1)
#define FS_MIN_BLOCKS_FOR(NOISE) \
    ((NOISE) && FS_MIN_BLOCKS > FS_NOISE_MIN_BLOCKS_CAP ? FS_NOISE_MIN_BLOCKS_CAP : FS_MIN_BLOCKS)

namespace fs {

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// Flags of a task (Desc::flags); same values in _cuda_layout.py.
enum : i64 {
    F_SCALE = 1,    // multiply by scale[j] (else every scale is 1: skipping is exact)
    F_ADD = 2,      // add add[j]
    F_NOISE = 4,    // add noise[j] * gauss(key, flat index)
    F_XALIGN = 8,   // x address is a multiple of 16 bytes
    F_OALIGN = 16,  // out address is a multiple of 16 bytes
    F_TWO = 32,     // split on two axes: the r* fields describe the gather along the rows
    F_RFIRST = 64,  // ... and it is the first step (else the gather along the columns is)
    F_RSCALE = 128, // multiply by rscale[a]
    F_RADD = 256,   // add radd[a]
    F_RNOISE = 512, // add rnoise[a] * gauss(rkey, flat index)
    F_NSRC = 1024,  // F_NOISE drawn at the flat index of the element read, not written
    F_RNSRC = 2048, // F_RNOISE likewise
};

// One task: 24 int64 fields, 192 bytes (field order as in _cuda_layout.FIELDS).
struct Desc {
    i64 x;           // address of x, C-contiguous (outer, n, inner)
    i64 out;         // address of out, C-contiguous (outer, m, inner)
    i64 outer;
    i64 n;
    i64 m;
    i64 inner;
    i64 src;         // blob offset of int64[m]: source column of each column
    i64 run;         // blob offset of int64[m]: src[j + t] == src[j] + t for t < run[j]
    i64 scale;       // blob offset of compute[m] (F_SCALE only)
    i64 add;         // blob offset of compute[m] (F_ADD only)
    i64 noise;       // blob offset of float64[m] (F_NOISE only)
    i64 key;         // noise generator key (uint64 bits)
    i64 tile_start;  // first tile of this task; tasks are in tile order
    i64 total;       // outer * m * inner, > 0
    i64 flags;
    i64 pad;
    i64 na;          // F_TWO: units of x along the rows (axis 1 of the 5-D view)
    i64 ma;          // F_TWO: units of out along the rows
    i64 mid;         // F_TWO: entries between the two unit axes; outer above is outer * ma * mid
    i64 rsrc;        // F_TWO: blob offset of int64[ma]: source unit of each unit along the rows
    i64 rscale;      // blob offset of compute[ma] (F_RSCALE only)
    i64 radd;        // blob offset of compute[ma] (F_RADD only)
    i64 rnoise;      // blob offset of float64[ma] (F_RNOISE only)
    i64 rkey;        // noise generator key of the rows (uint64 bits)
};

struct alignas(16) Vec16 {
    u32 a, b, c, d;
};

// Arithmetic rounded to nearest even, one operation at a time. The float forms
// are PTX without .ftz: CuPy compiles with -ftz=true, which would flush float32
// subnormals (bfloat16 has them too) where numpy keeps them. ".rn" also keeps
// ptxas from contracting a product and a sum into an FMA. (FS_HOST_PRIMITIVES
// names a header with host versions: tests/test_cupy_backend.py runs this file
// on the CPU.)
#ifdef FS_HOST_PRIMITIVES
#include FS_HOST_PRIMITIVES
#else
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ void narrow(double v, float& r) { asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(v)); }
#endif
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ void narrow(double v, double& r) { r = v; }

// ---- element types: storage S, compute C, VEC elements per 16 bytes ----------

struct F16 {
    typedef u16 S;
    typedef float C;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ float to_c(u16 h) { return f16_to_f32(h); }
    static __device__ __forceinline__ u16 from_c(float f) { return f32_to_f16(f); }
};

struct BF16 {
    typedef u16 S;
    typedef float C;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ float to_c(u16 h) { return __uint_as_float(((u32)h) << 16); }
    static __device__ __forceinline__ u16 from_c(float f) {
        u32 b = __float_as_uint(f);
        if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)(((b >> 16) & 0x8000u) | 0x7fc0u);  // NaN
        b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest, ties to even (overflows to inf)
        return (u16)(b >> 16);
    }
};

struct F32 {
    typedef float S;
    typedef float C;
    static constexpr int VEC = 4;
    static __device__ __forceinline__ float to_c(float v) { return v; }
    static __device__ __forceinline__ float from_c(float v) { return v; }
};

struct F64 {
    typedef double S;
    typedef double C;
    static constexpr int VEC = 2;
    static __device__ __forceinline__ double to_c(double v) { return v; }
    static __device__ __forceinline__ double from_c(double v) { return v; }
};

// ---- the noise generator: fastsplit/_noise.py step for step ------------------

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ double gauss(u64 key, u64 idx) {
    const u64 golden = 0x9E3779B97F4A7C15ull;
    const double inv_2_53 = 1.0 / 9007199254740992.0;
    const double two_pi = 6.283185307179586;
    u64 h1 = mix64(key + (2ull * idx + 1ull) * golden);
    u64 h2 = mix64(key + (2ull * idx + 2ull) * golden);
    double u1 = __dmul_rn(__dadd_rn((double)(h1 >> 11), 1.0), inv_2_53);  // (0, 1]
    double u2 = __dmul_rn((double)(h2 >> 11), inv_2_53);                  // [0, 1)
    return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(two_pi, u2)));
}

// ---- index arithmetic ---------------------------------------------------------

// Row o and column offset c (0 <= c < L = m*inner) of the element at `off`
// elements past the start of row o0, for 0 <= off < L + TILE.
template <i64 TILE>
__device__ __forceinline__ void locate_row(i64 off, i64 L, i64 o0, i64& o, i64& c) {
    if (off < L) {
        o = o0;
        c = off;
    } else if (L >= TILE) {  // off < L + TILE <= 2L
        o = o0 + 1;
        c = off - L;
    } else {  // L < TILE, so off < 2 * TILE fits 32 bits
        u32 q = (u32)off / (u32)L;
        o = o0 + q;
        c = off - (i64)q * L;
    }
}

// Column j and position i of column offset c (0 <= c < L = m*inner).
__device__ __forceinline__ void locate_col(i64 c, i64 inner, i64 L, i64& j, i64& i) {
    if (inner == 1) {
        j = c;
        i = 0;
    } else if (L <= 0xffffffffll) {
        u32 q = (u32)c / (u32)inner;
        j = q;
        i = c - (i64)q * inner;
    } else {
        j = c / inner;
        i = c - j * inner;
    }
}

template <class S>
union Pack {
    Vec16 v;
    S s[16 / sizeof(S)];
};

template <class S>
__device__ __forceinline__ const S* as_ptr(i64 address) {
    return reinterpret_cast<const S*>((u64)address);
}

// One step of a two-axis task on a compute-dtype value: y * scale (+ add) (+ noise * gauss(key, idx)).
template <bool NOISE, class C>
__device__ __forceinline__ C step(C y, i64 flags, i64 f_scale, i64 f_add, i64 f_noise, const C* scale,
                                  const C* addv, const double* noise, i64 u, u64 key, i64 idx) {
    if (flags & f_scale) y = mul_rn(y, __ldg(scale + u));
    if (flags & f_add) y = add_rn(y, __ldg(addv + u));
    if (NOISE && (flags & f_noise)) {
        const double nz = __ldg(noise + u);
        if (nz != 0.0) {
            C draw;
            narrow(__dmul_rn(nz, gauss(key, (u64)idx)), draw);
            y = add_rn(y, draw);
        }
    }
    return y;
}

// Unit a along the rows of output row r of a two-axis task, and the row of x it reads.
__device__ __forceinline__ void row_of(i64 r, i64 na, i64 mm, i64 mid, const i64* rsrc, i64& a, i64& xr) {
    const i64 o = r / mm;
    const i64 rem = r - o * mm;
    a = rem / mid;
    xr = (o * na + __ldg(rsrc + a)) * mid + (rem - a * mid);
}

// The part of a tile that a thread writes, for a task split on two axes: FS_ITEMS vectors of
// VEC consecutive output elements, each loaded in one 16-byte load when it can be (as in the
// one-axis path), then both steps element by element, then one 16-byte store when aligned.
template <class Tr, bool NOISE>
__device__ __forceinline__ void two_axis_tile(const Desc* d, const char* __restrict__ blob, i64 base, i64 o0,
                                              i64 c0) {
    typedef typename Tr::S S;
    typedef typename Tr::C C;
    constexpr int VEC = Tr::VEC;
    constexpr i64 TILE = (i64)FS_THREADS * FS_ITEMS * VEC;
    const S* x = as_ptr<S>(d->x);
    S* out = const_cast<S*>(as_ptr<S>(d->out));
    const i64 n = d->n, m = d->m, inner = d->inner, total = d->total, flags = d->flags;
    const i64 na = d->na, mid = d->mid, mm = d->ma * d->mid;
    const i64* src = reinterpret_cast<const i64*>(blob + d->src);
    const i64* run = reinterpret_cast<const i64*>(blob + d->run);
    const C* scale = reinterpret_cast<const C*>(blob + d->scale);
    const C* addv = reinterpret_cast<const C*>(blob + d->add);
    const double* noise = reinterpret_cast<const double*>(blob + d->noise);
    const i64* rsrc = reinterpret_cast<const i64*>(blob + d->rsrc);
    const C* rscale = reinterpret_cast<const C*>(blob + d->rscale);
    const C* radd = reinterpret_cast<const C*>(blob + d->radd);
    const double* rnoise = reinterpret_cast<const double*>(blob + d->rnoise);
    const u64 key = (u64)d->key, rkey = (u64)d->rkey;
    const i64 L = m * inner;
    const bool cstep = (flags & (F_SCALE | F_ADD | F_NOISE)) != 0;
    const bool rstep = (flags & (F_RSCALE | F_RADD | F_RNOISE)) != 0;
    const bool rfirst = (flags & F_RFIRST) != 0;
#pragma unroll 1
    for (int it = 0; it < FS_ITEMS; ++it) {
        const i64 rel = ((i64)it * FS_THREADS + threadIdx.x) * VEC;
        const i64 f = base + rel;
        if (f >= total) break;
        i64 r, c, j, i, a, xr;
        locate_row<TILE>(c0 + rel, L, o0, r, c);
        locate_col(c, inner, L, j, i);
        row_of(r, na, mm, mid, rsrc, a, xr);
        const i64 kmax = total - f < VEC ? total - f : VEC;
        Pack<S> buf;
        bool wide = false;
        if ((flags & F_XALIGN) && kmax == VEC && c + VEC <= L) {
            const i64 xs = (xr * n + __ldg(src + j)) * inner + i;
            const i64 span = inner == 1 ? VEC - 1 : (i + VEC <= inner ? 0 : (i + VEC - 1) / inner);
            if ((xs & (VEC - 1)) == 0 && __ldg(run + j) > span) {
                buf.v = *reinterpret_cast<const Vec16*>(x + xs);
                wide = true;
            }
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k < kmax) {
                const i64 sj = __ldg(src + j);
                const i64 xi = (xr * n + sj) * inner + i;  // flat index in x; mi: in the intermediate
                C y = Tr::to_c(wide ? buf.s[k] : x[xi]);
                if (rfirst) {
                    const i64 mi = (r * n + sj) * inner + i;
                    if (rstep) {
                        y = step<NOISE>(y, flags, F_RSCALE, F_RADD, F_RNOISE, rscale, radd, rnoise, a, rkey,
                                 (flags & F_RNSRC) ? xi : mi);
                        y = Tr::to_c(Tr::from_c(y));
                    }
                    if (cstep)
                        y = step<NOISE>(y, flags, F_SCALE, F_ADD, F_NOISE, scale, addv, noise, j, key,
                                 (flags & F_NSRC) ? mi : f + k);
                } else {
                    const i64 mi = (xr * m + j) * inner + i;
                    if (cstep) {
                        y = step<NOISE>(y, flags, F_SCALE, F_ADD, F_NOISE, scale, addv, noise, j, key,
                                 (flags & F_NSRC) ? xi : mi);
                        y = Tr::to_c(Tr::from_c(y));
                    }
                    if (rstep)
                        y = step<NOISE>(y, flags, F_RSCALE, F_RADD, F_RNOISE, rscale, radd, rnoise, a, rkey,
                                 (flags & F_RNSRC) ? mi : f + k);
                }
                buf.s[k] = Tr::from_c(y);
                if (++i == inner) {
                    i = 0;
                    if (++j == m) {
                        j = 0;
                        if (f + k + 1 < total) row_of(++r, na, mm, mid, rsrc, a, xr);
                    }
                }
            }
        }
        if ((flags & F_OALIGN) && kmax == VEC) {
            *reinterpret_cast<Vec16*>(out + f) = buf.v;
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k)
                if (k < kmax) out[f + k] = buf.s[k];
        }
    }
}

// The tile loop of both kernels: TWO false for one-axis tasks (fastsplit_split), true for tasks
// split on two axes (fastsplit_split2). The host launches the two kinds separately, so the
// one-axis kernel is compiled exactly as it would be without the two-axis path.
template <class Tr, bool TWO, bool NOISE>
__device__ __forceinline__ void split_body(const char* __restrict__ blob, i64 ntasks, i64 total_tiles) {
    typedef typename Tr::S S;
    typedef typename Tr::C C;
    constexpr int VEC = Tr::VEC;
    constexpr i64 TILE = (i64)FS_THREADS * FS_ITEMS * VEC;
    static_assert(sizeof(S) * VEC == 16, "VEC elements make 16 bytes");

    const Desc* table = reinterpret_cast<const Desc*>(blob);
    __shared__ i64 s_task;

    for (i64 tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        if (threadIdx.x == 0) {  // last task whose first tile is <= tile
            i64 lo = 0, hi = ntasks - 1;
            while (lo < hi) {
                i64 mid = (lo + hi + 1) >> 1;
                if (table[mid].tile_start <= tile) lo = mid;
                else hi = mid - 1;
            }
            s_task = lo;
        }
        __syncthreads();
        const Desc* d = table + s_task;
        const S* x = as_ptr<S>(d->x);
        S* out = const_cast<S*>(as_ptr<S>(d->out));
        const i64 n = d->n, m = d->m, inner = d->inner, total = d->total, flags = d->flags;
        const i64* src = reinterpret_cast<const i64*>(blob + d->src);
        const i64* run = reinterpret_cast<const i64*>(blob + d->run);
        const C* scale = reinterpret_cast<const C*>(blob + d->scale);
        const C* addv = reinterpret_cast<const C*>(blob + d->add);
        const double* noise = reinterpret_cast<const double*>(blob + d->noise);
        const u64 key = (u64)d->key;
        const i64 L = m * inner;
        const i64 base = (tile - d->tile_start) * TILE;  // first flat element of the tile
        const i64 o0 = base / L;
        const i64 c0 = base - o0 * L;
        __syncthreads();  // everyone has read s_task before thread 0 writes the next one

        if constexpr (TWO) {
            two_axis_tile<Tr, NOISE>(d, blob, base, o0, c0);
            continue;
        }

        if (NOISE && (flags & F_NOISE)) {
            // Noise: float64 transcendental math per element dominates, so go
            // element by element with scalar loads and stores.
#pragma unroll 1
            for (int it = 0; it < FS_ITEMS; ++it) {
                const i64 rel = ((i64)it * FS_THREADS + threadIdx.x) * VEC;
                const i64 f = base + rel;
                if (f >= total) break;
                i64 o, c, j, i;
                locate_row<TILE>(c0 + rel, L, o0, o, c);
                locate_col(c, inner, L, j, i);
                const i64 kmax = total - f < VEC ? total - f : VEC;
#pragma unroll 1
                for (i64 k = 0; k < kmax; ++k) {
                    const i64 xi = (o * n + __ldg(src + j)) * inner + i;
                    C y = Tr::to_c(x[xi]);
                    if (flags & F_SCALE) y = mul_rn(y, __ldg(scale + j));
                    if (flags & F_ADD) y = add_rn(y, __ldg(addv + j));
                    const double nz = __ldg(noise + j);
                    if (nz != 0.0) {
                        C draw;
                        narrow(__dmul_rn(nz, gauss(key, (u64)((flags & F_NSRC) ? xi : f + k))), draw);
                        y = add_rn(y, draw);
                    }
                    out[f + k] = Tr::from_c(y);
                    if (++i == inner) {
                        i = 0;
                        if (++j == m) {
                            j = 0;
                            ++o;
                        }
                    }
                }
            }
            continue;
        }

        // Gather FS_ITEMS vectors first (independent loads in flight), then scale and store.
        Pack<S> buf[FS_ITEMS];
#pragma unroll
        for (int it = 0; it < FS_ITEMS; ++it) {
            const i64 rel = ((i64)it * FS_THREADS + threadIdx.x) * VEC;
            const i64 f = base + rel;
            if (f < total) {
                i64 o, c, j, i;
                locate_row<TILE>(c0 + rel, L, o0, o, c);
                locate_col(c, inner, L, j, i);
                // One 16-byte load when the VEC elements sit in one row and their
                // sources are consecutive and 16-byte aligned.
                i64 sj = __ldg(src + j);
                bool wide = false;
                if ((flags & F_XALIGN) && f + VEC <= total && c + VEC <= L) {
                    const i64 rj = __ldg(run + j);  // issued together with src[j]
                    const i64 xs = (o * n + sj) * inner + i;
                    // columns j .. j+span hold the vector; they must continue one run
                    const i64 span = inner == 1 ? VEC - 1 : (i + VEC <= inner ? 0 : (i + VEC - 1) / inner);
                    if ((xs & (VEC - 1)) == 0 && rj > span) {
                        buf[it].v = *reinterpret_cast<const Vec16*>(x + xs);
                        wide = true;
                    }
                }
                if (!wide) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        if (f + k < total) {
                            buf[it].s[k] = x[(o * n + sj) * inner + i];
                            if (++i == inner) {
                                i = 0;
                                if (++j == m) {
                                    j = 0;
                                    ++o;
                                }
                                if (f + k + 1 < total) sj = __ldg(src + j);
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int it = 0; it < FS_ITEMS; ++it) {
            const i64 rel = ((i64)it * FS_THREADS + threadIdx.x) * VEC;
            const i64 f = base + rel;
            if (f < total) {
                if (flags & (F_SCALE | F_ADD)) {
                    i64 o, c, j, i;
                    locate_row<TILE>(c0 + rel, L, o0, o, c);
                    locate_col(c, inner, L, j, i);
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        if (f + k < total) {
                            C y = Tr::to_c(buf[it].s[k]);
                            if (flags & F_SCALE) y = mul_rn(y, __ldg(scale + j));
                            if (flags & F_ADD) y = add_rn(y, __ldg(addv + j));
                            buf[it].s[k] = Tr::from_c(y);
                            if (++i == inner) {
                                i = 0;
                                if (++j == m) j = 0;
                            }
                        }
                    }
                }
                if ((flags & F_OALIGN) && f + VEC <= total) {
                    *reinterpret_cast<Vec16*>(out + f) = buf[it].v;
                } else {
#pragma unroll
                    for (int k = 0; k < VEC; ++k)
                        if (f + k < total) out[f + k] = buf[it].s[k];
                }
            }
        }
    }
}

}  // namespace fs

// The template kernels NVRTC instantiates per dtype through name expressions
// ("fastsplit_split<fs::F16, true>", "fastsplit_split2<fs::F16, false>", ...). NOISE false
// compiles the draws out: their float64 log/cos hold registers that every launch would pay for in
// occupancy, so launches with no drawing task use that instance.
template <class Tr, bool NOISE>
__global__ void __launch_bounds__(FS_THREADS, FS_MIN_BLOCKS_FOR(NOISE))
fastsplit_split(const char* __restrict__ blob, long long ntasks, long long total_tiles) {
    fs::split_body<Tr, false, NOISE>(blob, ntasks, total_tiles);
}

template <class Tr, bool NOISE>
__global__ void __launch_bounds__(FS_THREADS, FS_MIN_BLOCKS_FOR(NOISE))
fastsplit_split2(const char* __restrict__ blob, long long ntasks, long long total_tiles) {
    fs::split_body<Tr, true, NOISE>(blob, ntasks, total_tiles);
}

#if !defined(__CUDACC_RTC__) || defined(FASTSPLIT_INSTANTIATE)
// Fixed names for the prebuilt fatbin (recorded in its .json manifest).
#define FS_EXPORT(NAME, TR, TWO, NOISE)                                                             \
    extern "C" __global__ void __launch_bounds__(FS_THREADS, FS_MIN_BLOCKS_FOR(NOISE))             \
    NAME(const char* __restrict__ blob, long long ntasks, long long total_tiles) {                 \
        fs::split_body<TR, TWO, NOISE>(blob, ntasks, total_tiles);                                  \
    }
FS_EXPORT(fastsplit_split_float16, fs::F16, false, true)
FS_EXPORT(fastsplit_split_bfloat16, fs::BF16, false, true)
FS_EXPORT(fastsplit_split_float32, fs::F32, false, true)
FS_EXPORT(fastsplit_split_float64, fs::F64, false, true)
FS_EXPORT(fastsplit_split2_float16, fs::F16, true, true)
FS_EXPORT(fastsplit_split2_bfloat16, fs::BF16, true, true)
FS_EXPORT(fastsplit_split2_float32, fs::F32, true, true)
FS_EXPORT(fastsplit_split2_float64, fs::F64, true, true)
FS_EXPORT(fastsplit_split_exact_float16, fs::F16, false, false)
FS_EXPORT(fastsplit_split_exact_bfloat16, fs::BF16, false, false)
FS_EXPORT(fastsplit_split_exact_float32, fs::F32, false, false)
FS_EXPORT(fastsplit_split_exact_float64, fs::F64, false, false)
FS_EXPORT(fastsplit_split2_exact_float16, fs::F16, true, false)
FS_EXPORT(fastsplit_split2_exact_bfloat16, fs::BF16, true, false)
FS_EXPORT(fastsplit_split2_exact_float32, fs::F32, true, false)
FS_EXPORT(fastsplit_split2_exact_float64, fs::F64, true, false)
#undef FS_EXPORT
#endif
