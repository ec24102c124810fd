// Pack and unpack paged KV-cache blocks into/out of a contiguous chunk (wire format: kvlink/wire.py).
//
// One launch covers every selected layer, K and V: plane_ptrs holds one base address per plane
// (layer-major: L0 K, L0 V, L1 K, ...). Inside a plane, a token-head row lives at
//     base + block_ids[t / tokens_per_block] * block_stride + (t % tokens_per_block) * token_stride
//          + head * head_stride
// and the chunk holds rows in (plane, token, head) order. Work is split into VEC-byte vectors;
// VEC (16 where pointers, strides and rows allow it) is a template parameter so the copies are
// 16-byte LDG/STG. Compiled at first use by NVRTC (kvlink/kernels.py), so no headers.
//
// When a token's selected heads are contiguous in the cache, the host merges them into one row
// (heads_per_token = 1, row = heads * head bytes): fewer divisions per vector, same kernel.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

template <int VEC> struct VecType;
template <> struct VecType<16> { typedef uint4 T; };
template <> struct VecType<8> { typedef uint2 T; };
template <> struct VecType<4> { typedef unsigned int T; };
template <> struct VecType<2> { typedef unsigned short T; };
template <> struct VecType<1> { typedef unsigned char T; };

// n / d for n < 2^31 with a precomputed (mul, shift) pair; see kvlink/kernels.py:fast_divisor.
__device__ __forceinline__ u32 fast_div(u32 n, u32 mul, u32 shift) {
    return (__umulhi(n, mul) + n) >> shift;
}

// Per-launch metadata, uploaded by the host in one copy as [Geometry | pad to 128 | header (64 B) |
// block ids (int32)]. Field order and offsets are mirrored by kvlink/kernels.py:GEOMETRY_DTYPE.
constexpr int META_HEADER_OFFSET = 128;
constexpr int META_BLOCK_IDS_OFFSET = 192;
struct Geometry {
    i64 block_stride;      // bytes
    i64 token_stride;      // bytes
    i64 head_stride;       // bytes
    u64 plane_bytes;       // payload bytes of one plane in the chunk
    u32 num_planes;
    u32 vecs_per_plane;    // selected tokens * heads_per_token * vecs_per_row  (< 2^31)
    u32 vecs_per_row, vpr_mul, vpr_shift;
    u32 heads_per_token, hpt_mul, hpt_shift;
    u32 tokens_per_block, tpb_mul, tpb_shift;
    u32 token_start;       // first selected token of the request
    u32 head_start;        // first selected head in this cache
    u32 check_mask;        // unpack: header words (bit i = word i) that must match
    u32 tiles_per_plane, tpp_mul, tpp_shift;  // a tile is THREADS * UNROLL vectors of one plane
    u32 num_tiles;         // num_planes * tiles_per_plane (< 2^31)
    u32 status_overwrite;  // unpack: 1 = the status word is this launch's own (write 0 or 1),
                           // 0 = the caller's, shared by several chunks (only ever set it to 1)
    u32 head_dim;          // fp8 wire: elements per row
    u32 inv_cache_scale_bits;  // fp8 wire, unpack into an e4m3 cache: 1 / its per-tensor scale (float bits)
};

// Byte offset inside a plane of vector j of the selected box. INLINE: the block ids live in the
// kernel's parameter space (kvlink_copy_inline), which the read-only global path cannot load.
template <bool INLINE = false>
__device__ __forceinline__ i64 cache_offset(const Geometry& g, const int* __restrict__ block_ids, u32 j, int vec) {
    u32 row = fast_div(j, g.vpr_mul, g.vpr_shift);
    u32 v = j - row * g.vecs_per_row;
    u32 t = fast_div(row, g.hpt_mul, g.hpt_shift);
    u32 h = row - t * g.heads_per_token;
    u32 token = g.token_start + t;
    u32 block_slot = fast_div(token, g.tpb_mul, g.tpb_shift);
    u32 in_block = token - block_slot * g.tokens_per_block;
    i64 block = INLINE ? (i64)block_ids[block_slot] : (i64)__ldg(block_ids + block_slot);
    return block * g.block_stride + (i64)in_block * g.token_stride + (i64)(g.head_start + h) * g.head_stride
           + (i64)v * vec;
}

// Overridable at compile time for tuning (KVLINK_NVRTC_OPTIONS="-DKVLINK_UNROLL=8"); kernels.py
// reads the same values to size the grid.
#ifndef KVLINK_THREADS
#define KVLINK_THREADS 256
#endif
#ifndef KVLINK_UNROLL
#define KVLINK_UNROLL 4
#endif
// 1: streaming cache hints (evict-first) on the copies: every byte is touched once.
#ifndef KVLINK_CACHE_HINTS
#define KVLINK_CACHE_HINTS 0
#endif
constexpr int THREADS = KVLINK_THREADS;
constexpr int UNROLL = KVLINK_UNROLL;
constexpr int HEADER_BYTES = 64;

template <typename V> __device__ __forceinline__ V load(const V* p) {
#if KVLINK_CACHE_HINTS
    return __ldcs(p);
#else
    return *p;
#endif
}
template <typename V> __device__ __forceinline__ void store(V* p, V v) {
#if KVLINK_CACHE_HINTS
    __stcs(p, v);
#else
    *p = v;
#endif
}

// Copies the 64-byte header byte by byte, so any chunk alignment works.
__device__ __forceinline__ void write_header(unsigned char* chunk, const unsigned char* header) {
    if (blockIdx.x == 0 && threadIdx.x < HEADER_BYTES) chunk[threadIdx.x] = header[threadIdx.x];
}

// Work is a flat list of tiles (plane-major), so thread blocks stay balanced whatever the grid:
// one tile per block by default, or a grid-stride loop under an SM budget (max_ctas).

// INLINE: the metadata (and so the block ids) lives in the kernel's parameter space (the _inline
// kernels below), which the read-only global path cannot load.
template <int VEC, bool INLINE>
__device__ __forceinline__ void pack_tiles(const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs,
                                           unsigned char* __restrict__ chunk) {
    typedef typename VecType<VEC>::T V;
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    write_header(chunk, meta + META_HEADER_OFFSET);
    unsigned char* payload = chunk + HEADER_BYTES;
    for (u32 tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
        const u32 p = fast_div(tile, g.tpp_mul, g.tpp_shift);
        const u32 base = (tile - p * g.tiles_per_plane) * (THREADS * UNROLL) + threadIdx.x;
        const unsigned char* plane = reinterpret_cast<const unsigned char*>(plane_ptrs[p]);
        V* out = reinterpret_cast<V*>(payload + (u64)p * g.plane_bytes);
        V tmp[UNROLL];
        // NOTE: all loads before any store, so UNROLL independent loads are in flight per thread.
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < g.vecs_per_plane)
                tmp[u] = load(reinterpret_cast<const V*>(plane + cache_offset<INLINE>(g, block_ids, j, VEC)));
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < g.vecs_per_plane) store(out + j, tmp[u]);
        }
    }
}

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_pack(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs, unsigned char* __restrict__ chunk) {
    pack_tiles<VEC, false>(meta, plane_ptrs, chunk);
}

// Refuses the whole chunk (writes nothing, sets *status = 1) when its header differs from the
// expected one (in the metadata) in any word selected by check_mask. Every thread block checks
// for itself, so no block writes before knowing the chunk is good; a refused chunk is refused by
// every block alike. Called by every thread of the block (it synchronizes them).
__device__ __forceinline__ bool chunk_refused(const Geometry& g, const unsigned char* __restrict__ meta,
                                              const unsigned char* __restrict__ chunk, int* __restrict__ status) {
    const unsigned char* expected_header = meta + META_HEADER_OFFSET;
    int mismatch = 0;
    if (threadIdx.x < HEADER_BYTES && ((g.check_mask >> (threadIdx.x / 4)) & 1u))
        mismatch = chunk[threadIdx.x] != expected_header[threadIdx.x];
    const int refused = __syncthreads_or(mismatch);
    if (threadIdx.x == 0 && (refused || (g.status_overwrite && blockIdx.x == 0))) atomicExch(status, refused);
    return refused != 0;
}

// Unpack: refuses a chunk whose header does not match (chunk_refused), else scatters it.
template <int VEC, bool INLINE>
__device__ __forceinline__ void unpack_tiles(const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs,
                                             const unsigned char* __restrict__ chunk, int* __restrict__ status) {
    typedef typename VecType<VEC>::T V;
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    if (chunk_refused(g, meta, chunk, status)) return;
    const unsigned char* payload = chunk + HEADER_BYTES;
    for (u32 tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
        const u32 p = fast_div(tile, g.tpp_mul, g.tpp_shift);
        const u32 base = (tile - p * g.tiles_per_plane) * (THREADS * UNROLL) + threadIdx.x;
        unsigned char* plane = reinterpret_cast<unsigned char*>(plane_ptrs[p]);
        const V* in = reinterpret_cast<const V*>(payload + (u64)p * g.plane_bytes);
        V tmp[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < g.vecs_per_plane) tmp[u] = load(in + j);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < g.vecs_per_plane)
                store(reinterpret_cast<V*>(plane + cache_offset<INLINE>(g, block_ids, j, VEC)), tmp[u]);
        }
    }
}

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_unpack(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs,
    const unsigned char* __restrict__ chunk, int* __restrict__ status) {
    unpack_tiles<VEC, false>(meta, plane_ptrs, chunk, status);
}

// Pack and unpack with their metadata record passed by value as the launch's one parameter: no
// host-to-device upload (and no event guarding its host buffer) before the launch, for records of
// up to ~950 block ids. Layout mirrored by kvlink/kernels.py:CHUNK_PARAMS_HEADER.
constexpr int INLINE_META_BYTES = 4000;
struct __align__(16) ChunkParams {
    u64 plane_ptrs;
    u64 chunk;
    u64 status;  // unpack only
    u32 pad[2];
    unsigned char meta[INLINE_META_BYTES];  // [Geometry | pad to 128 | header (64 B) | block ids (int32)]
};

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_pack_inline(const __grid_constant__ ChunkParams p) {
    pack_tiles<VEC, true>(p.meta, reinterpret_cast<const u64*>(p.plane_ptrs), reinterpret_cast<unsigned char*>(p.chunk));
}

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_unpack_inline(const __grid_constant__ ChunkParams p) {
    unpack_tiles<VEC, true>(p.meta, reinterpret_cast<const u64*>(p.plane_ptrs),
                            reinterpret_cast<const unsigned char*>(p.chunk), reinterpret_cast<int*>(p.status));
}

// Direct copy between two caches (the CUDA IPC transport: the source planes are the peer GPU's,
// mapped into this process, and are read across NVLink or PCIe). src_meta and dst_meta are two
// metadata records of the pack/unpack format (header unused); the host makes the two geometries
// agree on vecs_per_row, heads_per_token and tiling, so vector j of the box is the same element on
// both sides. Block size, block order and strides may differ: the layout conversion is free.
template <int VEC, bool INLINE>
__device__ __forceinline__ void copy_tiles(const unsigned char* __restrict__ src_meta, const u64* __restrict__ src_planes,
                                           const unsigned char* __restrict__ dst_meta, const u64* __restrict__ dst_planes) {
    typedef typename VecType<VEC>::T V;
    const Geometry s = *reinterpret_cast<const Geometry*>(src_meta);
    const Geometry d = *reinterpret_cast<const Geometry*>(dst_meta);
    const int* src_ids = reinterpret_cast<const int*>(src_meta + META_BLOCK_IDS_OFFSET);
    const int* dst_ids = reinterpret_cast<const int*>(dst_meta + META_BLOCK_IDS_OFFSET);
    for (u32 tile = blockIdx.x; tile < d.num_tiles; tile += gridDim.x) {
        const u32 p = fast_div(tile, d.tpp_mul, d.tpp_shift);
        const u32 base = (tile - p * d.tiles_per_plane) * (THREADS * UNROLL) + threadIdx.x;
        const unsigned char* from = reinterpret_cast<const unsigned char*>(src_planes[p]);
        unsigned char* to = reinterpret_cast<unsigned char*>(dst_planes[p]);
        V tmp[UNROLL];
        // NOTE: all loads before any store: remote reads have microsecond latency, so keep
        // UNROLL of them in flight per thread.
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < d.vecs_per_plane)
                tmp[u] = load(reinterpret_cast<const V*>(from + cache_offset<INLINE>(s, src_ids, j, VEC)));
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            u32 j = base + u * THREADS;
            if (j < d.vecs_per_plane) store(reinterpret_cast<V*>(to + cache_offset<INLINE>(d, dst_ids, j, VEC)), tmp[u]);
        }
    }
}

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_copy(
    const unsigned char* __restrict__ src_meta, const u64* __restrict__ src_planes,
    const unsigned char* __restrict__ dst_meta, const u64* __restrict__ dst_planes) {
    copy_tiles<VEC, false>(src_meta, src_planes, dst_meta, dst_planes);
}

// The same copy with both metadata records passed by value as the launch's parameters: no
// host-to-device upload before the launch (the common case: up to ~450 blocks a side).
// Layout mirrored by kvlink/kernels.py:INLINE_PARAMS_HEADER.
struct __align__(16) CopyParams {
    u64 src_planes;
    u64 dst_planes;
    u32 src_meta;  // byte offsets of the two records inside meta (multiples of 16)
    u32 dst_meta;
    u32 pad[2];
    unsigned char meta[INLINE_META_BYTES];
};

template <int VEC>
__global__ void __launch_bounds__(THREADS) kvlink_copy_inline(const __grid_constant__ CopyParams p) {
    copy_tiles<VEC, true>(p.meta + p.src_meta, reinterpret_cast<const u64*>(p.src_planes), p.meta + p.dst_meta,
                          reinterpret_cast<const u64*>(p.dst_planes));
}

// ---------------------------------------------------------------------------------- fp8 on the wire
// Rows travel as e4m3 with one float32 scale per (plane, token, head) row: the chunk's payload is
// [rows of head_dim e4m3 bytes][one float per row] (kvlink/wire.py). One warp per row: the row's
// max |x| gives its scale s = max / 448 and its multiplier m = 448 / max (one division a row, not
// one an element), then q = e4m3(clamp(x * m, -448, 448)). Unpack writes q * s in the cache's
// dtype, or for an e4m3 cache e4m3(clamp(q * s * inv_cache_scale)).
//
// The conversions are written out (NVRTC needs no headers) and follow torch's own (c10 Float8_e4m3fn,
// BFloat16, IEEE half), all round-to-nearest-even, so kernel and reference (kvlink/reference.py)
// agree bit for bit on finite inputs. Geometry for these kernels: vecs_per_row = 1 (a "vector" is
// a row), tiles_per_plane = rows per plane, num_tiles = rows in all, plane_bytes = e4m3 bytes of a plane.
// Element type codes are kvlink.layout.DTYPE_CODES: 1 fp16, 2 bf16, 3 fp32, 5 e4m3.
constexpr float FP8_MAX = 448.0f;

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {  // finite f: round to nearest even
    u32 b = __float_as_uint(f);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (unsigned short)(b >> 16);
}
// c10::detail::fp8e4m3fn_from_fp32_value: round to nearest even; >= 480 becomes NaN (callers clamp first)
__device__ __forceinline__ unsigned char float_to_e4m3(float f) {
    u32 bits = __float_as_uint(f);
    const u32 sign = bits & 0x80000000u;
    bits ^= sign;
    unsigned char result;
    if (bits >= (1087u << 20)) {
        result = 0x7f;
    } else if (bits < (121u << 23)) {  // below the smallest normal: let a float add do the rounding
        bits = __float_as_uint(__fadd_rn(__uint_as_float(bits), __uint_as_float(141u << 23)));
        result = (unsigned char)(bits - (141u << 23));
    } else {
        const u32 mant_odd = (bits >> 20) & 1u;
        bits += ((u32)(7 - 127) << 23) + 0x7FFFFu;
        bits += mant_odd;
        result = (unsigned char)(bits >> 20);
    }
    return result | (unsigned char)(sign >> 24);
}
// Two at once: the hardware conversion where there is one (sm_89+: round to nearest even, saturating,
// which the callers' clamp makes equal to the above), else the software one.
__device__ __forceinline__ unsigned short float2_to_e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned short)(float_to_e4m3(lo) | ((unsigned short)float_to_e4m3(hi) << 8));
#endif
}
__device__ __forceinline__ float e4m3_to_float(unsigned char q) {
    const u32 sign = (u32)(q & 0x80u) << 24;
    const u32 e = (q >> 3) & 0xFu, m = q & 7u;
    if (e == 15 && m == 7) return __uint_as_float(0x7fc00000u);
    const float v = e == 0 ? (float)m * 0.001953125f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return __uint_as_float(__float_as_uint(v) | sign);
}

template <int DT> struct Elem;
template <> struct Elem<1> {
    static constexpr int BYTES = 2;
    static __device__ __forceinline__ float load(const unsigned char* p) {
        return half_bits_to_float(*reinterpret_cast<const unsigned short*>(p));
    }
    static __device__ __forceinline__ void store(unsigned char* p, float v, float) {
        *reinterpret_cast<unsigned short*>(p) = float_to_half_bits(v);
    }
};
template <> struct Elem<2> {
    static constexpr int BYTES = 2;
    static __device__ __forceinline__ float load(const unsigned char* p) {
        return __uint_as_float((u32)*reinterpret_cast<const unsigned short*>(p) << 16);
    }
    static __device__ __forceinline__ void store(unsigned char* p, float v, float) {
        *reinterpret_cast<unsigned short*>(p) = float_to_bf16_bits(v);
    }
};
template <> struct Elem<3> {
    static constexpr int BYTES = 4;
    static __device__ __forceinline__ float load(const unsigned char* p) { return *reinterpret_cast<const float*>(p); }
    static __device__ __forceinline__ void store(unsigned char* p, float v, float) { *reinterpret_cast<float*>(p) = v; }
};
template <> struct Elem<5> {
    static constexpr int BYTES = 1;
    static __device__ __forceinline__ float load(const unsigned char* p) { return e4m3_to_float(*p); }
    static __device__ __forceinline__ void store(unsigned char* p, float v, float inv_cache_scale) {
        *p = float_to_e4m3(fminf(fmaxf(__fmul_rn(v, inv_cache_scale), -FP8_MAX), FP8_MAX));
    }
};

constexpr int WARPS = THREADS / 32;

template <int SRC>
__global__ void __launch_bounds__(THREADS) kvlink_pack_fp8(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs, unsigned char* __restrict__ chunk) {
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    write_header(chunk, meta + META_HEADER_OFFSET);
    unsigned char* values = chunk + HEADER_BYTES;
    float* scales = reinterpret_cast<float*>(values + (u64)g.num_planes * g.plane_bytes);
    const u32 lane = threadIdx.x & 31u;
    for (u32 row = blockIdx.x * WARPS + threadIdx.x / 32; row < g.num_tiles; row += gridDim.x * WARPS) {
        const u32 p = fast_div(row, g.tpp_mul, g.tpp_shift);
        const unsigned char* src = reinterpret_cast<const unsigned char*>(plane_ptrs[p])
                                   + cache_offset(g, block_ids, row - p * g.tiles_per_plane, 0);
        float amax = 0.0f;
        for (u32 e = lane; e < g.head_dim; e += 32) amax = fmaxf(amax, fabsf(Elem<SRC>::load(src + e * Elem<SRC>::BYTES)));
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        const float scale = __fdiv_rn(amax, FP8_MAX);
        const float multiplier = amax > 0.0f ? __fdiv_rn(FP8_MAX, amax) : 0.0f;
        unsigned char* out = values + (u64)row * g.head_dim;
        // NOTE: the second read of the row hits L1; keeping it in registers would bound head_dim.
        for (u32 e = lane; e < g.head_dim; e += 32) {
            const float x = Elem<SRC>::load(src + e * Elem<SRC>::BYTES);
            out[e] = float_to_e4m3(fminf(fmaxf(__fmul_rn(x, multiplier), -FP8_MAX), FP8_MAX));
        }
        if (lane == 0) scales[row] = scale;
    }
}

template <int DST>
__global__ void __launch_bounds__(THREADS) kvlink_unpack_fp8(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs,
    const unsigned char* __restrict__ chunk, int* __restrict__ status) {
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    if (chunk_refused(g, meta, chunk, status)) return;
    const unsigned char* values = chunk + HEADER_BYTES;
    const float* scales = reinterpret_cast<const float*>(values + (u64)g.num_planes * g.plane_bytes);
    const float inv_cache_scale = __uint_as_float(g.inv_cache_scale_bits);
    const u32 lane = threadIdx.x & 31u;
    for (u32 row = blockIdx.x * WARPS + threadIdx.x / 32; row < g.num_tiles; row += gridDim.x * WARPS) {
        const u32 p = fast_div(row, g.tpp_mul, g.tpp_shift);
        unsigned char* dst = reinterpret_cast<unsigned char*>(plane_ptrs[p])
                             + cache_offset(g, block_ids, row - p * g.tiles_per_plane, 0);
        const float scale = scales[row];
        const unsigned char* in = values + (u64)row * g.head_dim;
        for (u32 e = lane; e < g.head_dim; e += 32)
            Elem<DST>::store(dst + e * Elem<DST>::BYTES, __fmul_rn(e4m3_to_float(in[e]), scale), inv_cache_scale);
    }
}

// Vectorized forms for the common shapes: each lane moves 16 bytes of the cache (8 bf16/fp16
// elements, 4 fp32, or 16 e4m3), a row takes LANES = head_dim / ELEMS lanes (a power of two <= 32,
// so a row's max is a shuffle within its lane group), and each thread keeps ROWS rows' loads in
// flight before any arithmetic, like the plain kernels' UNROLL. The host picks these when head_dim,
// the cache's alignment and the chunk's allow 16-byte accesses (kvlink/kernels.py:_fp8_vectorized).
constexpr int FP8_ROWS = 4;

template <int ELEMS> struct Fp8Bytes;  // the e4m3 bytes of one lane's elements
template <> struct Fp8Bytes<4> { typedef unsigned int T; };
template <> struct Fp8Bytes<8> { typedef uint2 T; };
template <> struct Fp8Bytes<16> { typedef uint4 T; };

template <int SRC, int LANES>
__global__ void __launch_bounds__(THREADS) kvlink_pack_fp8_vec(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs, unsigned char* __restrict__ chunk) {
    constexpr int ELEMS = 16 / Elem<SRC>::BYTES;
    constexpr int SLOTS = THREADS / LANES;  // rows a thread block handles side by side
    typedef typename Fp8Bytes<ELEMS>::T Q;
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    write_header(chunk, meta + META_HEADER_OFFSET);
    unsigned char* values = chunk + HEADER_BYTES;
    float* scales = reinterpret_cast<float*>(values + (u64)g.num_planes * g.plane_bytes);
    const u32 slot = threadIdx.x / LANES, part = threadIdx.x % LANES;
    for (u32 first = blockIdx.x * (SLOTS * FP8_ROWS); first < g.num_tiles; first += gridDim.x * (SLOTS * FP8_ROWS)) {
        uint4 raw[FP8_ROWS];
#pragma unroll
        for (int u = 0; u < FP8_ROWS; ++u) {
            const u32 row = first + u * SLOTS + slot;
            if (row < g.num_tiles) {
                const u32 p = fast_div(row, g.tpp_mul, g.tpp_shift);
                raw[u] = load(reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(plane_ptrs[p])
                              + cache_offset(g, block_ids, row - p * g.tiles_per_plane, 0)) + part);
            } else {
                raw[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < FP8_ROWS; ++u) {
            const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&raw[u]);
            float x[ELEMS];
            float amax = 0.0f;
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) {
                x[e] = Elem<SRC>::load(bytes + e * Elem<SRC>::BYTES);
                amax = fmaxf(amax, fabsf(x[e]));
            }
#pragma unroll
            for (int offset = LANES / 2; offset > 0; offset >>= 1)
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
            const u32 row = first + u * SLOTS + slot;
            if (row >= g.num_tiles) continue;
            const float multiplier = amax > 0.0f ? __fdiv_rn(FP8_MAX, amax) : 0.0f;
            Q q;
            unsigned short* out = reinterpret_cast<unsigned short*>(&q);
#pragma unroll
            for (int e = 0; e < ELEMS; e += 2)
                out[e / 2] = float2_to_e4m3x2(fminf(fmaxf(__fmul_rn(x[e], multiplier), -FP8_MAX), FP8_MAX),
                                              fminf(fmaxf(__fmul_rn(x[e + 1], multiplier), -FP8_MAX), FP8_MAX));
            store(reinterpret_cast<Q*>(values + (u64)row * g.head_dim) + part, q);
            if (part == 0) scales[row] = __fdiv_rn(amax, FP8_MAX);
        }
    }
}

template <int DST, int LANES>
__global__ void __launch_bounds__(THREADS) kvlink_unpack_fp8_vec(
    const unsigned char* __restrict__ meta, const u64* __restrict__ plane_ptrs,
    const unsigned char* __restrict__ chunk, int* __restrict__ status) {
    constexpr int ELEMS = 16 / Elem<DST>::BYTES;
    constexpr int SLOTS = THREADS / LANES;
    typedef typename Fp8Bytes<ELEMS>::T Q;
    const Geometry g = *reinterpret_cast<const Geometry*>(meta);
    const int* block_ids = reinterpret_cast<const int*>(meta + META_BLOCK_IDS_OFFSET);
    if (chunk_refused(g, meta, chunk, status)) return;
    const unsigned char* values = chunk + HEADER_BYTES;
    const float* scales = reinterpret_cast<const float*>(values + (u64)g.num_planes * g.plane_bytes);
    const float inv_cache_scale = __uint_as_float(g.inv_cache_scale_bits);
    const u32 slot = threadIdx.x / LANES, part = threadIdx.x % LANES;
    for (u32 first = blockIdx.x * (SLOTS * FP8_ROWS); first < g.num_tiles; first += gridDim.x * (SLOTS * FP8_ROWS)) {
        Q q[FP8_ROWS];
        float scale[FP8_ROWS];
#pragma unroll
        for (int u = 0; u < FP8_ROWS; ++u) {
            const u32 row = first + u * SLOTS + slot;
            if (row < g.num_tiles) {
                q[u] = load(reinterpret_cast<const Q*>(values + (u64)row * g.head_dim) + part);
                scale[u] = scales[row];
            }
        }
#pragma unroll
        for (int u = 0; u < FP8_ROWS; ++u) {
            const u32 row = first + u * SLOTS + slot;
            if (row >= g.num_tiles) continue;
            const u32 p = fast_div(row, g.tpp_mul, g.tpp_shift);
            uint4 out;
            unsigned char* bytes = reinterpret_cast<unsigned char*>(&out);
            const unsigned char* in = reinterpret_cast<const unsigned char*>(&q[u]);
#pragma unroll
            for (int e = 0; e < ELEMS; ++e)
                Elem<DST>::store(bytes + e * Elem<DST>::BYTES, __fmul_rn(e4m3_to_float(in[e]), scale[u]), inv_cache_scale);
            store(reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(plane_ptrs[p])
                  + cache_offset(g, block_ids, row - p * g.tiles_per_plane, 0)) + part, out);
        }
    }
}

// A chunk's payload checksum (kvlink/wire.py: payload_checksum_numpy): over the payload's
// little-endian 32-bit words w_i (the last one zero-padded), s1 = sum w_i and s2 = sum i * w_i
// (i from 1), both mod 2^32, folded as s1 ^ rotl(s2, 16). Sums mod 2^32 do not depend on the
// order of their terms, so each block adds its part atomically into scratch[0..1], and the last
// block to finish (scratch[2] counts them) folds the result and zeroes the scratch for the next
// chunk. No temporary memory: the pipeline runs it with GPU waits queued behind host work still
// to come, where an allocation could wait for them. VERIFY = 0 writes the checksum into the
// header's checksum word; VERIFY = 1 compares it with that word and, when they differ, spoils
// the magic word (the unpack then refuses the chunk whole) and sets *bad to 1.
template <int VERIFY>
__global__ void __launch_bounds__(THREADS) kvlink_checksum(
    u64 chunk_address, u64 payload_offset, u64 payload_bytes, u64 checksum_offset, u64 scratch_address,
    u64 bad_address) {
    unsigned char* chunk = reinterpret_cast<unsigned char*>(chunk_address);
    const unsigned char* payload = chunk + payload_offset;
    u32* scratch = reinterpret_cast<u32*>(scratch_address);
    const u64 words = (payload_bytes + 3) / 4;
    const bool aligned = (reinterpret_cast<u64>(payload) & 3) == 0;
    u32 s1 = 0, s2 = 0;
    for (u64 i = blockIdx.x * (u64)THREADS + threadIdx.x; i < words; i += (u64)gridDim.x * THREADS) {
        u32 w = 0;
        if (aligned && 4 * i + 4 <= payload_bytes) {
            w = reinterpret_cast<const u32*>(payload)[i];
        } else {
            for (u64 b = 0; b < 4 && 4 * i + b < payload_bytes; ++b) w |= (u32)payload[4 * i + b] << (8 * b);
        }
        s1 += w;
        s2 += w * (u32)(i + 1);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        s1 += __shfl_down_sync(0xffffffffu, s1, offset);
        s2 += __shfl_down_sync(0xffffffffu, s2, offset);
    }
    __shared__ u32 warp_s1[THREADS / 32], warp_s2[THREADS / 32];
    if ((threadIdx.x & 31) == 0) {
        warp_s1[threadIdx.x >> 5] = s1;
        warp_s2[threadIdx.x >> 5] = s2;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < THREADS / 32; ++w) {
        warp_s1[0] += warp_s1[w];
        warp_s2[0] += warp_s2[w];
    }
    atomicAdd(&scratch[0], warp_s1[0]);
    atomicAdd(&scratch[1], warp_s2[0]);
    __threadfence();  // our sums are visible before our count
    if (atomicAdd(&scratch[2], 1u) != gridDim.x - 1) return;  // not the last block to finish
    __threadfence();
    const u32 sum1 = atomicExch(&scratch[0], 0u), sum2 = atomicExch(&scratch[1], 0u);
    atomicExch(&scratch[2], 0u);
    const u32 checksum = sum1 ^ ((sum2 << 16) | (sum2 >> 16));
    unsigned char* word = chunk + checksum_offset;
    if (!VERIFY) {
        for (int b = 0; b < 4; ++b) word[b] = (unsigned char)(checksum >> (8 * b));
        return;
    }
    u32 stored = 0;
    for (int b = 0; b < 4; ++b) stored |= (u32)word[b] << (8 * b);
    if (stored != checksum) {
        for (int b = 0; b < 4; ++b) chunk[b] ^= 0x55;  // the magic word, XOR 0x55555555
        *reinterpret_cast<volatile u32*>(bad_address) = 1;
    }
}

// The instantiations the library compiles and launches are listed once, in
// kvlink/kernels.py:KERNEL_NAMES (NVRTC name expressions); kvlink/compile_check.py compiles
// every one of them offline and checks each is in the cubin.
