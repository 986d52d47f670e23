// Fused CPU selective scan (mamba_ssm's selective_scan_fn semantics), forward and backward.
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = C_t . h_t + D * u_t,   out_t = y_t * silu(z_t)
//
// Design notes (the "why"):
//  * Memory. Materialising the states h as a (batch, d, L, n) tensor costs n times more memory than any
//    input. The forward keeps a row's state (n values) in a small buffer and only writes the state at the
//    end of every kChunk steps ("checkpoints", (batch, d, ceil(L/kChunk), n)). The backward walks the
//    chunks in reverse, recomputes one chunk of states from the previous checkpoint into a thread-local
//    kChunk*n buffer (it stays in L1/L2) and runs the reverse recurrence for dh over it.
//  * Layout. For a fixed (b, d) we stream over t; B and C are (batch, n, L), so their columns for one t
//    are strided by L. The inner loops over the state dimension n want them contiguous: the backward (and
//    the forward's generic loop) get B and C transposed to (batch, L, n) by the wrapper (an O(batch*L*n)
//    copy); builds with the tiled forward (AVX-512 or AVX2) read the (batch, n, L) rows and transpose one
//    chunk at a time into a small buffer shared by the rows (tiles) of a batch element (see check_bc).
//  * Chunk-major order. A task advances all of its rows (same batch element) through chunk c before
//    moving to chunk c+1 (backward: c-1), so the kChunk*n slices of B, C (and of the dB/dC accumulators)
//    are loaded from memory once per chunk and reused from cache by every row.
//  * exp(dt*A) per (t, n) is the dominant cost: see Exp<float> (vectorised polynomial); computed in its
//    own loop over the chunk, where the exps are independent and overlap well. With AVX-512 or AVX2 the
//    fp32 forward instead runs a hand-vectorised step loop, the exps computed in the step loop itself:
//    over tiles of W channels, one per SIMD lane (forward_tiles, W = 16 with AVX-512, whose exp2_avx512
//    takes 8 instructions per 16 exps, 8 with AVX2: no horizontal sums; every EMamba shape), else (AVX-512 only)
//    row by row with the state in zmm registers (forward_chunk_avx512).
//  * Elementwise work on (b, d, t) is fused here per chunk: the silu(z) gate and its derivative, and in the
//    forward the step prologue dt = softplus(delta + delta_bias) (see Softplus<float>). The backward takes
//    the effective step from the Python wrapper, which also chains the gradient through softplus with ATen.
//  * Reductions. dA, dD are summed over batch and dB, dC over d. Batch elements are processed one after
//    another and the parallel loop runs over blocks of d inside one batch element: dA[d], dD[d] then have a
//    single writer (no race, no buffer). dB/dC use one (L, 2, n) accumulator per block (blocks <= threads),
//    summed into the (batch, L, n) outputs after each batch element. No (batch, d, n, L) buffer exists.

// Lighter than <torch/extension.h> (which pulls in all of libtorch's C++ API): cuts the one-time build.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// The fp32 AVX-512 step loops (forward_chunk_avx512, forward_tiles with 16 lanes, backward_chunk_avx512) need
// AVX512F and AVX512DQ. One definition for the loops, their dispatch and avx512_step_loop().
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define EMAMBA_AVX512_STEP_LOOP 1
#endif
// The tiled fp32 forward (forward_tiles): 16 channels per zmm register with AVX-512, else 8 per ymm register
// with AVX2 + FMA (TileLanes). Builds that have it read B and C as (batch, n, L) rows (tile_lanes() > 0).
#if defined(EMAMBA_AVX512_STEP_LOOP) || (defined(__AVX2__) && defined(__FMA__))
#define EMAMBA_TILED_FORWARD 1
#endif

namespace {

constexpr int64_t kChunk = 64;  // keep in sync with CHUNK in scan_cpu.py
// Minimum (time step x state) updates per parallel task: below this, waking the thread pool costs more
// than the work (tiny calls, e.g. in gradcheck, would otherwise be dominated by OpenMP barriers).
constexpr int64_t kMinTaskWork = int64_t(1) << 16;

// ---------------------------------------------------------------------------------------------------
// exp. fp32: exp(x) = 2^(x*log2 e); callers pre-multiply A by log2(e) (kScale) once per row and chunk.
// 2^x is evaluated branch-free so the compiler vectorises it inside `omp simd` loops: x = k + r with
// k = round(x) (1.5*2^23 shifter), |r| <= 1/2; 2^r by a degree-5 polynomial fitted on [-1/2, 1/2] for
// minimal relative error with p(0) = 1 exactly (so exp(0) = 1: a zero step keeps the state); 2^k written
// straight into the exponent bits. Relative error below 2e-7 (1.7e-7 measured; ~1.5 ulp) against 2^x in
// fp64 over the normal range (tests/ops/test_scan_cpu.py). The exps are the forward's bottleneck (about
// 60% of its time); the degree-6 polynomial used before (1e-7) made the forward 5-9% slower, for an
// accuracy gain below the fp32 rounding of the recurrence itself. Edge
// handling costs two ops: for x < -126.5 the result is 0 (no denormal decays), k is clamped at 128 so
// overflow gives +inf (from x >= 127.5 on), NaN propagates. x = +inf itself gives NaN (r = inf - inf):
// the decays' argument dt * A is never +inf (A < 0 in Mamba), and silu(-inf) is NaN in PyTorch too.
// fp64: std::exp, exact agreement with the reference (gradcheck); speed is secondary there.
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct Exp;

template <>
struct Exp<float> {
  static constexpr float kScale = 1.44269504088896341f;  // log2(e)
  static inline __attribute__((always_inline)) float exp2(float x) {
    const float xc = x < -127.0f ? -127.0f : x;  // NaN passes through; -127 gives scale 0 below
    const float shifter = 12582912.0f;           // 1.5 * 2^23: (x + s) - s rounds x to an integer
    const float t = xc + shifter;
    const float kf = t - shifter;
    const float r = xc - kf;
    float p = 1.326472731307149e-3f;
    p = p * r + 9.671512991189957e-3f;
    p = p * r + 5.550733581185341e-2f;
    p = p * r + 2.4022242426872253e-1f;
    p = p * r + 6.931470036506653e-1f;
    p = p * r + 1.0f;
    // The low mantissa bits of t hold k (bits(t) = bits(s) + k) and bits(s) << 23 vanishes mod 2^32, so
    // (bits(t) << 23) + (127 << 23) is the fp32 pattern of 2^k: k = -127 -> 0, k = 128 -> inf.
    // (Clamped here on the integer side: a float clamp of x to 128 made the forward 23% slower.)
    int32_t tb;
    std::memcpy(&tb, &t, sizeof(tb));
    const int32_t tmax = 0x4B400000 + 128;
    tb = tb < tmax ? tb : tmax;
    const uint32_t bits = (static_cast<uint32_t>(tb) << 23) + (127u << 23);
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  }
  // exp of a pre-scaled argument (x = y * kScale).
  static inline __attribute__((always_inline)) float apply(float x) { return exp2(x); }
  static inline __attribute__((always_inline)) float sigmoid(float z) {
    return 1.0f / (1.0f + exp2(-z * kScale));
  }
};

template <>
struct Exp<double> {
  static constexpr double kScale = 1.0;
  static inline double apply(double x) { return std::exp(x); }
  static inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
};

// Effective step of the forward: dt = softplus(delta + bias) with F.softplus's threshold (x > 20 -> x).
// fp32: softplus(x) = max(x, 0) + ln(1 + y), y = exp(-|x|) in (0, 1], with ln(1 + y) = 2 atanh(s),
// s = y / (2 + y) in (0, 1/3], by its odd series to s^11 (truncation < 1e-8 relative): branch-free, so the
// step loop vectorises. Relative error against F.softplus below 1e-6 for |x| <= 15 (measured); beyond, the
// fp32 rounding of x * log2(e) adds ~|x| * 6e-8 (3e-6 at x = -60, where dt ~ 1e-26), as for exp(dt * A)
// everywhere in this kernel. Fused into the forward, this prologue saves two full passes over
// (batch, d, L) and both temporaries (stage-1 peak memory 61 -> 37 MB; the time change was within noise).
// The backward gets the same steps from scan_steps, so its state recompute stays bit-identical.
// fp64: std::log1p(std::exp(x)), as ATen computes it.
template <typename T>
struct Softplus;

template <>
struct Softplus<float> {
  static inline __attribute__((always_inline)) float apply(float x) {
    const float ax = x < 0.0f ? -x : x;
    const float y = Exp<float>::exp2(-ax * Exp<float>::kScale);
    const float s = y / (2.0f + y);
    const float s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    const float sp = (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
    return x > 20.0f ? x : sp;
  }
};

template <>
struct Softplus<double> {
  static inline double apply(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
};

// dt[t] for t in [t0, t1) of one row: delta (+ bias) (then softplus), into dt_row (indexed by t).
template <typename T>
inline void effective_steps(const T* __restrict delta, T bias, bool softplus, int64_t t0, int64_t t1,
                            T* __restrict dt_row) {
  if (softplus) {
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) dt_row[t] = Softplus<T>::apply(delta[t] + bias);
  } else {
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) dt_row[t] = delta[t] + bias;
  }
}

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

// Prefetches steps [t0, min(L, t0 + kChunk)) of one row of a (batch, d, L) tensor (nothing when t0 is out
// of [0, L)): the row-chunk a loop reads next. Rows L apart taken chunk by chunk (in the backward, in
// reverse chunk order) are more streams than the hardware prefetcher follows; without this the first
// reads of each row-chunk stalled on memory (~20% of the samples in `perf`, tiled forward and backward).
// On x86 an `asm volatile` prefetcht0: GCC 12 deleted the __builtin_prefetch loops of the tiled forward
// as dead code (no prefetch instruction was left in forward_tiles' object code), which an asm statement
// with side effects rules out; the tiled stage-1 forward then ran 1.09x faster.
template <typename T>
inline void prefetch_row_chunk(const T* row, int64_t t0, int64_t L) {
  if (t0 < 0) return;
  for (int64_t t = t0; t < std::min(L, t0 + kChunk); t += 64 / int64_t(sizeof(T))) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(row[t]));
#else
    __builtin_prefetch(row + t);
#endif
  }
}

// Calls fn(std::integral_constant<int, V>) with V = value when value is one of Sizes, and V = 0 (the value
// read at run time) otherwise, so that hot loops can be compiled for the sizes EMamba uses.
template <int... Sizes, typename Fn>
inline void with_constant(int64_t value, Fn&& fn) {
  const bool matched = ((value == Sizes ? (fn(std::integral_constant<int, Sizes>{}), true) : false) || ...);
  if (!matched) fn(std::integral_constant<int, 0>{});
}

// The state sizes EMamba uses. With n a compile-time constant the chunk loops keep the running state
// (forward: h, backward: dh) in a local array the compiler holds in registers for a whole chunk, instead
// of loading and storing it at every time step: about 20-30% less time per scan on AVX2.
template <typename Fn>
inline void with_state_size(int64_t n, Fn&& fn) {
  with_constant<8, 16, 32, 64>(n, std::forward<Fn>(fn));
}

#if defined(__AVX512F__)
// 16 decays 2^x at once in 8 vector instructions: x = floor(x) + r with r in [0, 1) from one vreduceps,
// 2^r by a degree-5 polynomial fitted on [0, 1) (p(0) = 1 exactly, so exp(0) = 1), and vscalefps, which
// multiplies p by 2^floor(x) itself (exactly; overflow to inf, NaN kept), so k is never formed; a mask zeroes
// x < -126 (no denormal decays). The generic loop needs ~14 ops per 8 exps (GCC compiles it for 256-bit
// vectors on these cores). History: this exp first copied Exp<float>::exp2 bit for bit (round-to-nearest
// reduction, k = x - r, then the scale: 9 instructions); r = x - floor(x) drops the subtraction, forward
// 1.03-1.06x faster on a Xeon (results/bench/scan_exp_floor_ab.txt). vreduceps rounds r downwards, and
// the polynomial differs, so it is no longer bit-identical to exp2 (within 3e-7 relative of it; 1.6e-7 of
// 2^x, measured, against exp2's 1.7e-7). Every decay of an AVX-512 build's fp32 scan with n % 16 == 0 comes
// from here (forward_tiles, forward_chunk_avx512, backward_chunk_avx512, chunk_decays), so the forward's
// states and the backward's recompute of them stay bit-identical. x = +inf gives +inf (exp2: NaN), x in
// [127.5, 128) the finite true value (exp2: inf); neither occurs in a decay.
static inline __attribute__((always_inline)) __m512 exp2_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(1.8671263242140412e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.0170381590724e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.579990893602371e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4016445875167847e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931512951850891e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, x);  // p * 2^floor(x)
}
#endif

// Decays exp(dt_t * A) for steps [t0, t1) into abuf ((t1 - t0, n)). A separate pass over the whole chunk
// (no loop-carried dependency, no reduction) lets the core overlap many independent exp evaluations;
// fused into the generic recurrence loop it runs measurably slower (the AVX-512 forward fuses them: see
// forward_chunk_avx512). Used by the backward's recompute, the generic forward and decays_probe.
template <typename T>
inline void chunk_decays(const T* __restrict dt, const T* __restrict As, int64_t t0, int64_t t1, int64_t n,
                         T* __restrict abuf) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (n % 16 == 0) {
      for (int64_t t = t0; t < t1; ++t) {
        const __m512 dtt = _mm512_set1_ps(dt[t]);
        float* __restrict ar = abuf + (t - t0) * n;
        for (int64_t k = 0; k < n; k += 16)
          _mm512_storeu_ps(ar + k, exp2_avx512(_mm512_mul_ps(dtt, _mm512_loadu_ps(As + k))));
      }
      return;
    }
  }
#endif
  for (int64_t t = t0; t < t1; ++t) {
    const T dtt = dt[t];
    T* __restrict ar = abuf + (t - t0) * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) ar[k] = Exp<T>::apply(dtt * As[k]);
  }
}

// Sum of v[0..W) by pairwise halving (W a power of two >= 8): each halving is one vectorised add, and the
// additions of one level are independent, so the dependency chain is log2(W) adds, not W.
template <typename T, int W>
inline __attribute__((always_inline)) T tree_sum(T* __restrict v) {
  if constexpr (W > 8) {
#pragma omp simd
    for (int k = 0; k < W / 2; ++k) v[k] += v[k + W / 2];
    return tree_sum<T, W / 2>(v);
  } else {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward of steps [t0, t1) of one (b, d) row, carrying the state h (n) in place.
//   u, dt, z, out: the row of the (batch, d, L) tensors (z may be null); As: A[d] * Exp<T>::kScale;
//   Bt, Ct: steps [t0, t1) of B, C as (t1 - t0, n) (see transpose_chunk); abuf: kChunk * n scratch.
// ---------------------------------------------------------------------------------------------------
#ifdef EMAMBA_AVX512_STEP_LOOP
// tree_sum<float, NF>(c * h) for NF in {16, 32, 64} held in NF / 16 vectors, in the same order of additions
// (so the sum is bit-identical to the generic loop's, which the backward's recompute uses).
template <int NF>
static inline __attribute__((always_inline)) float tree_sum_avx512(const __m512* p) {
  __m512 s;
  if constexpr (NF == 64) {
    s = _mm512_add_ps(_mm512_add_ps(p[0], p[2]), _mm512_add_ps(p[1], p[3]));
  } else if constexpr (NF == 32) {
    s = _mm512_add_ps(p[0], p[1]);
  } else {
    s = p[0];
  }
  const __m256 e = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  const __m256 f = _mm256_add_ps(e, _mm256_permute_ps(e, 0xB1));  // v0+v1, v2+v3, v4+v5, v6+v7
  const __m256 g = _mm256_add_ps(f, _mm256_permute_ps(f, 0x4E));  // (v0+v1)+(v2+v3), (v4+v5)+(v6+v7)
  return _mm256_cvtss_f32(g) + _mm_cvtss_f32(_mm256_extractf128_ps(g, 1));
}

// forward_chunk for fp32 and NF in {16, 32, 64} with the state in NF / 16 zmm registers and the decays
// computed inside the step loop (they do not depend on the state, so the core overlaps them with the
// recurrence; no decay buffer is written or read).
template <int NF>
inline void forward_chunk_avx512(const float* __restrict u, const float* __restrict dt, const float* __restrict z,
                                 const float* __restrict As, const float* __restrict Bt,
                                 const float* __restrict Ct, float Dd, int64_t t0, int64_t t1,
                                 float* __restrict out, float* __restrict h) {
  constexpr int V = NF / 16;
  __m512 hv[V], av[V], prod[V];
  for (int v = 0; v < V; ++v) {
    hv[v] = _mm512_loadu_ps(h + 16 * v);
    av[v] = _mm512_loadu_ps(As + 16 * v);
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float ut = u[t];
    const __m512 dtt = _mm512_set1_ps(dt[t]);
    const __m512 du = _mm512_set1_ps(dt[t] * ut);
    const float* __restrict b = Bt + (t - t0) * NF;
    const float* __restrict cc = Ct + (t - t0) * NF;
    for (int v = 0; v < V; ++v) {
      const __m512 a = exp2_avx512(_mm512_mul_ps(dtt, av[v]));
      hv[v] = _mm512_fmadd_ps(a, hv[v], _mm512_mul_ps(du, _mm512_loadu_ps(b + 16 * v)));
    }
    for (int v = 0; v < V; ++v) prod[v] = _mm512_mul_ps(_mm512_loadu_ps(cc + 16 * v), hv[v]);
    out[t] = tree_sum_avx512<NF>(prod) + Dd * ut;
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(h + 16 * v, hv[v]);
  if (z) {
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) out[t] *= z[t] * Exp<float>::sigmoid(z[t]);
  }
}

// dst[c * ds + r] = src[r * ss + c] for r, c < 16, in 56 shuffles: 4 x 4 transposes inside the 128-bit
// lanes (two rounds of unpacks), then the 4 x 4 transpose of the lanes themselves. Moves the tile's rows
// (one per channel, along t) to and from the (t, 16) layout of the step loop, and the state to checkpoints.
static inline __attribute__((always_inline)) void transpose16(const float* __restrict src, int64_t ss,
                                                              float* __restrict dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + e], 128-bit lane q: column 4 q + e of rows i .. i + 3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
    const __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int e = 0; e < 4; ++e) {  // column 4 q + e = lane q of r[e], r[4 + e], r[8 + e], r[12 + e]
    const __m512 x0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44), x1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44);
    const __m512 x3 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
    _mm512_storeu_ps(dst + e * ds, _mm512_shuffle_f32x4(x0, x2, 0x88));
    _mm512_storeu_ps(dst + (4 + e) * ds, _mm512_shuffle_f32x4(x0, x2, 0xDD));
    _mm512_storeu_ps(dst + (8 + e) * ds, _mm512_shuffle_f32x4(x1, x3, 0x88));
    _mm512_storeu_ps(dst + (12 + e) * ds, _mm512_shuffle_f32x4(x1, x3, 0xDD));
  }
}
#endif

#ifdef EMAMBA_TILED_FORWARD
// ---------------------------------------------------------------------------------------------------
// The fp32 forward over tiles of kTileRows = W rows: channels d0 .. d0 + W - 1 of one batch element, one SIMD
// lane per channel (W = 16 with AVX-512, 8 with AVX2; TileLanes). The per-row loops hold one row's state
// across the lanes, so every step ends in a horizontal sum (y_t = C_t . h_t) of ~9 shuffles and adds: at
// n = 16 that is as much work as the step itself, at n = 64 about 15%. With the lanes across channels,
// C_t . h_t is a plain FMA chain over the state index, B_t[k] and C_t[k] (shared by the W channels) are one
// broadcast load each, and the state is G registers per pass over the chunk (G state indices at a time;
// the passes are independent: each index has its own recurrence). G = 8 (kTileStates) for both widths: with
// AVX-512, 16 ran out of the 32 registers (1.14x slower at stage 1) and 4 measured the same as 8; with AVX2
// (16 registers), 4 was within noise of 8 (0.92-1.08x).
// h_t and the checkpoints are bit-identical to the per-row loop (same exp, same products, same FMA); y sums
// C_t[k] h_t[k] in a different order:
//   acc_j = C_j h_j, then acc_j = fma(C_{j+4i}, h_{j+4i}, acc_j) for i = 1 .. G/4 - 1 (j = 0 .. 3),
//   y_pass = (acc_0 + acc_1) + (acc_2 + acc_3), y = y_pass(0) + y_pass(1) + ... in pass order,
// so y differs from the backward's recompute of it (used only for dz) by fp32 rounding.
// ---------------------------------------------------------------------------------------------------
struct TileLanes {
#ifdef EMAMBA_AVX512_STEP_LOOP
  using V = __m512;
  static constexpr int64_t W = 16;
  static inline __attribute__((always_inline)) V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __attribute__((always_inline)) void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline __attribute__((always_inline)) V set1(float x) { return _mm512_set1_ps(x); }
  static inline __attribute__((always_inline)) V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline __attribute__((always_inline)) V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline __attribute__((always_inline)) V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline __attribute__((always_inline)) V exp2(V x) { return exp2_avx512(x); }
  static inline __attribute__((always_inline)) void transpose(const float* __restrict src, int64_t ss,
                                                              float* __restrict dst, int64_t ds) {
    transpose16(src, ss, dst, ds);
  }
#else
  using V = __m256;
  static constexpr int64_t W = 8;
  static inline __attribute__((always_inline)) V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __attribute__((always_inline)) void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline __attribute__((always_inline)) V set1(float x) { return _mm256_set1_ps(x); }
  static inline __attribute__((always_inline)) V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline __attribute__((always_inline)) V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline __attribute__((always_inline)) V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // Exp<float>::exp2 on 8 lanes, bit for bit: the same clamp (max(-127, x) keeps NaN), shifter rounding,
  // Horner FMAs and exponent-bit construction (the integer clamp at k = 128 gives inf).
  static inline __attribute__((always_inline)) V exp2(V x) {
    const V shifter = _mm256_set1_ps(12582912.0f);
    const V xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // max(a, b) returns b when either is NaN
    const V t = _mm256_add_ps(xc, shifter);
    const V r = _mm256_sub_ps(xc, _mm256_sub_ps(t, shifter));
    V p = _mm256_set1_ps(1.326472731307149e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.671512991189957e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.550733581185341e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022242426872253e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.931470036506653e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i tb = _mm256_min_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 + 128));
    const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(tb, 23), _mm256_set1_epi32(127 << 23));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  // dst[c * ds + r] = src[r * ss + c] for r, c < 8, in 24 shuffles: unpacks and shuffles transpose the 4 x 4
  // blocks inside the 128-bit halves, permute2f128 swaps the off-diagonal halves.
  static inline __attribute__((always_inline)) void transpose(const float* __restrict src, int64_t ss,
                                                              float* __restrict dst, int64_t ds) {
    __m256 r[8], t[8], s[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // s[i + e]: column e (half 0) and e + 4 (half 1) of rows i .. i + 3
      s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int e = 0; e < 4; ++e) {
      _mm256_storeu_ps(dst + e * ds, _mm256_permute2f128_ps(s[e], s[4 + e], 0x20));
      _mm256_storeu_ps(dst + (4 + e) * ds, _mm256_permute2f128_ps(s[e], s[4 + e], 0x31));
    }
  }
#endif
};

constexpr int64_t kTileRows = TileLanes::W;
constexpr int kTileStates = 8;  // G

// transpose_chunk (steps [t0, t1) of n rows src + k * sn to (t1 - t0, n)) in W x W blocks; n % W == 0.
// The steps past the last full block of W are copied one by one: a block would read past the row's end.
static inline void transpose_chunk_tiles(const float* __restrict src, int64_t sn, int64_t n, int64_t t0,
                                         int64_t t1, float* __restrict buf) {
  constexpr int64_t W = TileLanes::W;
  const int64_t full = t0 + (t1 - t0) / W * W;
  for (int64_t k = 0; k < n; k += W) {
    for (int64_t t = t0; t < full; t += W) TileLanes::transpose(src + k * sn + t, sn, buf + (t - t0) * n + k, n);
    for (int64_t j = k; j < k + W; ++j)
      for (int64_t t = full; t < t1; ++t) buf[(t - t0) * n + j] = src[j * sn + t];
  }
}

// Whether scan_fwd runs forward_tiles (else the per-row loop) for these sizes.
inline bool tiled_forward(int64_t d, int64_t n) { return d % kTileRows == 0 && n % TileLanes::W == 0; }

// len steps of one tile. DT, DTU: (len, W) steps dt and dt * u; At: (n, W) A * log2(e); Bk, Ck: B and C
// of the steps as (len, n): the G values of a pass are at fixed offsets from one pointer (read from
// (batch, n, L) rows, each would need its own address register: the loop ran out of them and reloaded
// from the stack); H: (n, W) state, in and out; Y: (len, W) output C_t . h_t.
template <int G>
inline void forward_tile(const float* __restrict DT, const float* __restrict DTU, const float* __restrict At,
                         const float* __restrict Bk, const float* __restrict Ck, int64_t len, int64_t n,
                         float* __restrict H, float* __restrict Y) {
  static_assert(G % 4 == 0, "four accumulators of C.h");
  using Lanes = TileLanes;
  using V = Lanes::V;
  constexpr int64_t W = Lanes::W;
  for (int64_t g = 0; g < n; g += G) {
    V hv[G];
    for (int j = 0; j < G; ++j) hv[j] = Lanes::load(H + (g + j) * W);
    const float* __restrict Ag = At + g * W;
    for (int64_t i = 0; i < len; ++i) {
      const V dtv = Lanes::load(DT + i * W);
      const V duv = Lanes::load(DTU + i * W);
      const float* __restrict bt = Bk + i * n + g;
      const float* __restrict ct = Ck + i * n + g;
      V acc[4];
      for (int j = 0; j < G; ++j) {
        const V a = Lanes::exp2(Lanes::mul(dtv, Lanes::load(Ag + j * W)));
        hv[j] = Lanes::fmadd(a, hv[j], Lanes::mul(duv, Lanes::set1(bt[j])));
        const V c = Lanes::set1(ct[j]);
        acc[j % 4] = j < 4 ? Lanes::mul(c, hv[j]) : Lanes::fmadd(c, hv[j], acc[j % 4]);
      }
      const V y = Lanes::add(Lanes::add(acc[0], acc[1]), Lanes::add(acc[2], acc[3]));
      float* __restrict yr = Y + i * W;
      Lanes::store(yr, g == 0 ? y : Lanes::add(Lanes::load(yr), y));
    }
    for (int j = 0; j < G; ++j) Lanes::store(H + (g + j) * W, hv[j]);
  }
}
#endif

template <typename T, int NF>
inline void forward_chunk(const T* __restrict u, const T* __restrict dt, const T* __restrict z,
                          const T* __restrict As, const T* __restrict Bt, const T* __restrict Ct, T Dd,
                          int64_t t0, int64_t t1, int64_t n_rt, T* __restrict out, T* __restrict h,
                          T* __restrict abuf) {
  const int64_t n = NF > 0 ? NF : n_rt;
#ifdef EMAMBA_AVX512_STEP_LOOP
  if constexpr (std::is_same_v<T, float> && NF >= 16) {
    forward_chunk_avx512<NF>(u, dt, z, As, Bt, Ct, Dd, t0, t1, out, h);
    return;
  }
#endif
  chunk_decays<T>(dt, As, t0, t1, n, abuf);
  // With n known at compile time the state lives in a local array (registers) for the whole chunk.
  T h_local[NF > 0 ? NF : 1];
  T* __restrict hr = h;
  if constexpr (NF > 0) {
    for (int k = 0; k < NF; ++k) h_local[k] = h[k];
    hr = h_local;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const T ut = u[t];
    const T du = dt[t] * ut;
    const T* __restrict ar = abuf + (t - t0) * n;
    const T* __restrict b = Bt + (t - t0) * n;
    const T* __restrict cc = Ct + (t - t0) * n;
    if constexpr (NF >= 16) {
      // y_t = C_t . h_t summed as a tree: a single `omp simd reduction` accumulator chains NF / lanes
      // dependent FMAs per step (8 x 4 cycles at n = 64 on AVX2), longer than the step's own work.
      T prod[NF];
#pragma omp simd
      for (int k = 0; k < NF; ++k) {
        const T hk = ar[k] * hr[k] + du * b[k];
        hr[k] = hk;
        prod[k] = cc[k] * hk;
      }
      out[t] = tree_sum<T, NF>(prod) + Dd * ut;
    } else {
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) {
        const T hk = ar[k] * hr[k] + du * b[k];
        hr[k] = hk;
        acc += cc[k] * hk;
      }
      out[t] = acc + Dd * ut;
    }
  }
  if constexpr (NF > 0) {
    for (int k = 0; k < NF; ++k) h[k] = h_local[k];
  }
  if (z) {
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) out[t] *= z[t] * Exp<T>::sigmoid(z[t]);
  }
}

// Scratch owned by one backward task (allocated once per task, reused across rows and chunks).
template <typename T>
struct BwdScratch {
  std::vector<T> HA;    // states h_t and decays exp(dt_t A) of the current chunk, (kChunk, n) each
  T* H;                 // (the decays start a few cache lines after the states, so the two arrays are
  T* Adec;              //  not 4 KiB-aliased: same-offset loads/stores would falsely depend on each other)
  std::vector<T> zero;  // (n): h_{-1}
  std::vector<T> As;    // (n): scaled A row
  std::vector<T> ys;    // (kChunk): C.h of the chunk (needed for dz)
  std::vector<T> gy;    // (kChunk): gradient arriving at y = C.h + D u
  std::vector<T> sg;    // (kChunk): sigmoid(z)
  std::vector<T> dh;    // (rows, n): running dL/dh per row of the block, carried across chunks
  std::vector<T> dA;    // (rows, n): dA accumulators per row of the block
  std::vector<T> dD;    // (rows)
#ifdef EMAMBA_AVX512_STEP_LOOP
  std::vector<T> lanes;  // (3, kChunk, 16): per-step partial sums before their lane sums (backward_chunk_avx512)
#endif
  BwdScratch(int64_t n, int64_t rows)
      : HA(2 * kChunk * n + 64), zero(n, T(0)), As(n), ys(kChunk), gy(kChunk), sg(kChunk),
        dh(rows * n, T(0)), dA(rows * n, T(0)), dD(rows, T(0))
#ifdef EMAMBA_AVX512_STEP_LOOP
        , lanes(3 * kChunk * 16, T(0))
#endif
  {
    H = HA.data();
    Adec = HA.data() + kChunk * n + 64;
  }
};

// The backward's elementwise ends, shared by its loops. dL/dy of the chunk's steps: out = y * silu(z), so
// dL/dy = dout * silu(z) (needs no state); sg = sigmoid(z) is kept for dz. Without z, dL/dy = dout.
template <typename T>
inline void chunk_grad_y(const T* __restrict dout, const T* __restrict z, int64_t t0, int64_t len,
                         T* __restrict gy, T* __restrict sg) {
  if (z) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const T zi = z[t0 + i];
      const T sgi = Exp<T>::sigmoid(zi);
      sg[i] = sgi;
      gy[i] = dout[t0 + i] * zi * sgi;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) gy[i] = dout[t0 + i];
  }
}

// dL/dz = dout * y * silu'(z), with y = C.h + D u recomputed (ys: C.h of the chunk's steps).
template <typename T>
inline void chunk_grad_z(const T* __restrict dout, const T* __restrict z, const T* __restrict u,
                         const T* __restrict ys, const T* __restrict sg, T Dd, int64_t t0, int64_t len,
                         T* __restrict dz) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const T zi = z[t0 + i];
    const T y = ys[i] + Dd * u[t0 + i];
    dz[t0 + i] = dout[t0 + i] * y * sg[i] * (T(1) + zi * (T(1) - sg[i]));
  }
}

#ifdef EMAMBA_AVX512_STEP_LOOP
// out[i] = sum of the 16 lanes of V[i] ((len, 16) row-major) for i < len, 16 steps at a time: one transpose16
// and a tree of 15 vector adds per 16 sums, instead of ~9 shuffles and adds for each sum on its own.
static inline void lane_sums(const float* __restrict V, int64_t len, float* __restrict out) {
  alignas(64) float tr[16 * 16];
  alignas(64) float sums[16];
  for (int64_t i = 0; i < len; i += 16) {
    transpose16(V + i * 16, 16, tr, 16);  // row j of tr: lane j of steps i .. i + 15
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(tr + 16 * j);
    for (int w = 8; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) r[j] = _mm512_add_ps(r[j], r[j + w]);
    _mm512_store_ps(sums, r[0]);
    for (int64_t j = 0; j < std::min<int64_t>(16, len - i); ++j) out[i + j] = sums[j];
  }
}

// backward_chunk for fp32 and NF in {16, 32, 64} (same arguments and results), with the row's n-vectors in
// NF / 16 zmm registers. The generic loop's per-step reductions over n (y = C.h for dz, and the sums
// giving ddt and du) ended in ~16 dependent scalar adds each (GCC's `omp simd reduction` epilogue): at
// n = 16 that was most of the backward. Here each step keeps one 16-lane partial vector per sum, and the
// lane sums are taken 16 steps at a time by lane_sums. The states and decays are recomputed exactly as the
// forward computes them (exp2_avx512, the same FMA), so they equal the forward's bit for bit; the sums are
// in another order than the generic loop's (fp32 rounding).
template <int NF>
inline void backward_chunk_avx512(const float* __restrict u, const float* __restrict dt, const float* __restrict z,
                                  const float* __restrict A, const float* __restrict Bt,
                                  const float* __restrict Ct, float Dd, const float* __restrict dout,
                                  const float* __restrict h_start, int64_t t0, int64_t t1, float* __restrict du,
                                  float* __restrict ddt, float* __restrict dz, float* __restrict dh,
                                  float* __restrict dA_row, float* dD_row, float* __restrict dBC,
                                  BwdScratch<float>& s) {
  constexpr int V = NF / 16;
  float* __restrict H = s.H;
  float* __restrict Adec = s.Adec;
  float* __restrict ys = s.ys.data();
  float* __restrict gy = s.gy.data();
  float* __restrict sg = s.sg.data();
  float* __restrict Py = s.lanes.data();                 // (len, 16): C.h partials
  float* __restrict PsA = s.lanes.data() + kChunk * 16;  // (len, 16): A.q partials
  float* __restrict PsB = s.lanes.data() + 2 * kChunk * 16;  // (len, 16): g.B partials
  const int64_t len = t1 - t0;
  __m512 av[V], Av[V];
  for (int v = 0; v < V; ++v) {
    Av[v] = _mm512_loadu_ps(A + 16 * v);
    av[v] = _mm512_mul_ps(Av[v], _mm512_set1_ps(Exp<float>::kScale));  // As = A * kScale, as the forward
  }

  chunk_grad_y(dout, z, t0, len, gy, sg);  // 1) dL/dy

  // 2) Recompute decays and states from the checkpoint; dC_t += dL/dy_t * h_t; C.h partials for dz.
  {
    __m512 hv[V];
    for (int v = 0; v < V; ++v) hv[v] = _mm512_loadu_ps(h_start + 16 * v);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i;
      const __m512 dtt = _mm512_set1_ps(dt[t]);
      const __m512 dut = _mm512_set1_ps(dt[t] * u[t]);
      const __m512 gyi = _mm512_set1_ps(gy[i]);
      const float* __restrict b = Bt + t * NF;
      const float* __restrict cc = Ct + t * NF;
      float* __restrict dCr = dBC + (2 * t + 1) * NF;
      __m512 py[V];
      for (int v = 0; v < V; ++v) {
        const __m512 a = exp2_avx512(_mm512_mul_ps(dtt, av[v]));
        hv[v] = _mm512_fmadd_ps(a, hv[v], _mm512_mul_ps(dut, _mm512_loadu_ps(b + 16 * v)));
        _mm512_storeu_ps(Adec + i * NF + 16 * v, a);
        _mm512_storeu_ps(H + i * NF + 16 * v, hv[v]);
        _mm512_storeu_ps(dCr + 16 * v, _mm512_fmadd_ps(gyi, hv[v], _mm512_loadu_ps(dCr + 16 * v)));
        py[v] = _mm512_mul_ps(_mm512_loadu_ps(cc + 16 * v), hv[v]);
      }
      if (z) {
        for (int w = V / 2; w >= 1; w /= 2)
          for (int v = 0; v < w; ++v) py[v] = _mm512_add_ps(py[v], py[v + w]);
        _mm512_storeu_ps(Py + i * 16, py[0]);
      }
    }
  }

  // 3) dL/dz = dout * y * silu'(z), with y = C.h + D u.
  if (z) {
    lane_sums(Py, len, ys);
    chunk_grad_z(dout, z, u, ys, sg, Dd, t0, len, dz);
  }

  // 4) Reverse recurrence; dh (n) and dA_row (n) in registers for the chunk.
  __m512 dhv[V], dAv[V];
  for (int v = 0; v < V; ++v) {
    dhv[v] = _mm512_loadu_ps(dh + 16 * v);
    dAv[v] = _mm512_loadu_ps(dA_row + 16 * v);
  }
  float dD_acc = 0.0f;
  for (int64_t i = len - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const float dyt = gy[i];
    const __m512 dy = _mm512_set1_ps(dyt);
    const __m512 dtt = _mm512_set1_ps(dt[t]);
    const __m512 dtu = _mm512_set1_ps(dt[t] * u[t]);
    const float* __restrict b = Bt + t * NF;
    const float* __restrict cc = Ct + t * NF;
    const float* __restrict ar = Adec + i * NF;
    const float* __restrict prev = i == 0 ? h_start : H + (i - 1) * NF;
    float* __restrict dBr = dBC + 2 * t * NF;
    __m512 sA[V], sB[V];
    for (int v = 0; v < V; ++v) {
      const __m512 a = _mm512_loadu_ps(ar + 16 * v);
      const __m512 bv = _mm512_loadu_ps(b + 16 * v);
      const __m512 g = _mm512_fmadd_ps(dy, _mm512_loadu_ps(cc + 16 * v), dhv[v]);  // total dL/dh_t
      const __m512 q = _mm512_mul_ps(_mm512_mul_ps(g, a), _mm512_loadu_ps(prev + 16 * v));
      sA[v] = _mm512_mul_ps(Av[v], q);
      dAv[v] = _mm512_fmadd_ps(dtt, q, dAv[v]);
      sB[v] = _mm512_mul_ps(g, bv);
      _mm512_storeu_ps(dBr + 16 * v, _mm512_fmadd_ps(g, dtu, _mm512_loadu_ps(dBr + 16 * v)));
      dhv[v] = _mm512_mul_ps(a, g);
    }
    for (int w = V / 2; w >= 1; w /= 2)
      for (int v = 0; v < w; ++v) {
        sA[v] = _mm512_add_ps(sA[v], sA[v + w]);
        sB[v] = _mm512_add_ps(sB[v], sB[v + w]);
      }
    _mm512_storeu_ps(PsA + i * 16, sA[0]);
    _mm512_storeu_ps(PsB + i * 16, sB[0]);
    dD_acc += dyt * u[t];
  }
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(dh + 16 * v, dhv[v]);
    _mm512_storeu_ps(dA_row + 16 * v, dAv[v]);
  }
  *dD_row += dD_acc;
  float* __restrict sAs = ys;    // reused: (len) lane sums of the A.q and g.B partials
  float* __restrict sBs = sg;
  lane_sums(PsA, len, sAs);
  lane_sums(PsB, len, sBs);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const int64_t t = t0 + i;
    ddt[t] = sAs[i] + u[t] * sBs[i];
    du[t] = dt[t] * sBs[i] + Dd * gy[i];
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// Backward of steps [t0, t1) of one (b, d) row.
//   dout: gradient wrt out. h_start: state entering the chunk (previous checkpoint, or zeros).
//   dh (n): in: dL/dh_{t1-1} through later chunks; out: the same for h_{t0-1}.
//   Writes du, ddt (gradient wrt the effective dt) and dz (if z) on [t0, t1); accumulates dA_row (n),
//   *dD_row and the block accumulator dBC ((L, 2, n): dB and dC interleaved per time step).
// ---------------------------------------------------------------------------------------------------
template <typename T, int NF>
inline void backward_chunk(const T* __restrict u, const T* __restrict dt, const T* __restrict z,
                           const T* __restrict A, const T* __restrict Bt, const T* __restrict Ct, T Dd,
                           const T* __restrict dout, const T* __restrict h_start, int64_t t0, int64_t t1,
                           int64_t n_rt, T* __restrict du, T* __restrict ddt, T* __restrict dz,
                           T* __restrict dh, T* __restrict dA_row, T* dD_row, T* __restrict dBC,
                           BwdScratch<T>& s) {
  const int64_t n = NF > 0 ? NF : n_rt;
#ifdef EMAMBA_AVX512_STEP_LOOP
  if constexpr (std::is_same_v<T, float> && NF >= 16) {
    backward_chunk_avx512<NF>(u, dt, z, A, Bt, Ct, Dd, dout, h_start, t0, t1, du, ddt, dz, dh, dA_row, dD_row,
                              dBC, s);
    return;
  }
#endif
  T* __restrict H = s.H;
  T* __restrict Adec = s.Adec;
  T* __restrict As = s.As.data();
  T* __restrict ys = s.ys.data();
  T* __restrict gy = s.gy.data();
  T* __restrict sg = s.sg.data();
  const int64_t len = t1 - t0;
  for (int64_t k = 0; k < n; ++k) As[k] = A[k] * Exp<T>::kScale;

  // 1) Gradient arriving at y (needs no state).
  chunk_grad_y(dout, z, t0, len, gy, sg);

  // 2) Recompute the chunk's decays and states from the checkpoint (same arithmetic as the forward, so
  //    they are bit-identical to the forward's). dC_t += dL/dy_t * h_t is accumulated here, while h_t is
  //    in a register, which keeps the (heavier) reverse loop lighter.
  chunk_decays<T>(dt, As, t0, t1, n, Adec);
  for (int64_t i = 0; i < len; ++i) {
    const int64_t t = t0 + i;
    const T dut = dt[t] * u[t];
    const T gyi = gy[i];
    const T* __restrict b = Bt + t * n;
    const T* __restrict ar = Adec + i * n;
    const T* __restrict prev = i == 0 ? h_start : H + (i - 1) * n;
    T* __restrict hr = H + i * n;
    T* __restrict dCr = dBC + (2 * t + 1) * n;
    if (z) {
      const T* __restrict cc = Ct + t * n;
      if constexpr (NF >= 16) {
        T prod[NF];  // the per-row forward's tree sum (the tiled forward's y differs by fp32 rounding)
#pragma omp simd
        for (int k = 0; k < NF; ++k) {
          const T hk = ar[k] * prev[k] + dut * b[k];
          hr[k] = hk;
          prod[k] = cc[k] * hk;
          dCr[k] += gyi * hk;
        }
        ys[i] = tree_sum<T, NF>(prod);
      } else {
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < n; ++k) {
          const T hk = ar[k] * prev[k] + dut * b[k];
          hr[k] = hk;
          acc += cc[k] * hk;
          dCr[k] += gyi * hk;
        }
        ys[i] = acc;
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const T hk = ar[k] * prev[k] + dut * b[k];
        hr[k] = hk;
        dCr[k] += gyi * hk;
      }
    }
  }

  // 3) dL/dz, with y = C.h + D u recomputed above.
  if (z) chunk_grad_z(dout, z, u, ys, sg, Dd, t0, len, dz);

  // 4) Reverse recurrence over the chunk. On entry to step t, dh = dL/dh_t through h_{t+1}.
  //    With n known at compile time dh lives in a local array (registers) for the whole chunk.
  T dh_local[NF > 0 ? NF : 1];
  T* __restrict dhr = dh;
  if constexpr (NF > 0) {
    for (int k = 0; k < NF; ++k) dh_local[k] = dh[k];
    dhr = dh_local;
  }
  T dD_acc = T(0);
  for (int64_t i = len - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const T dyt = gy[i];
    const T ut = u[t];
    const T dtt = dt[t];
    const T dtu = dtt * ut;
    const T* __restrict b = Bt + t * n;
    const T* __restrict cc = Ct + t * n;
    const T* __restrict ar = Adec + i * n;
    const T* __restrict prev = i == 0 ? h_start : H + (i - 1) * n;
    T* __restrict dBr = dBC + 2 * t * n;
    T sA = T(0), sB = T(0);
#pragma omp simd reduction(+ : sA, sB)
    for (int64_t k = 0; k < n; ++k) {
      const T g = dhr[k] + dyt * cc[k];  // total dL/dh_t
      const T q = g * ar[k] * prev[k];   // dL/d(dt*A_k) through the decay
      sA += A[k] * q;
      dA_row[k] += dtt * q;
      sB += g * b[k];
      dBr[k] += g * dtu;
      dhr[k] = ar[k] * g;  // pass on to h_{t-1}
    }
    ddt[t] = sA + ut * sB;
    du[t] = dtt * sB + Dd * dyt;
    dD_acc += dyt * ut;
  }
  if constexpr (NF > 0) {
    for (int k = 0; k < NF; ++k) dh[k] = dh_local[k];
  }
  *dD_row += dD_acc;
}

void check_cpu_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_cpu_dtype(t, name, dtype);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// B or C as the forward reads it, (batch, n, L) in one of two layouts; returns true for the first:
//  * rows: unit stride along L (batch and state strides free, e.g. slices of the Mamba mixer's x_proj
//    output): copied chunk by chunk into a (kChunk, n) buffer (transpose_chunk), no whole-tensor copy;
//  * steps: unit stride along n, stride n along L (a transposed view of (batch, L, n) memory): read in place.
bool check_bc(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch, int64_t n, int64_t L) {
  check_cpu_dtype(t, name, dtype);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == n && t.size(2) == L, name,
              " must be (batch, n, L) = (", batch, ", ", n, ", ", L, "), got ", t.sizes());
  const bool steps = (t.stride(1) == 1 || n == 1) && (t.stride(2) == n || L == 1);
  TORCH_CHECK(steps || t.stride(2) == 1 || L == 1, name,
              " must have unit stride along L, or be a transposed view of (batch, L, n) memory");
  return !steps;
}

// Copies steps [t0, t1) of one batch element's B or C ((n, L) rows with stride `sn`) into buf as (t1 - t0, n):
// the step loop reads the state vector of one step contiguously. Done once per chunk and batch element and
// reused by all of a task's rows, it replaces a whole-tensor transposed copy ahead of the kernel. In W x W
// register blocks (transpose_chunk_tiles) where the build has them and n allows, else element by element.
template <typename T>
inline void transpose_chunk(const T* __restrict src, int64_t sn, int64_t n, int64_t t0, int64_t t1,
                            T* __restrict buf) {
#ifdef EMAMBA_TILED_FORWARD
  if constexpr (std::is_same_v<T, float>) {
    if (n % TileLanes::W == 0) {
      transpose_chunk_tiles(src, sn, n, t0, t1, buf);
      return;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict row = src + k * sn;
    for (int64_t t = t0; t < t1; ++t) buf[(t - t0) * n + k] = row[t];
  }
}

#ifdef EMAMBA_TILED_FORWARD
// scan_fwd for fp32 when d and n are multiples of W (B and C in either layout of check_bc): forward_tile over
// tiles of W channels. As in the per-row forward, a task's tiles of one batch element advance chunk by chunk
// together (the chunk's B and C stay in cache for all of them), each with its scaled A and running state
// in (n, W) buffers. Per tile and chunk: the W rows' steps and dt * u are computed row by row and
// transposed to (len, W) in W x W blocks (TileLanes::transpose), and y comes back the same way for y + D u
// and the silu(z) gate; the state goes to its W checkpoints the same way.
// (A template only so that scan_fwd's dispatch compiles for fp64 too; the body exists for fp32 alone.)
template <typename T>
void forward_tiles(const T* up, const T* deltap, const T* Ap, const T* Bp, int64_t sBb, int64_t sBn, bool B_rows,
                   const T* Cp, int64_t sCb, int64_t sCn, bool C_rows, const T* Dp, const T* zp, const T* biasp,
                   bool softplus, int64_t batch, int64_t d, int64_t L, int64_t n, T* op, T* cp) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t R = kTileRows;
    const int64_t nc = num_chunks(L), tiles_per_batch = d / R;
    const bool raw_steps = !biasp && !softplus;
    const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, R * L * n));
    at::parallel_for(0, batch * tiles_per_batch, grain, [&](int64_t begin, int64_t end) {
      // Row-major (W, kChunk) buffers for dt and dt * u (then y), and their (kChunk, W) transposes. Zeroed
      // once: the last W-step block of a short chunk transposes columns past its end (never read back).
      std::vector<float> dt_row(raw_steps ? 0 : L), rows(2 * R * kChunk, 0.0f), DT(kChunk * R, 0.0f),
          DTU(kChunk * R, 0.0f), Y(kChunk * R, 0.0f);
      float* __restrict row_dt = rows.data();
      float* __restrict row_dtu = rows.data() + R * kChunk;
      const int64_t max_tiles = std::min(end - begin, tiles_per_batch);
      std::vector<float> At(max_tiles * n * R), H(max_tiles * n * R);  // per tile of the batch element
      // B and C of the chunk as (kChunk, n), when they come as rows
      std::vector<float> Bc(B_rows ? kChunk * n : 0), Cc(C_rows ? kChunk * n : 0);

      // The W rows of the tile-chunk that follows (prefetch_row_chunk).
      auto prefetch_rows = [&](int64_t r0, int64_t t0) {
        for (int64_t r = r0; r < r0 + R; ++r) {
          prefetch_row_chunk(deltap + r * L, t0, L);
          prefetch_row_chunk(up + r * L, t0, L);
          if (zp) prefetch_row_chunk(zp + r * L, t0, L);
        }
      };

      // Steps [t0, t1) of the tile at rows r0 .. r0 + W - 1 (channels d0 .. d0 + W - 1 of batch element b).
      auto run_tile_chunk = [&](const float* Bk, const float* Ck, int64_t r0, int64_t c, float* at, float* h) {
        const int64_t d0 = r0 % d, t0 = c * kChunk, t1 = std::min(L, t0 + kChunk), len = t1 - t0;
        for (int64_t lane = 0; lane < R; ++lane) {
          const float* __restrict dt = deltap + (r0 + lane) * L;
          if (!raw_steps) {
            effective_steps<float>(dt, biasp ? biasp[d0 + lane] : 0.0f, softplus, t0, t1, dt_row.data());
            dt = dt_row.data();
          }
          const float* __restrict u = up + (r0 + lane) * L;
          float* __restrict rd = row_dt + lane * kChunk;
          float* __restrict ru = row_dtu + lane * kChunk;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            rd[i] = dt[t0 + i];
            ru[i] = dt[t0 + i] * u[t0 + i];
          }
        }
        for (int64_t i = 0; i < len; i += R) {
          TileLanes::transpose(row_dt + i, kChunk, DT.data() + i * R, R);
          TileLanes::transpose(row_dtu + i, kChunk, DTU.data() + i * R, R);
        }
        forward_tile<kTileStates>(DT.data(), DTU.data(), at, Bk, Ck, len, n, h, Y.data());
        float* __restrict row_y = row_dt;  // (W, kChunk): y of each channel
        for (int64_t i = 0; i < len; i += R) TileLanes::transpose(Y.data() + i * R, R, row_y + i, kChunk);
        for (int64_t lane = 0; lane < R; ++lane) {
          const float Dd = Dp ? Dp[d0 + lane] : 0.0f;
          const float* __restrict u = up + (r0 + lane) * L;
          const float* __restrict yr = row_y + lane * kChunk;
          float* __restrict out = op + (r0 + lane) * L;
          if (zp) {
            const float* __restrict z = zp + (r0 + lane) * L;
#pragma omp simd
            for (int64_t t = t0; t < t1; ++t) out[t] = (yr[t - t0] + Dd * u[t]) * (z[t] * Exp<float>::sigmoid(z[t]));
          } else {
#pragma omp simd
            for (int64_t t = t0; t < t1; ++t) out[t] = yr[t - t0] + Dd * u[t];
          }
        }
        if (cp) {
          for (int64_t k = 0; k < n; k += R)  // the state after the chunk: the W rows' checkpoints
            TileLanes::transpose(h + k * R, R, cp + (r0 * nc + c) * n + k, nc * n);
        }
      };

      for (int64_t g0 = begin; g0 < end;) {
        const int64_t b = g0 / tiles_per_batch;
        const int64_t g1 = std::min(end, (b + 1) * tiles_per_batch);  // tiles [g0, g1) share batch element b
        for (int64_t tile = g0; tile < g1; ++tile) {
          const int64_t d0 = (tile * R) % d;
          float* __restrict at = At.data() + (tile - g0) * n * R;
          for (int64_t lane = 0; lane < R; ++lane)
            for (int64_t k = 0; k < n; ++k) at[k * R + lane] = Ap[(d0 + lane) * n + k] * Exp<float>::kScale;
        }
        std::fill(H.begin(), H.end(), 0.0f);
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
          const float* Bk = B_rows ? Bc.data() : Bp + b * sBb + t0 * n;
          const float* Ck = C_rows ? Cc.data() : Cp + b * sCb + t0 * n;
          if (B_rows) transpose_chunk<float>(Bp + b * sBb, sBn, n, t0, t1, Bc.data());
          if (C_rows) transpose_chunk<float>(Cp + b * sCb, sCn, n, t0, t1, Cc.data());
          for (int64_t tile = g0; tile < g1; ++tile) {
            if (tile + 1 < g1) prefetch_rows((tile + 1) * R, t0);
            else prefetch_rows(g0 * R, t1);
            run_tile_chunk(Bk, Ck, tile * R, c, At.data() + (tile - g0) * n * R, H.data() + (tile - g0) * n * R);
          }
        }
        g0 = g1;
      }
    });
  }
}
#endif

}  // namespace

// u, delta, z: (batch, d, L); A: (d, n); B, C: (batch, n, L), unit stride along L (see check_bc); D, delta_bias:
// (d,). D, z and delta_bias optional. The step is dt = delta + delta_bias, then softplus when `softplus`
// (computed here, per chunk, never materialised). Returns (out, checkpoints); with save_checkpoints false
// (inference: no backward will run) the checkpoints are an empty tensor and are never written, which
// saves as much memory as `out` takes at n = 64 and the time to map and fill it.
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& Bm, const at::Tensor& Cm, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& delta_bias, bool softplus,
                                 bool save_checkpoints) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "selective_scan_cpu supports float32/float64");
  check(u, "u", dtype);
  check(delta, "delta", dtype);
  check(A, "A", dtype);
  if (D) check(*D, "D", dtype);
  if (z) check(*z, "z", dtype);
  if (delta_bias) check(*delta_bias, "delta_bias", dtype);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const bool B_rows = check_bc(Bm, "B", dtype, batch, n, L);
  const bool C_rows = check_bc(Cm, "C", dtype, batch, n, L);
  const int64_t nc = num_chunks(L);
  auto out = at::empty_like(u);
  auto ckpt = save_checkpoints ? at::empty({batch, d, nc, n}, u.options()) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_scan_cpu_fwd", [&] {
    using T = scalar_t;
    const T* up = u.data_ptr<T>();
    const T* deltap = delta.data_ptr<T>();
    const T* Ap = A.data_ptr<T>();
    const T* Bp = Bm.data_ptr<T>();
    const T* Cp = Cm.data_ptr<T>();
    const int64_t sBb = Bm.stride(0), sBn = Bm.stride(1), sCb = Cm.stride(0), sCn = Cm.stride(1);
    const T* Dp = D ? D->data_ptr<T>() : nullptr;
    const T* zp = z ? z->data_ptr<T>() : nullptr;
    const T* biasp = delta_bias ? delta_bias->data_ptr<T>() : nullptr;
    const bool raw_steps = !biasp && !softplus;  // delta is already the step: read it in place
    T* op = out.data_ptr<T>();
    T* cp = save_checkpoints ? ckpt.data_ptr<T>() : nullptr;
#ifdef EMAMBA_TILED_FORWARD
    if (std::is_same_v<T, float> && tiled_forward(d, n)) {
      forward_tiles<T>(up, deltap, Ap, Bp, sBb, sBn, B_rows, Cp, sCb, sCn, C_rows, Dp, zp, biasp, softplus, batch, d,
                       L, n, op, cp);
      return;
    }
#endif
    // Rows (b, d) are independent in the forward: parallelise over batch*d. Within a task, rows that
    // share b advance chunk by chunk together; between chunks a row's state lives in its checkpoint slot,
    // which is exactly what the backward needs (without checkpoints: in a per-task slot per row).
    const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, L * n));
    at::parallel_for(0, batch * d, grain, [&](int64_t begin, int64_t end) {
      // decays of the chunk (generic loop), and B, C of the chunk when they come as rows: (kChunk, n) each
      std::vector<T> h(n), As(n), dt_row(raw_steps ? 0 : L), abuf(kChunk * n);
      std::vector<T> Bc(B_rows ? kChunk * n : 0), Cc(C_rows ? kChunk * n : 0);
      std::vector<T> states(cp ? 0 : std::min(end - begin, d) * n);
      for (int64_t g0 = begin; g0 < end;) {
        const int64_t b = g0 / d;
        const int64_t g1 = std::min(end, (b + 1) * d);  // rows [g0, g1) share batch element b
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
          const T* Bk = B_rows ? Bc.data() : Bp + b * sBb + t0 * n;
          const T* Ck = C_rows ? Cc.data() : Cp + b * sCb + t0 * n;
          if (B_rows) transpose_chunk<T>(Bp + b * sBb, sBn, n, t0, t1, Bc.data());
          if (C_rows) transpose_chunk<T>(Cp + b * sCb, sCn, n, t0, t1, Cc.data());
          for (int64_t r = g0; r < g1; ++r) {
            const int64_t di = r % d;
            {
              // the next row's chunk, or the first row's next chunk (prefetch_row_chunk)
              const int64_t nr = r + 1 < g1 ? r + 1 : g0, nt0 = r + 1 < g1 ? t0 : t1;
              prefetch_row_chunk(deltap + nr * L, nt0, L);
              prefetch_row_chunk(up + nr * L, nt0, L);
              if (zp) prefetch_row_chunk(zp + nr * L, nt0, L);
            }
            T* slot = cp ? cp + (r * nc + c) * n : states.data() + (r - g0) * n;  // the state after chunk c
            const T* prev = cp ? slot - n : slot;                                   // ... and after c - 1
            for (int64_t k = 0; k < n; ++k) {
              h[k] = c == 0 ? T(0) : prev[k];
              As[k] = Ap[di * n + k] * Exp<T>::kScale;
            }
            const T* dt = deltap + r * L;
            if (!raw_steps) {
              effective_steps<T>(dt, biasp ? biasp[di] : T(0), softplus, t0, t1, dt_row.data());
              dt = dt_row.data();
            }
            with_state_size(n, [&](auto nf) {
              forward_chunk<T, decltype(nf)::value>(up + r * L, dt, zp ? zp + r * L : nullptr,
                                                    As.data(), Bk, Ck, Dp ? Dp[di] : T(0), t0, t1, n,
                                                    op + r * L, h.data(), abuf.data());
            });
            std::copy(h.begin(), h.end(), slot);
          }
        }
        g0 = g1;
      }
    });
  });
  return {out, ckpt};
}

// dout: (batch, d, L) gradient wrt out; other arguments as in scan_fwd, plus the checkpoints.
// Returns (du, ddt, dA, dB, dC, dD, dz): dB, dC in the transposed (batch, L, n) layout of Bt, Ct; ddt is wrt the
// effective dt; dD / dz are empty tensors when D / z are absent.
std::vector<at::Tensor> scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& dt,
                                 const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
                                 const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                 const at::Tensor& ckpt) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "selective_scan_cpu supports float32/float64");
  check(dout, "dout", dtype);
  check(u, "u", dtype);
  check(dt, "delta", dtype);
  check(A, "A", dtype);
  check(Bt, "B", dtype);
  check(Ct, "C", dtype);
  check(ckpt, "checkpoints", dtype);
  if (D) check(*D, "D", dtype);
  if (z) check(*z, "z", dtype);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t nc = num_chunks(L);
  TORCH_CHECK(ckpt.dim() == 4 && ckpt.size(0) == batch && ckpt.size(1) == d && ckpt.size(2) == nc &&
                  ckpt.size(3) == n,
              "checkpoints has shape ", ckpt.sizes(), ", expected [", batch, ", ", d, ", ", nc, ", ", n, "]");

  auto du = at::empty_like(u);
  auto ddt = at::empty_like(u);
  auto dA = at::zeros_like(A);
  auto dB = at::empty({batch, L, n}, u.options());  // (batch, L, n): the layout of Bt / Ct
  auto dC = at::empty({batch, L, n}, u.options());
  auto dD = at::zeros({d}, u.options());  // always accumulated (cheap); returned empty without D
  auto dz = z ? at::empty_like(u) : at::empty({0}, u.options());

  // One (L, 2, n) dB/dC accumulator per block of d rows; at most one block per thread. This is the only
  // O(L*n) scratch: blocks * 2 * L * n values, independent of d and batch.
  const int64_t nblk = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()), d, d * L * n / kMinTaskWork}));
  auto acc = at::empty({nblk, L, 2, n}, u.options());

  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    const T* doutp = dout.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    const T* dtp = dt.data_ptr<T>();
    const T* Ap = A.data_ptr<T>();
    const T* Bp = Bt.data_ptr<T>();
    const T* Cp = Ct.data_ptr<T>();
    const T* Dp = D ? D->data_ptr<T>() : nullptr;
    const T* zp = z ? z->data_ptr<T>() : nullptr;
    const T* ckp = ckpt.data_ptr<T>();
    T* dup = du.data_ptr<T>();
    T* ddtp = ddt.data_ptr<T>();
    T* dAp = dA.data_ptr<T>();
    T* dBp = dB.data_ptr<T>();
    T* dCp = dC.data_ptr<T>();
    T* dDp = dD.data_ptr<T>();
    T* dzp = z ? dz.data_ptr<T>() : nullptr;
    T* accp = acc.data_ptr<T>();
    const int64_t LN = L * n;

    // Batch elements one after another; inside, blocks of d in parallel. Block j owns rows
    // [j*d/nblk, (j+1)*d/nblk) of this batch element and accumulator j, so dA[d], dD[d] (summed over
    // batch) have a single writer at any time and dB/dC (summed over d) never race.
    for (int64_t b = 0; b < batch; ++b) {
      const T* Bb = Bp + b * LN;
      const T* Cb = Cp + b * LN;
      at::parallel_for(0, nblk, 1, [&](int64_t jb, int64_t je) {
        for (int64_t j = jb; j < je; ++j) {
          T* aBC = accp + j * 2 * LN;
          std::fill(aBC, aBC + 2 * LN, T(0));
          const int64_t d0 = j * d / nblk, d1 = (j + 1) * d / nblk;
          BwdScratch<T> s(n, d1 - d0);
          for (int64_t c = nc - 1; c >= 0; --c) {
            const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
            for (int64_t di = d0; di < d1; ++di) {
              const int64_t r = b * d + di, i = di - d0;
              {
                // the next row's chunk, or the block's first row one chunk back (prefetch_row_chunk)
                const bool last = di + 1 == d1;
                const int64_t nr = last ? b * d + d0 : r + 1, nt0 = last ? t0 - kChunk : t0;
                prefetch_row_chunk(doutp + nr * L, nt0, L);
                prefetch_row_chunk(up + nr * L, nt0, L);
                prefetch_row_chunk(dtp + nr * L, nt0, L);
                if (zp) prefetch_row_chunk(zp + nr * L, nt0, L);
              }
              const T* h_start = c == 0 ? s.zero.data() : ckp + (r * nc + c - 1) * n;
              with_state_size(n, [&](auto nf) {
                backward_chunk<T, decltype(nf)::value>(
                    up + r * L, dtp + r * L, zp ? zp + r * L : nullptr, Ap + di * n, Bb, Cb, Dp ? Dp[di] : T(0),
                    doutp + r * L, h_start, t0, t1, n, dup + r * L, ddtp + r * L, dzp ? dzp + r * L : nullptr,
                    s.dh.data() + i * n, s.dA.data() + i * n, s.dD.data() + i, aBC, s);
              });
            }
          }
          for (int64_t di = d0; di < d1; ++di) {
            const int64_t i = di - d0;
            for (int64_t k = 0; k < n; ++k) dAp[di * n + k] += s.dA[i * n + k];
            dDp[di] += s.dD[i];
          }
        }
      });
      // Sum the block accumulators (L, 2, n) into dB, dC ((batch, L, n) each), in tiles of time steps.
      constexpr int64_t kTile = 64;
      const int64_t tile_grain = std::max<int64_t>(1, kMinTaskWork / (kTile * n * nblk));
      at::parallel_for(0, (L + kTile - 1) / kTile, tile_grain, [&](int64_t tb, int64_t te) {
        for (int64_t tile = tb; tile < te; ++tile) {
          const int64_t t0 = tile * kTile, t1 = std::min(L, t0 + kTile);
          for (int64_t t = t0; t < t1; ++t) {
            T* oB = dBp + (b * L + t) * n;
            T* oC = dCp + (b * L + t) * n;
            const T* a0 = accp + t * 2 * n;
            std::copy(a0, a0 + n, oB);
            std::copy(a0 + n, a0 + 2 * n, oC);
            for (int64_t j = 1; j < nblk; ++j) {
              const T* a = accp + j * 2 * LN + t * 2 * n;
              for (int64_t k = 0; k < n; ++k) {
                oB[k] += a[k];
                oC[k] += a[n + k];
              }
            }
          }
        }
      });
    }
  });
  return {du, ddt, dA, dB, dC, D ? dD : at::empty({0}, u.options()), dz};
}

// The forward's effective steps dt = softplus(delta + delta_bias) (or delta + delta_bias) as a (batch, d, L)
// tensor, computed by the same code as inside scan_fwd: the backward recomputes states from the checkpoints
// with it, and those must match the forward's bit for bit.
at::Tensor scan_steps(const at::Tensor& delta, const std::optional<at::Tensor>& delta_bias, bool softplus) {
  const auto dtype = delta.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "selective_scan_cpu supports float32/float64");
  check(delta, "delta", dtype);
  if (delta_bias) check(*delta_bias, "delta_bias", dtype);
  const int64_t d = delta.size(1), L = delta.size(2), rows = delta.size(0) * d;
  auto dt = at::empty_like(delta);
  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_scan_cpu_steps", [&] {
    using T = scalar_t;
    const T* deltap = delta.data_ptr<T>();
    const T* biasp = delta_bias ? delta_bias->data_ptr<T>() : nullptr;
    T* dtp = dt.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, L)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T bias = biasp ? biasp[r % d] : T(0);
        for (int64_t t0 = 0; t0 < L; t0 += kChunk)  // chunk by chunk, exactly as scan_fwd
          effective_steps<T>(deltap + r * L, bias, softplus, t0, std::min(L, t0 + kChunk), dtp + r * L);
      }
    });
  });
  return dt;
}

// ---------------------------------------------------------------------------------------------------
// Causal depthwise conv1d + SiLU (the Mamba mixer's step before x_proj and the scan):
//   out[b, c, t] = silu(bias[c] + sum_k w[c, k] * x[b, c, t - (K-1) + k]),  x[.., < 0] = 0.
// nn.Conv1d pads both ends, and PyTorch's CPU depthwise conv took 3.4 ms per call at the EMamba-S stage-1
// shape (batch 4, d 128, L 1024), this kernel 0.3 ms: each (b, c) row is one vectorised pass, with the SiLU
// fused. The
// backward recomputes the pre-activation per row (no saved buffer) and parallelises over channels, so
// dw and dbias (summed over batch and time) have a single writer.
// ---------------------------------------------------------------------------------------------------
template <typename T, int KF>
inline void conv_row_preact(const T* __restrict x, const T* __restrict w, T bias, int64_t L, int64_t K_rt,
                            T* __restrict pre) {
  const int64_t K = KF > 0 ? KF : K_rt;
  const int64_t head = std::min<int64_t>(K - 1, L);
  for (int64_t t = 0; t < head; ++t) {  // the first K-1 steps see the zero padding
    T acc = bias;
    for (int64_t k = K - 1 - t; k < K; ++k) acc += w[k] * x[t - (K - 1) + k];
    pre[t] = acc;
  }
#pragma omp simd
  for (int64_t t = head; t < L; ++t) {
    T acc = bias;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * x[t - (K - 1) + k];
    pre[t] = acc;
  }
}

template <typename T>
inline void silu_inplace(T* __restrict o, int64_t L) {
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) o[t] *= Exp<T>::sigmoid(o[t]);
}

// Backward of one row. g: in: the row's pre-activation p; out: dL/dp. Writes dx, adds to dw (K); returns
// the row's dL/dbias.
template <typename T, int KF>
inline T conv_row_backward(const T* __restrict dout, const T* __restrict x, const T* __restrict w, int64_t L,
                           int64_t K_rt, T* __restrict g, T* __restrict dx, T* __restrict dw) {
  const int64_t K = KF > 0 ? KF : K_rt;
  T dbias = T(0);
  // d silu(p)/dp = s (1 + p (1 - s)), s = sigmoid(p)
#pragma omp simd reduction(+ : dbias)
  for (int64_t t = 0; t < L; ++t) {
    const T p = g[t];
    const T sg = Exp<T>::sigmoid(p);
    g[t] = dout[t] * sg * (T(1) + p * (T(1) - sg));
    dbias += g[t];
  }
  // dx[t] = sum_k w[k] dp[t + (K-1) - k]  (terms past the end are 0)
  const int64_t full = std::max<int64_t>(0, L - (K - 1));
#pragma omp simd
  for (int64_t t = 0; t < full; ++t) {
    T acc = T(0);
    for (int64_t k = 0; k < K; ++k) acc += w[k] * g[t + (K - 1) - k];
    dx[t] = acc;
  }
  for (int64_t t = full; t < L; ++t) {
    T acc = T(0);
    for (int64_t k = t + K - L; k < K; ++k) acc += w[k] * g[t + (K - 1) - k];
    dx[t] = acc;
  }
  // dw[k] = sum_t dp[t] x[t - (K-1) + k]
  for (int64_t k = 0; k < K; ++k) {
    T acc = T(0);
    const int64_t t0 = std::max<int64_t>(0, K - 1 - k);
#pragma omp simd reduction(+ : acc)
    for (int64_t t = t0; t < L; ++t) acc += g[t] * x[t - (K - 1) + k];
    dw[k] += acc;
  }
  return dbias;
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "causal_conv1d_cpu supports float32/float64");
  check(x, "x", dtype);
  check(w, "weight", dtype);
  if (bias) check(*bias, "bias", dtype);
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(0) == x.size(1), "x must be (batch, d, L) and weight (d, K)");
}

// x: (batch, d, L); w: (d, K); bias: (d,) or none. Returns silu(causal depthwise conv(x)), (batch, d, L).
at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_conv(x, w, bias);
  const int64_t d = x.size(1), L = x.size(2), K = w.size(1), rows = x.size(0) * d;
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_fwd", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias ? bias->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, L * K)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % d;
        T* o = op + r * L;
        with_constant<4>(K, [&](auto kf) {
          conv_row_preact<T, decltype(kf)::value>(xp + r * L, wp + c * K, bp ? bp[c] : T(0), L, K, o);
        });
        silu_inplace<T>(o, L);
      }
    });
  });
  return out;
}

// dout: gradient wrt conv_fwd's output. Returns (dx, dw, dbias); dbias is empty without bias.
std::vector<at::Tensor> conv_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w,
                                 const std::optional<at::Tensor>& bias) {
  check_conv(x, w, bias);
  check(dout, "dout", x.scalar_type());
  const int64_t batch = x.size(0), d = x.size(1), L = x.size(2), K = w.size(1);
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(w);
  auto db = at::empty({d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_bwd", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias ? bias->data_ptr<T>() : nullptr;
    const T* gp = dout.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    T* dwp = dw.data_ptr<T>();
    T* dbp = db.data_ptr<T>();
    at::parallel_for(0, d, std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, batch * L * K)),
                     [&](int64_t c0, int64_t c1) {
      std::vector<T> dp(L);
      T* __restrict g = dp.data();
      for (int64_t c = c0; c < c1; ++c) {
        const T* wc = wp + c * K;
        T dbias = T(0);
        std::vector<T> dwc(K, T(0));
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t r = b * d + c;
          const T* xr = xp + r * L;
          const T* gr = gp + r * L;
          with_constant<4>(K, [&](auto kf) {
            constexpr int KF = decltype(kf)::value;
            conv_row_preact<T, KF>(xr, wc, bp ? bp[c] : T(0), L, K, g);
            dbias += conv_row_backward<T, KF>(gr, xr, wc, L, K, g, dxp + r * L, dwc.data());
          });
        }
        for (int64_t k = 0; k < K; ++k) dwp[c * K + k] = dwc[k];
        dbp[c] = dbias;
      }
    });
  });
  return {dx, dw, bias ? db : at::empty({0}, x.options())};
}

// exp(x) elementwise with the kernel's fp32 polynomial (the same inline code as its decays and gates), for
// the accuracy tests: the generic exp2, or with `vector` the SIMD one of the fp32 step loops (TileLanes::exp2:
// exp2_avx512 with AVX-512, the AVX2 one otherwise).
at::Tensor fast_exp(const at::Tensor& x, bool vector) {
  check(x, "x", at::kFloat);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (vector) {
#ifdef EMAMBA_TILED_FORWARD
    constexpr int64_t W = TileLanes::W;
    const int64_t m = x.numel();
    at::parallel_for(0, (m + W - 1) / W, kMinTaskWork / W, [&](int64_t begin, int64_t end) {
      float buf[W];
      for (int64_t v = begin; v < end; ++v) {
        const int64_t i = W * v, len = std::min(W, m - i);
        for (int64_t j = 0; j < W; ++j) buf[j] = j < len ? xp[i + j] : 0.0f;
        const TileLanes::V xs = TileLanes::mul(TileLanes::load(buf), TileLanes::set1(Exp<float>::kScale));
        TileLanes::store(buf, TileLanes::exp2(xs));
        std::copy(buf, buf + len, yp + i);
      }
    });
    return y;
#else
    TORCH_CHECK(false, "fast_exp: this build has no SIMD exp");
#endif
  }
  at::parallel_for(0, x.numel(), kMinTaskWork, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) yp[i] = Exp<float>::apply(xp[i] * Exp<float>::kScale);
  });
  return y;
}

// Throughput probe for benchmarks/scan.py's exp floor: evaluates about `count` fp32 decays exp(dt * A) with
// the forward's own loop (chunk_decays: kChunk steps x n states per call) on cache-resident operands, all
// threads, and returns a checksum so that nothing is optimised away. A large elementwise exp would measure
// the memory bandwidth instead (8 bytes per exp against ~0.25 ns of arithmetic on this machine's cores).
double decays_probe(int64_t count, int64_t n) {
  TORCH_CHECK(n > 0 && count > 0, "decays_probe: count and n must be positive");
  const int64_t calls = std::max<int64_t>(1, count / (kChunk * n));
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, calls, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dt(kChunk), As(n), abuf(kChunk * n);
    for (int64_t t = 0; t < kChunk; ++t) dt[t] = 0.01f * static_cast<float>(t + 1);
    for (int64_t k = 0; k < n; ++k) As[k] = -0.1f * static_cast<float>(k + 1) * Exp<float>::kScale;
    double acc = 0.0;
    for (int64_t c = begin; c < end; ++c) {
      dt[c % kChunk] += 1e-6f;  // new inputs every call
      chunk_decays<float>(dt.data(), As.data(), 0, kChunk, n, abuf.data());
      acc += abuf[(c * 7) % (kChunk * n)];
    }
    partial[at::get_thread_num()] += acc;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

int64_t chunk_size() { return kChunk; }

// True when the fp32 loops are the AVX-512 ones (forward_tiles with 16 lanes, else forward_chunk_avx512 for n
// in {16, 32, 64}; backward_chunk_avx512).
bool avx512_step_loop() {
#ifdef EMAMBA_AVX512_STEP_LOOP
  return true;
#else
  return false;
#endif
}

// The width W of the tiled forward's tiles (16 with AVX-512, 8 with AVX2), 0 without it. Builds that have
// it get B and C from the wrapper as (batch, n, L) rows (scan_cpu.reads_bc_rows), transposed per chunk in
// register blocks (transpose_chunk), cheaper than a whole-tensor copy. Without it the generic per-row loop
// ran faster on a (batch, L, n) copy made ahead (7% at the EMamba-S stage-1 shape, scalar per-chunk
// transposes), so such builds keep that copy.
int64_t tile_lanes() {
#ifdef EMAMBA_TILED_FORWARD
  return TileLanes::W;
#else
  return 0;
#endif
}

// Whether the fp32 forward runs forward_tiles for d channels and state size n (tests).
bool tiled_forward_for(int64_t d, int64_t n) {
#ifdef EMAMBA_TILED_FORWARD
  return tiled_forward(d, n);
#else
  (void)d;
  (void)n;
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "fused selective scan forward (CPU)", pybind11::arg("u"), pybind11::arg("delta"),
        pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("C"), pybind11::arg("D"), pybind11::arg("z"),
        pybind11::arg("delta_bias"), pybind11::arg("softplus"), pybind11::arg("save_checkpoints") = true);
  m.def("scan_bwd", &scan_bwd, "fused selective scan backward (CPU)");
  m.def("scan_steps", &scan_steps, "the forward's effective steps softplus(delta + delta_bias) (CPU)");
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d + SiLU forward (CPU)");
  m.def("conv_bwd", &conv_bwd, "causal depthwise conv1d + SiLU backward (CPU)");
  m.def("fast_exp", &fast_exp, "exp with the kernel's fp32 polynomial (accuracy tests)", pybind11::arg("x"),
        pybind11::arg("vector") = false);
  m.def("decays_probe", &decays_probe, "throughput probe of the forward's decay loop (benchmarks)");
  m.def("chunk_size", &chunk_size, "time steps between saved states");
  m.def("avx512_step_loop", &avx512_step_loop, "the fp32 loops are the AVX-512 ones (forward and backward)");
  m.def("tile_lanes", &tile_lanes, "channels per tile of the tiled fp32 forward (16 AVX-512, 8 AVX2, 0 none)");
  m.def("tiled_forward", &tiled_forward_for, "the fp32 forward runs the tiled loop for (d, n)");
}
