// Fused CPU selective scan (mamba_ssm's selective_scan_fn semantics), forward and backward.
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = C_t . h_t + D * u_t
//
// Design notes (the "why"):
//  * Memory bound. A naive implementation materialises the states h as a (batch, d, L, n) tensor, which is
//    n times larger than any input. Here the forward keeps h (n values) in a small per-row buffer and only
//    writes the state at the end of every CHUNK steps ("checkpoints", (batch, d, ceil(L/CHUNK), n)). The
//    backward walks the chunks in reverse, recomputes one chunk of states from the previous checkpoint into
//    a thread-local CHUNK*n buffer (it stays in L1/L2), and runs the reverse recurrence for dh over it.
//  * Layout. For a fixed (b, d) we stream over t; B and C are (batch, n, L), so their columns for one t
//    are strided by L. The wrapper hands us B and C transposed to (batch, L, n) (an O(batch*L*n) copy)
//    so the inner loop over the state dimension n is contiguous and vectorises (`#pragma omp simd`).
//  * exp(dt*A) per (t, n) is the dominant cost; for fp32 we use a branch-free polynomial exp that the
//    compiler vectorises inside the simd loop (~1-2 ulp). fp64 uses std::exp (exactness for gradcheck).
//  * Elementwise prologue/epilogue (delta_bias, softplus, silu(z) and their derivatives) are done by the
//    Python wrapper with ATen's vectorised kernels, so they match PyTorch bit for bit; this file sees the
//    effective dt and the gradient dy arriving at y.
//  * Reductions. dA, dD are summed over batch and dB, dC over d. The batch loop is sequential and the
//    parallel loop runs over blocks of d inside one batch element: dA[d], dD[d] are then owned by exactly
//    one task (no race, no buffer). dB/dC use one (L, n) accumulator per block (nblocks <= threads),
//    reduced and transposed into the output after each batch element. No (batch, d, n, L) buffer exists.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;  // keep in sync with CHUNK in scan_cpu.py

// ---------------------------------------------------------------------------------------------------
// exp: branch-free for fp32 so that it vectorises in `omp simd` loops; std::exp for fp64.
// ---------------------------------------------------------------------------------------------------
static inline __attribute__((always_inline)) float vexp(float x) {
  // Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, then a degree-6 minimax polynomial
  // (Cephes expf coefficients) and scaling by 2^k built directly in the exponent bits.
  float xc = x < -87.33654f ? -87.33654f : x;  // ternaries (not fmin/fmax) so they map to min/max ops
  xc = xc > 88.72283f ? 88.72283f : xc;
  const float kf = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  out = x < -87.33654f ? 0.0f : out;            // underflow (true value is at most a denormal)
  out = x > 88.72283f ? INFINITY : out;          // overflow
  out = x != x ? x : out;                        // propagate NaN
  return out;
}

static inline double vexp(double x) { return std::exp(x); }

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

// ---------------------------------------------------------------------------------------------------
// Forward for one (b, d) row.
//   u, dt, y: length L (row of the (batch, d, L) tensors); A: n; Bt, Ct: (L, n); ckpt: (nchunks, n).
//   y receives C.h + D*u (the silu(z) gate is applied by the wrapper).
// ---------------------------------------------------------------------------------------------------
template <typename T>
void forward_row(const T* __restrict u, const T* __restrict dt, const T* __restrict A,
                 const T* __restrict Bt, const T* __restrict Ct, T Dd, int64_t L, int64_t n,
                 T* __restrict y, T* __restrict ckpt, T* __restrict h) {
  for (int64_t k = 0; k < n; ++k) h[k] = T(0);
  const int64_t nc = num_chunks(L);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
    for (int64_t t = t0; t < t1; ++t) {
      const T dtt = dt[t];
      const T ut = u[t];
      const T du = dtt * ut;
      const T* __restrict b = Bt + t * n;
      const T* __restrict cc = Ct + t * n;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) {
        const T a = vexp(dtt * A[k]);
        const T hk = a * h[k] + du * b[k];
        h[k] = hk;
        acc += cc[k] * hk;
      }
      y[t] = acc + Dd * ut;
    }
    T* __restrict dst = ckpt + c * n;
    for (int64_t k = 0; k < n; ++k) dst[k] = h[k];
  }
}

// Scratch owned by one task of the backward (sized once per parallel_for call, reused across rows).
template <typename T>
struct BwdScratch {
  std::vector<T> H;     // (kChunk, n): states h_t of the current chunk
  std::vector<T> Adec;  // (kChunk, n): decays exp(dt_t A) of the current chunk
  std::vector<T> zero;  // (n): h_{-1}
  std::vector<T> dh;    // (n): running gradient wrt the state
  std::vector<T> dAl;   // (n): dA accumulator for this row
  std::vector<T> ys;    // (kChunk): C.h for the chunk (only when y is requested)
  explicit BwdScratch(int64_t n)
      : H(kChunk * n), Adec(kChunk * n), zero(n, T(0)), dh(n), dAl(n), ys(kChunk) {}
};

// ---------------------------------------------------------------------------------------------------
// Backward for one (b, d) row.
//   dy: gradient arriving at y = C.h + D u (already multiplied by silu(z) by the wrapper).
//   Writes du, ddt (gradient wrt the effective dt) and, if y_out, the recomputed y (for dz).
//   Accumulates into dA_d (n), *dD_d, and the block accumulators dBacc, dCacc ((L, n)).
// ---------------------------------------------------------------------------------------------------
template <typename T>
void backward_row(const T* __restrict u, const T* __restrict dt, const T* __restrict A,
                  const T* __restrict Bt, const T* __restrict Ct, T Dd, const T* __restrict dy,
                  const T* __restrict ckpt, int64_t L, int64_t n, T* __restrict du, T* __restrict ddt,
                  T* __restrict y_out, T* __restrict dA_d, T* dD_d, T* __restrict dBacc,
                  T* __restrict dCacc, BwdScratch<T>& s) {
  T* __restrict H = s.H.data();
  T* __restrict Adec = s.Adec.data();
  T* __restrict dh = s.dh.data();
  T* __restrict dAl = s.dAl.data();
  T* __restrict ys = s.ys.data();
  for (int64_t k = 0; k < n; ++k) {
    dh[k] = T(0);
    dAl[k] = T(0);
  }
  T dD_acc = T(0);
  const int64_t nc = num_chunks(L);
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
    const T* __restrict h_start = c == 0 ? s.zero.data() : ckpt + (c - 1) * n;

    // 1) Recompute the chunk's decays and states from the checkpoint (same arithmetic as the forward,
    //    so the states are bit-identical to the ones the forward produced).
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - t0;
      const T dtt = dt[t];
      const T dut = dtt * u[t];
      const T* __restrict b = Bt + t * n;
      const T* __restrict prev = i == 0 ? h_start : H + (i - 1) * n;
      T* __restrict hr = H + i * n;
      T* __restrict ar = Adec + i * n;
      if (y_out) {
        const T* __restrict cc = Ct + t * n;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < n; ++k) {
          const T a = vexp(dtt * A[k]);
          const T hk = a * prev[k] + dut * b[k];
          ar[k] = a;
          hr[k] = hk;
          acc += cc[k] * hk;
        }
        ys[i] = acc;
      } else {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const T a = vexp(dtt * A[k]);
          ar[k] = a;
          hr[k] = a * prev[k] + dut * b[k];
        }
      }
    }

    // 2) Reverse recurrence over the chunk. dh holds dL/dh_t (including the contribution through h_{t+1}).
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      const T dyt = dy[t];
      const T ut = u[t];
      const T dtt = dt[t];
      const T dtu = dtt * ut;
      const T* __restrict b = Bt + t * n;
      const T* __restrict cc = Ct + t * n;
      const T* __restrict hr = H + i * n;
      const T* __restrict ar = Adec + i * n;
      const T* __restrict prev = i == 0 ? h_start : H + (i - 1) * n;
      T* __restrict dBr = dBacc + t * n;
      T* __restrict dCr = dCacc + t * n;
      T sA = T(0), sB = T(0);
#pragma omp simd reduction(+ : sA, sB)
      for (int64_t k = 0; k < n; ++k) {
        const T g = dh[k] + dyt * cc[k];  // total dL/dh_t
        dCr[k] += dyt * hr[k];
        const T q = g * ar[k] * prev[k];  // dL/d(dt*A_k) through the decay
        sA += A[k] * q;
        dAl[k] += dtt * q;
        sB += g * b[k];
        dBr[k] += g * dtu;
        dh[k] = ar[k] * g;  // pass to h_{t-1}
      }
      ddt[t] = sA + ut * sB;
      du[t] = dtt * sB + Dd * dyt;
      dD_acc += dyt * ut;
      if (y_out) y_out[t] = ys[i] + Dd * ut;
    }
  }
  for (int64_t k = 0; k < n; ++k) dA_d[k] += dAl[k];
  *dD_d += dD_acc;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

}  // namespace

// u, dt: (batch, d, L) with dt the *effective* step (bias added, softplus applied); A: (d, n);
// Bt, Ct: (batch, L, n) (transposed); D: optional (d,). Returns (y, checkpoints).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                 const at::Tensor& Bt, const at::Tensor& Ct,
                                 const std::optional<at::Tensor>& D) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "selective_scan_cpu supports float32/float64");
  check(u, "u", dtype);
  check(dt, "delta", dtype);
  check(A, "A", dtype);
  check(Bt, "B", dtype);
  check(Ct, "C", dtype);
  if (D) check(*D, "D", dtype);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t nc = num_chunks(L);
  auto y = at::empty_like(u);
  auto ckpt = at::empty({batch, d, nc, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_scan_cpu_fwd", [&] {
    using T = scalar_t;
    const T* up = u.data_ptr<T>();
    const T* dtp = dt.data_ptr<T>();
    const T* Ap = A.data_ptr<T>();
    const T* Bp = Bt.data_ptr<T>();
    const T* Cp = Ct.data_ptr<T>();
    const T* Dp = D ? D->data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    T* cp = ckpt.data_ptr<T>();
    // Rows are independent in the forward: parallelise over batch*d.
    at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(n);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / d, di = r % d;
        forward_row<T>(up + r * L, dtp + r * L, Ap + di * n, Bp + b * L * n, Cp + b * L * n,
                       Dp ? Dp[di] : T(0), L, n, yp + r * L, cp + r * nc * n, h.data());
      }
    });
  });
  return {y, ckpt};
}

// dy: (batch, d, L) gradient wrt y = C.h + D u; other arguments as in scan_fwd, plus the checkpoints.
// Returns (du, ddt, dA, dB, dC, dD, y): dB, dC in the original (batch, n, L) layout; ddt is wrt the
// effective dt; dD is empty when D is absent; y (C.h + D u, recomputed) is empty unless want_y.
std::vector<at::Tensor> scan_bwd(const at::Tensor& dy, const at::Tensor& u, const at::Tensor& dt,
                                 const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
                                 const std::optional<at::Tensor>& D, const at::Tensor& ckpt, bool want_y) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "selective_scan_cpu supports float32/float64");
  check(dy, "dout", dtype);
  check(u, "u", dtype);
  check(dt, "delta", dtype);
  check(A, "A", dtype);
  check(Bt, "B", dtype);
  check(Ct, "C", dtype);
  check(ckpt, "checkpoints", dtype);
  if (D) check(*D, "D", dtype);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t nc = num_chunks(L);
  TORCH_CHECK(ckpt.dim() == 4 && ckpt.size(0) == batch && ckpt.size(1) == d && ckpt.size(2) == nc &&
                  ckpt.size(3) == n,
              "checkpoints has shape ", ckpt.sizes(), ", expected [", batch, ", ", d, ", ", nc, ", ", n, "]");

  auto du = at::empty_like(u);
  auto ddt = at::empty_like(u);
  auto dA = at::zeros_like(A);
  auto dB = at::empty({batch, n, L}, u.options());
  auto dC = at::empty({batch, n, L}, u.options());
  // dD is always accumulated (cheap); returned empty when D is absent.
  auto dD = at::zeros({d}, u.options());
  auto y = want_y ? at::empty_like(u) : at::empty({0}, u.options());

  // One (L, n) accumulator pair per block of d; at most one block per thread.
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d));
  auto acc = at::empty({2, nblk, L, n}, u.options());

  AT_DISPATCH_FLOATING_TYPES(dtype, "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    const T* dyp = dy.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    const T* dtp = dt.data_ptr<T>();
    const T* Ap = A.data_ptr<T>();
    const T* Bp = Bt.data_ptr<T>();
    const T* Cp = Ct.data_ptr<T>();
    const T* Dp = D ? D->data_ptr<T>() : nullptr;
    const T* ckp = ckpt.data_ptr<T>();
    T* dup = du.data_ptr<T>();
    T* ddtp = ddt.data_ptr<T>();
    T* dAp = dA.data_ptr<T>();
    T* dBp = dB.data_ptr<T>();
    T* dCp = dC.data_ptr<T>();
    T* dDp = dD.data_ptr<T>();
    T* yp = want_y ? y.data_ptr<T>() : nullptr;
    T* accB = acc.data_ptr<T>();
    T* accC = accB + nblk * L * n;
    const int64_t LN = L * n;

    for (int64_t b = 0; b < batch; ++b) {
      // Phase 1: blocks of d in parallel; block j owns rows [j*d/nblk, (j+1)*d/nblk) and accumulator j.
      at::parallel_for(0, nblk, 1, [&](int64_t jb, int64_t je) {
        BwdScratch<T> scratch(n);
        for (int64_t j = jb; j < je; ++j) {
          T* aB = accB + j * LN;
          T* aC = accC + j * LN;
          std::fill(aB, aB + LN, T(0));
          std::fill(aC, aC + LN, T(0));
          const int64_t d0 = j * d / nblk, d1 = (j + 1) * d / nblk;
          for (int64_t di = d0; di < d1; ++di) {
            const int64_t r = b * d + di;
            backward_row<T>(up + r * L, dtp + r * L, Ap + di * n, Bp + b * LN, Cp + b * LN,
                            Dp ? Dp[di] : T(0), dyp + r * L, ckp + r * nc * n, L, n, dup + r * L,
                            ddtp + r * L, yp ? yp + r * L : nullptr, dAp + di * n, dDp + di, aB, aC, scratch);
          }
        }
      });
      // Phase 2: sum the block accumulators and transpose (L, n) -> (n, L), in tiles of time steps.
      constexpr int64_t kTile = 64;
      at::parallel_for(0, (L + kTile - 1) / kTile, 1, [&](int64_t tb, int64_t te) {
        std::vector<T> sB(kTile * n), sC(kTile * n);
        for (int64_t tile = tb; tile < te; ++tile) {
          const int64_t t0 = tile * kTile, t1 = std::min(L, t0 + kTile), len = t1 - t0;
          std::copy(accB + t0 * n, accB + t1 * n, sB.begin());
          std::copy(accC + t0 * n, accC + t1 * n, sC.begin());
          for (int64_t j = 1; j < nblk; ++j) {
            const T* aB = accB + j * LN + t0 * n;
            const T* aC = accC + j * LN + t0 * n;
            for (int64_t i = 0; i < len * n; ++i) {
              sB[i] += aB[i];
              sC[i] += aC[i];
            }
          }
          for (int64_t k = 0; k < n; ++k) {
            T* oB = dBp + (b * n + k) * L + t0;
            T* oC = dCp + (b * n + k) * L + t0;
            for (int64_t i = 0; i < len; ++i) {
              oB[i] = sB[i * n + k];
              oC[i] = sC[i * n + k];
            }
          }
        }
      });
    }
  });
  return {du, ddt, dA, dB, dC, D ? dD : at::empty({0}, u.options()), y};
}

int64_t chunk_size() { return kChunk; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "fused selective scan forward (CPU)");
  m.def("scan_bwd", &scan_bwd, "fused selective scan backward (CPU)");
  m.def("chunk_size", &chunk_size, "time steps between saved states");
}
