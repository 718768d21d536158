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
// Noise: tasks with F_NOISE go element by element; a column whose noise[j] is 0
// (the original units) gets no draw at all, where the reference adds 0 * gauss,
// which differs only in the sign of a zero result.
//
// No #include: NVRTC compiles this file as it is. Half and bfloat16 travel as
// 16-bit integers (PTX cvt for half, round-to-nearest-even by hand for bfloat16).
// Compiled by nvcc (the CMake fatbin, or `nvcc -c` for a resource report) it also
// defines extern "C" kernels fastsplit_split_<dtype>; NVRTC (__CUDACC_RTC__)
// compiles only the template instance it is asked for, unless FASTSPLIT_INSTANTIATE.

#ifndef FS_THREADS
#define FS_THREADS 256  // threads per block (the host launches exactly this many)
#endif
#ifndef FS_ITEMS
#define FS_ITEMS 4      // 16-byte vectors per thread per tile
#endif

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
};

// One task: 16 int64 fields, 128 bytes (field order as in _cuda_layout.FIELDS).
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

template <class Tr>
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

        if (flags & F_NOISE) {
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
                    C y = Tr::to_c(x[(o * n + __ldg(src + j)) * inner + i]);
                    if (flags & F_SCALE) y = mul_rn(y, __ldg(scale + j));
                    if (flags & F_ADD) y = add_rn(y, __ldg(addv + j));
                    const double nz = __ldg(noise + j);
                    if (nz != 0.0) {
                        C draw;
                        narrow(__dmul_rn(nz, gauss(key, (u64)(f + k))), draw);
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

// The template kernel NVRTC instantiates per dtype through name expressions
// ("fastsplit_split<fs::F16>", ...).
template <class Tr>
__global__ void __launch_bounds__(FS_THREADS)
fastsplit_split(const char* __restrict__ blob, long long ntasks, long long total_tiles) {
    fs::split_body<Tr>(blob, ntasks, total_tiles);
}

#if !defined(__CUDACC_RTC__) || defined(FASTSPLIT_INSTANTIATE)
// Fixed names for the prebuilt fatbin (recorded in its .json manifest).
#define FS_EXPORT(NAME, TR)                                                                         \
    extern "C" __global__ void __launch_bounds__(FS_THREADS)                                        \
    NAME(const char* __restrict__ blob, long long ntasks, long long total_tiles) {                 \
        fs::split_body<TR>(blob, ntasks, total_tiles);                                              \
    }
FS_EXPORT(fastsplit_split_float16, fs::F16)
FS_EXPORT(fastsplit_split_bfloat16, fs::BF16)
FS_EXPORT(fastsplit_split_float32, fs::F32)
FS_EXPORT(fastsplit_split_float64, fs::F64)
#undef FS_EXPORT
#endif
