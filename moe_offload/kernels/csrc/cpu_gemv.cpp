// Weight-streaming matrix-vector products for CPU decode: y[m, n] = sum_k x[m, k] * W[n, k].
//
// Decode reads every weight byte once per token, so its speed is memory bandwidth. These kernels read
// each weight row once for all M rows of x (M is small: a decode step or a few tokens), widen it to
// float32 in registers and accumulate in float32. Threads split the output rows (ATen's intra-op pool,
// so torch.set_num_threads applies). Weight layouts are moe_offload's own, read in place:
//   f32 / bf16   W [N, K]
//   int8         q int8 [N, K], one fp16 scale per row:             w = q * s[n]
//   int4         q uint8 [N, K/2] (even k in the low nibble), fp16 s, z [N, K/G]: w = (q - z) * s
//   GGUF Q8_0 / Q4_0 rows as the file stores them (see row_q8_0 / row_q4_0)
// x is float32 [M, K]; y is float32 [M, N]. Shapes are checked by the Python wrapper (kernels/cpu_gemv.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define MOE_AVX512 1
#else
#define MOE_AVX512 0
#endif

namespace {

// Output rows per task: at least 16, and enough rows that a task does ~256K multiply-adds, so a small
// matrix (a tiny model's 384 x 128 projection) runs on one thread instead of paying OpenMP's fork and
// join per call (the server on the bundled model, 4 streams: 219 -> 355 tokens/s).
inline int64_t grain(int64_t K, int64_t M) { return std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(1, K * M)); }

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_f32(const at::Half* p) { return static_cast<float>(*p); }

// ---- one row dot products: sum_k w[k] * x[k] -----------------------------------------------------
// Each weight type has a widening to float32: 16 at a time (AVX-512) and one at a time (the tail).
// Every dot adds in one order (four 16-lane sums over 64-element chunks, then 16-element chunks into
// the first, then the tail), whatever the weight type: widen-then-dot equals the direct dot.

inline float widen1(float v) { return v; }
inline float widen1(uint16_t v) { return bf16_to_f32(v); }
inline float widen1(int8_t v) { return static_cast<float>(v); }

#if MOE_AVX512
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const uint16_t* p) {  // 16 bf16 -> 16 float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 widen16(const int8_t* p) {  // 16 int8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline __m512 load_i8(const int8_t* p) { return widen16(p); }
#endif

template <typename W>
inline float dot(const W* w, const float* x, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if MOE_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(widen16(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(widen16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(widen16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(widen16(w + k), _mm512_loadu_ps(x + k), a0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; ++k) acc += widen1(w[k]) * x[k];
  return acc;
}

// bf16 weights against bf16 activations: AVX512-BF16's dot of bf16 pairs into float32 (32 weights per
// instruction; products exact, sums rounded to float32), both sides exactly as stored. Used for every
// row count, so a row's result never depends on the rows beside it.
inline float dot_bf16_pairs(const uint16_t* w, const uint16_t* x, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512BF16__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  auto ld = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512((const void*)p); };
  for (; k + 128 <= K; k += 128) {
    a0 = _mm512_dpbf16_ps(a0, ld(w + k), ld(x + k));
    a1 = _mm512_dpbf16_ps(a1, ld(w + k + 32), ld(x + k + 32));
    a2 = _mm512_dpbf16_ps(a2, ld(w + k + 64), ld(x + k + 64));
    a3 = _mm512_dpbf16_ps(a3, ld(w + k + 96), ld(x + k + 96));
  }
  for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, ld(w + k), ld(x + k));
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; ++k) acc += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
  return acc;
}

template <typename W>
inline void widen(const W* w, float* out, int64_t K) {
  int64_t k = 0;
#if MOE_AVX512
  for (; k + 16 <= K; k += 16) _mm512_storeu_ps(out + k, widen16(w + k));
#endif
  for (; k < K; ++k) out[k] = widen1(w[k]);
}

// Several rows of x against W [N, K] of type W: yp[m * N + n] = scale(n) * dot(W[n], x[m]). With more
// than one row the weight row is widened once into a float32 buffer and reused (same sums, see above).
template <typename W, typename Scale>
void rows_dot(const W* wp, const float* xp, float* yp, int64_t M, int64_t N, int64_t K, Scale scale) {
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(M > 1 ? K : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const float sc = scale(n);
      if (M == 1) {
        yp[n] = dot(wp + n * K, xp, K) * sc;
        continue;
      }
      widen(wp + n * K, row.data(), K);
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot(row.data(), xp + m * K, K) * sc;
    }
  });
}

// The nibbles of an int4 row, low (even k) and high (odd k) for byte j: read from the packed bytes, or
// from two float32 arrays widened once when several rows of x share the weight row. Both give the
// same values, so row_u4 adds the same numbers in the same order either way.
struct PackedNibbles {
  const uint8_t* q;
#if MOE_AVX512
  __m512 lo(int64_t j) const {
    return _mm512_cvtepi32_ps(_mm512_and_si512(bytes(j), _mm512_set1_epi32(0xF)));
  }
  __m512 hi(int64_t j) const { return _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes(j), 4)); }
  __m512i bytes(int64_t j) const { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + j))); }
#endif
  float lo1(int64_t j) const { return static_cast<float>(q[j] & 0xF); }
  float hi1(int64_t j) const { return static_cast<float>(q[j] >> 4); }
};

struct WidenedNibbles {
  const float* qe;
  const float* qo;
#if MOE_AVX512
  __m512 lo(int64_t j) const { return _mm512_loadu_ps(qe + j); }
  __m512 hi(int64_t j) const { return _mm512_loadu_ps(qo + j); }
#endif
  float lo1(int64_t j) const { return qe[j]; }
  float hi1(int64_t j) const { return qo[j]; }
};

// One int4 row: sum over groups g of s_g * (sum_j q_j x_j - z_g * sum_j x_j), where xe / xo hold x's
// even / odd elements (the low / high nibbles of each byte) and xs its sum per group. The AVX-512 path
// keeps 16 partial sums per group and scales them as a vector: one horizontal sum per row.
template <typename Nibbles>
inline float row_u4(const Nibbles& q, const at::Half* s, const at::Half* z, const float* xe, const float* xo,
                    const float* xs, int64_t groups, int64_t half) {
#if MOE_AVX512
  if (half % 16 == 0) {
    // the row's fp16 scales and zeros widened 16 at a time (F16C), and sum_g s_g z_g xs_g
    float sf[groups];
    __m512 zc = _mm512_setzero_ps();
    int64_t g0 = 0;
    for (; g0 + 16 <= groups; g0 += 16) {
      __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + g0)));
      __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(z + g0)));
      _mm512_storeu_ps(sf + g0, sv);
      zc = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_loadu_ps(xs + g0), zc);
    }
    float zcorr = _mm512_reduce_add_ps(zc);
    for (; g0 < groups; ++g0) {
      sf[g0] = half_to_f32(s + g0);
      zcorr += sf[g0] * half_to_f32(z + g0) * xs[g0];
    }
    // one group's sum q*x as 16 partial sums; low and high nibbles in separate chains
    auto group = [&](int64_t g) {
      __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
      for (int64_t j = g * half; j < (g + 1) * half; j += 16) {
        lo = _mm512_fmadd_ps(q.lo(j), _mm512_loadu_ps(xe + j), lo);
        hi = _mm512_fmadd_ps(q.hi(j), _mm512_loadu_ps(xo + j), hi);
      }
      return _mm512_add_ps(lo, hi);
    };
    // four running totals, so consecutive groups do not wait on one another
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(), t3 = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
      t0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(sf[g]), t0);
      t1 = _mm512_fmadd_ps(group(g + 1), _mm512_set1_ps(sf[g + 1]), t1);
      t2 = _mm512_fmadd_ps(group(g + 2), _mm512_set1_ps(sf[g + 2]), t2);
      t3 = _mm512_fmadd_ps(group(g + 3), _mm512_set1_ps(sf[g + 3]), t3);
    }
    for (; g < groups; ++g) t0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(sf[g]), t0);
    const __m512 total = _mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3));
    return _mm512_reduce_add_ps(total) - zcorr;
  }
#endif
  float zcorr = 0.f;
  for (int64_t g = 0; g < groups; ++g) zcorr += half_to_f32(s + g) * half_to_f32(z + g) * xs[g];
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float dot = 0.f;
    for (int64_t j = g * half; j < (g + 1) * half; ++j) dot += q.lo1(j) * xe[j] + q.hi1(j) * xo[j];
    acc += half_to_f32(s + g) * dot;
  }
  return acc - zcorr;
}

// GGUF Q8_0 / Q4_0 rows: blocks of 32 weights, each an fp16 scale d then 32 int8 (Q8_0, 34 bytes) or
// 16 bytes of nibbles (Q4_0, 18 bytes: byte j holds element j in its low and j + 16 in its high nibble,
// value (q - 8) * d). xs holds x's sum per block (Q4_0's "- 8" term). Four running totals as for int4.
inline float f16_bits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline float row_q8_0(const uint8_t* row, const float* x, int64_t blocks) {
#if MOE_AVX512
  __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * 34;
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    __m512 a = _mm512_mul_ps(load_i8(q), _mm512_loadu_ps(x + b * 32));
    a = _mm512_fmadd_ps(load_i8(q + 16), _mm512_loadu_ps(x + b * 32 + 16), a);
    t[b & 3] = _mm512_fmadd_ps(a, _mm512_set1_ps(f16_bits(blk)), t[b & 3]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(t[0], t[1]), _mm512_add_ps(t[2], t[3])));
#else
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * 34;
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    float dot = 0.f;
    for (int j = 0; j < 32; ++j) dot += static_cast<float>(q[j]) * x[b * 32 + j];
    acc += f16_bits(blk) * dot;
  }
  return acc;
#endif
}

inline float row_q4_0(const uint8_t* row, const float* x, const float* xs, int64_t blocks) {
  float corr = 0.f;  // sum_b d_b * 8 * xs_b
#if MOE_AVX512
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * 18;
    const float d = f16_bits(blk);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)));
    __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask)), _mm512_loadu_ps(x + b * 32));
    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(x + b * 32 + 16), a);
    t[b & 3] = _mm512_fmadd_ps(a, _mm512_set1_ps(d), t[b & 3]);
    corr += d * xs[b];
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(t[0], t[1]), _mm512_add_ps(t[2], t[3]))) - 8.f * corr;
#else
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * 18;
    const float d = f16_bits(blk);
    float dot = 0.f;
    for (int j = 0; j < 16; ++j)
      dot += static_cast<float>(blk[2 + j] & 0xF) * x[b * 32 + j] + static_cast<float>(blk[2 + j] >> 4) * x[b * 32 + 16 + j];
    acc += d * dot;
    corr += d * xs[b];
  }
  return acc - 8.f * corr;
#endif
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous float32 [M, ", K, "]");
}

}  // namespace

// W float32 or bfloat16 [N, K] -> y float32 [M, N]
torch::Tensor gemv_float(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be contiguous [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options());
  auto one = [](int64_t) { return 1.f; };
  if (w.scalar_type() == torch::kFloat32) {
    rows_dot(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, one);
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w must be float32 or bfloat16");
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    rows_dot(wp, x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, one);
  }
  return y;
}

// x bfloat16 [M, K], W bfloat16 [N, K] -> y float32 [M, N]
torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kBFloat16, "w must be contiguous bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous bfloat16 [M, ", K, "]");
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_bf16_pairs(wp + n * K, xp + m * K, K);
  });
  return y;
}

// q int8 [N, K], s fp16 [N] -> y float32 [M, N]
torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "q must be contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N && s.is_contiguous() && s.scalar_type() == torch::kHalf,
              "s must be contiguous float16 [N]");
  auto y = torch::empty({M, N}, x.options());
  const at::Half* sp = s.data_ptr<at::Half>();
  rows_dot(q.data_ptr<int8_t>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K,
           [sp](int64_t n) { return half_to_f32(sp + n); });
  return y;
}

// q uint8 [N, K/2], s / z fp16 [N, K/G] -> y float32 [M, N]; K and G even, K a multiple of G
torch::Tensor gemv_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s,
                        const torch::Tensor& z, int64_t G) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "group size ", G, " must be even and divide K = ", K);
  const int64_t groups = K / G, half = G / 2;
  for (const auto* t : {&s, &z})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups && t->is_contiguous() &&
                t->scalar_type() == torch::kHalf, "scales / zeros must be contiguous float16 [N, K/G]");
  // x split into its even and odd elements per row, and its sum per group: [M, K/2] twice, [M, K/G]
  std::vector<float> xe(M * K / 2), xo(M * K / 2), xs(M * groups);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < K / 2; ++j) {
      xe[m * K / 2 + j] = xp[m * K + 2 * j];
      xo[m * K / 2 + j] = xp[m * K + 2 * j + 1];
    }
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += xp[m * K + k];
      xs[m * groups + g] = acc;
    }
  }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  const at::Half* zp = z.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    std::vector<float> qe(M > 1 ? K / 2 : 0), qo(M > 1 ? K / 2 : 0);  // several rows of x: nibbles widened once
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = qp + n * (K / 2);
      const at::Half *sn = sp + n * groups, *zn = zp + n * groups;
      if (M == 1) {
        yp[n] = row_u4(PackedNibbles{row}, sn, zn, xe.data(), xo.data(), xs.data(), groups, half);
        continue;
      }
      for (int64_t j = 0; j < K / 2; ++j) {
        qe[j] = static_cast<float>(row[j] & 0xF);
        qo[j] = static_cast<float>(row[j] >> 4);
      }
      const WidenedNibbles wide{qe.data(), qo.data()};
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = row_u4(wide, sn, zn, xe.data() + m * K / 2, xo.data() + m * K / 2, xs.data() + m * groups,
                               groups, half);
    }
  });
  return y;
}

// q uint8 [N, K/2], s / z fp16 [N, K/G] -> W float32 [N, K] = (q - z) * s: the same float32 product the
// torch reference (formats/int4.dequant_int4) computes, so the two are bit-equal; for calls with many rows
// of x, which a GEMM then serves better than the row kernels.
torch::Tensor dequant_int4(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& z, int64_t G) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "group size ", G, " must be even and divide K = ", K);
  const int64_t groups = K / G;
  for (const auto* t : {&s, &z})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups && t->is_contiguous() &&
                t->scalar_type() == torch::kHalf, "scales / zeros must be contiguous float16 [N, K/G]");
  auto w = torch::empty({N, K}, q.options().dtype(torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  const at::Half* zp = z.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = half_to_f32(sp + n * groups + g), zr = half_to_f32(zp + n * groups + g);
        const uint8_t* qb = qp + n * (K / 2) + g * (G / 2);
        float* out = wp + n * K + g * G;
        for (int64_t j = 0; j < G / 2; ++j) {
          out[2 * j] = (static_cast<float>(qb[j] & 0xF) - zr) * sc;
          out[2 * j + 1] = (static_cast<float>(qb[j] >> 4) - zr) * sc;
        }
      }
  });
  return w;
}

// GGUF rows q uint8 [N, blocks * bytes_per_block] of type Q8_0 (34) or Q4_0 (18) -> y float32 [M, N]
torch::Tensor gemv_gguf(const torch::Tensor& x, const torch::Tensor& q, int64_t block_bytes) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, row bytes]");
  TORCH_CHECK(block_bytes == 34 || block_bytes == 18, "block_bytes must be 34 (Q8_0) or 18 (Q4_0), got ", block_bytes);
  TORCH_CHECK(q.size(1) % block_bytes == 0, "row bytes ", q.size(1), " are not whole blocks of ", block_bytes);
  const int64_t N = q.size(0), blocks = q.size(1) / block_bytes, K = blocks * 32, M = x.size(0);
  check_x(x, K);
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs(M * blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      float acc = 0.f;
      for (int j = 0; j < 32; ++j) acc += xp[m * K + b * 32 + j];
      xs[m * blocks + b] = acc;
    }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t rb = q.size(1);
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = block_bytes == 34 ? row_q8_0(qp + n * rb, xp + m * K, blocks)
                                          : row_q4_0(qp + n * rb, xp + m * K, xs.data() + m * blocks, blocks);
  });
  return y;
}

bool has_avx512() { return MOE_AVX512; }
#if defined(__AVX512BF16__)
bool has_avx512_bf16() { return true; }
#else
bool has_avx512_bf16() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gemv_float", &gemv_float, "y [M, N] = x [M, K] @ W [N, K]^T, W float32 or bfloat16");
  mod.def("gemv_int8", &gemv_int8, "y = x @ (q * s[:, None])^T, q int8 [N, K], s fp16 [N]");
  mod.def("gemv_int4", &gemv_int4, "y = x @ ((q - z) * s per group)^T, q packed uint8 [N, K/2]");
  mod.def("gemv_gguf", &gemv_gguf, "y = x @ dequant(q)^T for GGUF Q8_0 (block_bytes 34) or Q4_0 (18) rows");
  mod.def("gemv_bf16", &gemv_bf16, "y [M, N] float32 = x bf16 [M, K] @ W bf16 [N, K]^T (bf16 pair dots)");
  mod.def("has_avx512_bf16", &has_avx512_bf16, "whether the AVX512-BF16 pair dot was compiled in");
  mod.def("dequant_int4", &dequant_int4, "W float32 [N, K] = (q - z) * s per group, bit-equal to the torch reference");
  mod.def("has_avx512", &has_avx512, "whether the AVX-512 paths were compiled in");
}
