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
// Below them: the 8-bit activation (VNNI) paths, and the decode-step glue (RMSNorm, one token's RoPE +
// cache write + attention, its float experts) that a one-token step runs between its weight products.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// Decode streams each weight byte from memory once. A software prefetch kAhead bytes ahead of the read
// position keeps more line fills in flight than the hardware prefetcher does on its own: one 7168 x 1024
// projection out of cache, one row of x, 2 threads on the 2-core reference machine, without -> with,
// GB/s: f32 24.4 -> 26.7, bf16 18.9 -> 22.2, int8 16.0 -> 18.3, GGUF Q8_0 13.7 -> 18.0, int4 11.5 -> 15.9,
// GGUF Q4_0 10.8 -> 14.8. 1024, 2048 and 3072 bytes ahead: 2048 within 3% of the best of the three for
// every format (1024 is 8-10% slower for Q8_0 / int4 / Q4_0). Four weight rows at a time instead (four
// streams per thread) measured 12% slower for int8 / Q8_0 and 2% faster for int4 / Q4_0: not used.
constexpr int64_t kAhead = 2048;
inline void fetch_ahead(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kAhead, 0, 3); }
template <int64_t Bytes>
inline void fetch_ahead_lines(const void* p) {  // every 64-byte line of the Bytes starting kAhead past p
  for (int64_t o = 0; o < Bytes; o += 64) fetch_ahead(static_cast<const char*>(p) + o);
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_f32(const at::Half* p) {
#if MOE_AVX512
  return _cvtsh_ss(p->x);  // F16C, one instruction
#else
  return static_cast<float>(*p);
#endif
}

// one float32 -> out: as is, or rounded to bfloat16 to nearest even (as Tensor.to does for finite values)
inline void store1(float* out, float v) { *out = v; }
inline void store1(uint16_t* out, float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN stays NaN (rounding could carry it into Inf)
    *out = static_cast<uint16_t>((b >> 16) | 0x0040);
    return;
  }
  *out = static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// n fp16 values -> float32 (16 at a time with F16C)
inline void halves_to_f32(const at::Half* p, float* out, int64_t n) {
  int64_t i = 0;
#if MOE_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_f32(p + i);
}

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
    fetch_ahead_lines<64 * sizeof(W)>(w + k);
    a0 = _mm512_fmadd_ps(widen16(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(widen16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(widen16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(widen16(w + k), _mm512_loadu_ps(x + k), a0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; ++k) acc = std::fma(widen1(w[k]), x[k], acc);  // explicit: dot4's tail contracts the same
  return acc;
}

// Four float32 rows w, w + K, w + 2K, w + 3K against x: out[r] equal to dot(w + r K, x, K) (the same
// accumulators, order and tails per row). Four weight streams at once, no software prefetch: one 7168 x
// 1024 projection out of cache, one row of x, 2 threads: 25.0 -> 27.0 GB/s against one row at a time with
// the prefetch (with it here too: 24.4).
inline void dot4(const float* w, int64_t K, const float* x, float* out) {
  int64_t k = 0;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#if MOE_AVX512
  __m512 a[4][4];
  for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64)
    for (int j = 0; j < 4; ++j) {
      const __m512 xj = _mm512_loadu_ps(x + k + 16 * j);
      for (int r = 0; r < 4; ++r) a[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * K + k + 16 * j), xj, a[r][j]);
    }
  for (; k + 16 <= K; k += 16)
    for (int r = 0; r < 4; ++r) a[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * K + k), _mm512_loadu_ps(x + k), a[r][0]);
  for (int r = 0; r < 4; ++r)
    acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3])));
#endif
  for (int r = 0; r < 4; ++r) {
    for (int64_t j = k; j < K; ++j) acc[r] = std::fma(w[r * K + j], x[j], acc[r]);
    out[r] = acc[r];
  }
}

// The dots of rows n0..n1-1 of W [N, K] against x (each dot(W[n], x, K)) into out[n - n0]: float32 rows four
// at a time (dot4), others one at a time.
template <typename W>
inline void dots(const W* wp, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  int64_t n = n0;
  if constexpr (std::is_same<W, float>::value)
    for (; n + 4 <= n1; n += 4) dot4(wp + n * K, K, x, out + (n - n0));
  for (; n < n1; ++n) out[n - n0] = dot(wp + n * K, x, K);
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
    fetch_ahead_lines<256>(w + k);
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

// float32 a . b (16 lanes, then the tail)
inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if MOE_AVX512
  __m512 s = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  acc = _mm512_reduce_add_ps(s);
#endif
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Several rows of x against W [N, K] of type W: yp[m * N + n] = scale(n) * dot(W[n], x[m]). With more
// than one row the weight row is widened once into a float32 buffer and reused (same sums, see above).
template <typename W, typename Scale>
void rows_dot(const W* wp, const float* xp, float* yp, int64_t M, int64_t N, int64_t K, Scale scale) {
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(M > 1 ? K : 0);
    if (M == 1) {
      dots(wp, K, xp, n0, n1, yp + n0);
      for (int64_t n = n0; n < n1; ++n) yp[n] *= scale(n);
      return;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const float sc = scale(n);
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
#if MOE_AVX512
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
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


// ---- 8-bit activations (AVX512-VNNI): llama.cpp's method -------------------------------------------
// x is rounded per block of 32 to int8: d = max|x| / 127, q = round(x * (1 / d)) (half away from zero),
// so x ~ q * d: ggml's Q8_0 rounding (gguf.quants gives the same q), d kept in float32, not fp16.
// Integer weights then meet q in VPDPBUSD (64 unsigned x signed byte products summed four at a time
// into 16 int32 lanes, exact), and one float multiply-add per 64 weights applies the scales. The result
// is W x' up to float32 round-off, where x' = q * d (the tests check against that).
// VPDPBUSD wants unsigned weight bytes: signed weights are offset (int8 q ^ 0x80 = q + 128; MXFP4 values
// + 16) and the offset times the lane's sum of activation bytes is taken off through the accumulator's
// initial value, so every lane's integer sum is exact.
struct QAct {
  int64_t M = 0, K = 0;
  std::vector<int8_t> q;    // [M, K] activation bytes, in the weight format's byte order
  std::vector<int8_t> qn;   // [M, K] the same in natural order
  std::vector<int32_t> ns;  // [M, K/4] minus the sum of each lane's four bytes
  std::vector<float> dl;    // [M, K/4] the scale d of each lane's block
  std::vector<float> d;     // [M, K/32] per block
  std::vector<float> bs;    // [M, K/32] d * sum of the block's q (the dequantized block sum)
};

// Quantize x [M, K] (K a multiple of 32). order(p) is the natural index of activation byte p inside its
// 64-byte chunk (identity, or the int4 layout's even/odd split).
template <typename Order>
QAct quantize_act(const float* x, int64_t M, int64_t K, Order order) {
  QAct a;
  a.M = M, a.K = K;
  const int64_t blocks = K / 32;
  a.q.resize(M * K), a.qn.resize(M * K), a.ns.resize(M * K / 4), a.dl.resize(M * K / 4), a.d.resize(M * blocks), a.bs.resize(M * blocks);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t* nat = a.qn.data() + m * K;
    for (int64_t b = 0; b < blocks; ++b) {
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) {  // a NaN makes amax (so d, so the block's result) NaN, as the exact path would
        const float v = std::abs(xm[b * 32 + j]);
        if (v > amax || v != v) amax = v;  // once NaN, stays NaN (v > NaN is false)
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        const float v = std::round(xm[b * 32 + j] * id);  // half away from zero, as ggml's roundf
        nat[b * 32 + j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
        sum += nat[b * 32 + j];
      }
      a.d[m * blocks + b] = d;
      a.bs[m * blocks + b] = d * static_cast<float>(sum);
    }
    int8_t* qm = a.q.data() + m * K;
    for (int64_t p = 0; p < K; ++p) qm[p] = nat[(p / 64) * 64 + order(p % 64)];
    for (int64_t l = 0; l < K / 4; ++l) {
      int32_t s = 0;
      for (int i = 0; i < 4; ++i) s += qm[4 * l + i];
      a.ns[m * K / 4 + l] = -s;
      a.dl[m * K / 4 + l] = a.d[m * blocks + ((l * 4) / 64 * 64 + order((l * 4) % 64)) / 32];
    }
  }
  return a;
}

inline int64_t natural(int64_t p) { return p; }
// int4 rows: byte j of a 32-byte chunk holds weights 2j (low nibble) and 2j + 1 (high); the unpacked
// chunk is the 32 low nibbles, then the 32 high ones, so activation byte p is x[2p] or x[2(p - 32) + 1]
inline int64_t nibble_split(int64_t p) { return p < 32 ? 2 * p : 2 * (p - 32) + 1; }

// The 8-bit paths take x float32 or bfloat16 [M, K] (contiguous); the rounding to int8 reads it as float32.
torch::Tensor x_as_f32(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == K &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be contiguous float32 or bfloat16 [M, ", K, "]");
  return x.scalar_type() == torch::kFloat32 ? x : x.to(torch::kFloat32);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && MOE_AVX512
#define MOE_VNNI 1

// Rows of x are done MT at a time against one weight row; each row keeps two accumulators (even and
// odd chunks), whatever MT, so a row's sum never depends on the rows beside it.
template <int MT, typename Chunk>
inline void vnni_rows(const QAct& a, int64_t m0, int64_t chunks, int shift, Chunk chunk, float* out) {
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const int64_t K = a.K;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 sv;
    const __m512i w = chunk(c, sv);  // 64 unsigned weight bytes; sv: the weight scale of each lane
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const __m512i init = _mm512_slli_epi32(_mm512_loadu_si512(a.ns.data() + m * K / 4 + c * 16), shift);
      const __m512i dot = _mm512_dpbusd_epi32(init, w, _mm512_loadu_si512(a.q.data() + m * K + c * 64));
      const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(a.dl.data() + m * K / 4 + c * 16), sv);
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

// All M rows of x against one weight row, four at a time.
template <typename Chunk>
inline void vnni_all_rows(const QAct& a, int64_t chunks, int shift, Chunk chunk, float* out) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) vnni_rows<4>(a, m, chunks, shift, chunk, out + m);
  for (; m < a.M; ++m) vnni_rows<1>(a, m, chunks, shift, chunk, out + m);
}
#else
#define MOE_VNNI 0
#endif

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

// x bfloat16 [M, K], W bfloat16 [N, K] -> y bfloat16 [M, N]
torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kBFloat16, "w must be contiguous bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous bfloat16 [M, ", K, "]");
  auto y = torch::empty({M, N}, x.options());  // bfloat16: each float32 sum rounded once, as .to() would
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) store1(yp + m * N + n, dot_bf16_pairs(wp + n * K, xp + m * K, K));
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

// ---- dequantization, for calls with many rows of x (a GEMM then serves them better than the row kernels) --
// Each weight is the float32 product the torch reference computes (formats/int8.dequant_int8, int4.dequant_int4),
// stored as float32 or rounded to bfloat16 (to nearest even, as Tensor.to does): bit-equal to reference-then-cast.

// 16 float32 -> out (float32, or bfloat16 rounded to nearest even)
#if MOE_AVX512
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(uint16_t* out, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i round = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
                                         _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, round), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // NaN stays NaN, quieted
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x0040)));
  _mm256_storeu_si256((__m256i*)out, _mm512_cvtepi32_epi16(r));
}
#endif

template <typename Out>
void dequant_int8_rows(const int8_t* qp, const at::Half* sp, Out* wp, int64_t N, int64_t K) {
  at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float sc = half_to_f32(sp + n);
      const int8_t* q = qp + n * K;
      Out* out = wp + n * K;
      int64_t k = 0;
#if MOE_AVX512
      for (; k + 16 <= K; k += 16) store16(out + k, _mm512_mul_ps(widen16(q + k), _mm512_set1_ps(sc)));
#endif
      for (; k < K; ++k) store1(out + k, static_cast<float>(q[k]) * sc);
    }
  });
}

template <typename Out>
void dequant_int4_rows(const uint8_t* qp, const at::Half* sp, const at::Half* zp, Out* wp, int64_t N, int64_t K,
                       int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = half_to_f32(sp + n * groups + g), zr = half_to_f32(zp + n * groups + g);
        const uint8_t* qb = qp + n * (K / 2) + g * (G / 2);
        Out* out = wp + n * K + g * G;
        int64_t j = 0;
#if MOE_AVX512
        const __m512 zv = _mm512_set1_ps(zr), sv = _mm512_set1_ps(sc);
        for (; j + 8 <= G / 2; j += 8) {  // 8 bytes -> 16 weights in order: byte j's low nibble, then its high
          const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(qb + j)));  // 8 x 16-bit
          const __m128i lo = _mm_and_si128(v, _mm_set1_epi16(0xF)), hi = _mm_srli_epi16(v, 4);
          const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
          const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(pairs));
          store16(out + 2 * j, _mm512_mul_ps(_mm512_sub_ps(qf, zv), sv));  // (q - z) * s, as the reference
        }
#endif
        for (; j < G / 2; ++j) {
          store1(out + 2 * j, (static_cast<float>(qb[j] & 0xF) - zr) * sc);
          store1(out + 2 * j + 1, (static_cast<float>(qb[j] >> 4) - zr) * sc);
        }
      }
  });
}

// q int8 [N, K], s fp16 [N] -> W [N, K] float32, or bfloat16 when `bf16`
torch::Tensor dequant_int8(const torch::Tensor& q, const torch::Tensor& s, bool bf16) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "q must be contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N && s.is_contiguous() && s.scalar_type() == torch::kHalf,
              "s must be contiguous float16 [N]");
  auto w = torch::empty({N, K}, q.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  if (bf16)
    dequant_int8_rows(q.data_ptr<int8_t>(), s.data_ptr<at::Half>(), reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()), N, K);
  else
    dequant_int8_rows(q.data_ptr<int8_t>(), s.data_ptr<at::Half>(), w.data_ptr<float>(), N, K);
  return w;
}

// q uint8 [N, K/2], s / z fp16 [N, K/G] -> W [N, K] = (q - z) * s, float32, or bfloat16 when `bf16`
torch::Tensor dequant_int4(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& z, int64_t G,
                           bool bf16) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "group size ", G, " must be even and divide K = ", K);
  const int64_t groups = K / G;
  for (const auto* t : {&s, &z})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups && t->is_contiguous() &&
                t->scalar_type() == torch::kHalf, "scales / zeros must be contiguous float16 [N, K/G]");
  auto w = torch::empty({N, K}, q.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half *sp = s.data_ptr<at::Half>(), *zp = z.data_ptr<at::Half>();
  if (bf16)
    dequant_int4_rows(qp, sp, zp, reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()), N, K, G);
  else
    dequant_int4_rows(qp, sp, zp, w.data_ptr<float>(), N, K, G);
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

// ---- 8-bit activation entry points (see QAct): same shapes as the float-activation ones -----------------
#if MOE_VNNI
namespace {

void check_vnni_k(int64_t K) { TORCH_CHECK(K % 64 == 0, "8-bit activations need K a multiple of 64, got ", K); }

// Run `row(n, out)` for every weight row n, out = y's M values for that row (then scattered into y).
// y [M, N] in x's dtype (float32, or bfloat16 rounded once from the float32 sums). With a two-row body
// (pair not nullptr) and at least four rows of x, pair(n, out) fills out[r * M + m] for weight rows n and
// n + 1 by the same operations per (weight row, x row) as row(), so with the same values: the activation
// loads serve two weight rows (compute-bound prefill; see CHANGELOG).
template <typename Row, typename Pair>
torch::Tensor over_rows(const torch::Tensor& x, int64_t N, int64_t K, Row row, Pair pair) {
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  uint16_t* yb = bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
    std::vector<float> out(2 * M);
    int64_t n = n0;
    if constexpr (!std::is_same<Pair, std::nullptr_t>::value) {
      for (; M >= 4 && n + 2 <= n1; n += 2) {
        pair(n, out.data());
        for (int r = 0; r < 2; ++r)
          for (int64_t m = 0; m < M; ++m)
            bf16 ? store1(yb + m * N + n + r, out[r * M + m]) : store1(yf + m * N + n + r, out[r * M + m]);
      }
    }
    for (; n < n1; ++n) {
      row(n, out.data());
      for (int64_t m = 0; m < M; ++m) bf16 ? store1(yb + m * N + n, out[m]) : store1(yf + m * N + n, out[m]);
    }
  });
  return y;
}

template <typename Row>
torch::Tensor over_rows(const torch::Tensor& x, int64_t N, int64_t K, Row row) {
  return over_rows(x, N, K, row, nullptr);
}


constexpr int64_t F = 0x0004000400040004;  // four 16-bit shift counts of 4

inline __m512 two_scales(float lo, float hi) {  // lanes 0-7 `lo`, 8-15 `hi`
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
}

// 16 bytes of 32 nibbles (Q4_0 / MXFP4 order: low nibbles are elements 0-15, high 16-31) for two blocks
// -> 64 bytes [b0 low, b0 high, b1 low, b1 high], the 64 elements in natural order.
inline __m512i two_nibble_blocks(const uint8_t* b0, const uint8_t* b1) {
  const __m256i both = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)b1), _mm_loadu_si128((const __m128i*)b0));
  const __m512i v = _mm512_shuffle_i64x2(_mm512_castsi256_si512(both), _mm512_castsi256_si512(both), 0x50);
  const __m512i shifts = _mm512_set_epi64(F, F, 0, 0, F, F, 0, 0);  // 16-bit shift counts: 4 in lanes 1 and 3
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(0x0F));
}


// 64 weights as [low nibbles of 32 bytes | high nibbles of the same 32 bytes]
inline __m512i nibbles_lo_hi(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);
  return _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_set_epi64(F, F, F, F, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
}

// GGUF Q4_K super-block (144 bytes, 256 weights): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for
// 8 sub-blocks of 32, then 128 bytes: bytes 32j..32j+31 hold sub-block 2j in their low nibbles and 2j + 1
// in their high ones. w = d * sc * q - dmin * m. The q part runs through VPDPBUSD (q unsigned, no offset);
// the mins meet the activations' block sums (QAct::bs) once per sub-block.
inline void k4_scale_min(const uint8_t* s, int j, float& sc, float& mn) {
  if (j < 4) {
    sc = s[j] & 63, mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void q4_k_row(const QAct& a, const uint8_t* row, int64_t blocks, float* out) {
  // the row's sub-block scales d * sc and mins dmin * mn, decoded once from each super-block's header
  float sf[blocks * 8 + 16], mf[blocks * 8];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * 144;
    const float d = f16_bits(blk), dmin = f16_bits(blk + 2);
    for (int j = 0; j < 8; ++j) {
      float sc, mn;
      k4_scale_min(blk + 4, j, sc, mn);
      sf[b * 8 + j] = d * sc;
      mf[b * 8 + j] = dmin * mn;
    }
  }
  auto chunk = [&](int64_t c, __m512& sv) {  // chunk c: sub-blocks 2j, 2j + 1 of super-block c / 4
    sv = two_scales(sf[2 * c], sf[2 * c + 1]);
    return nibbles_lo_hi(row + (c / 4) * 144 + 16 + 32 * (c % 4));
  };
  vnni_all_rows(a, blocks * 4, 32, chunk, out);
  for (int64_t m = 0; m < a.M; ++m)  // - dmin * m_s * (sum of the sub-block's activations)
    out[m] -= dot_f32(mf, a.bs.data() + m * (a.K / 32), blocks * 8);
}

// GGUF Q6_K super-block (210 bytes, 256 weights): ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales
// (one per 16 weights), fp16 d last. Each half (128 weights) is two chunks of 64: weights 0-63 take the
// low nibbles of ql[0..63] with qh bits 0-1 (first 32) and 2-3 (next 32); weights 64-127 the high nibbles
// with qh bits 4-5 and 6-7. w = d * sc * (q - 32), q in [0, 63].
void q6_k_row(const QAct& a, const uint8_t* row, int64_t blocks, float* out) {
  const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  auto chunk = [&](int64_t c, __m512& sv) {  // chunk c: super-block c / 4, half (c / 2) % 2, upper (c % 2)
    const uint8_t* blk = row + (c / 4) * 210;
    const int half = static_cast<int>((c / 2) % 2), upper = static_cast<int>(c % 2);
    const uint8_t *ql = blk + 64 * half, *qh = blk + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * half + 4 * upper;
    int32_t four_bytes;
    std::memcpy(&four_bytes, sc, 4);
    const __m128 four = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four_bytes)));
    sv = _mm512_mul_ps(_mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(four)), _mm512_set1_ps(f16_bits(blk + 208)));
    const __m512i l = _mm512_loadu_si512(ql);  // 64 bytes: their low (upper 0) or high (upper 1) nibbles
    const __m512i lo = _mm512_and_si512(upper ? _mm512_srli_epi16(l, 4) : l, _mm512_set1_epi8(0x0F));
    const __m256i h = _mm256_loadu_si256((const __m256i*)qh);
    const int64_t s0 = upper ? 4 : 0, s1 = upper ? 6 : 2;  // qh bits for the first and second 32 weights
    const __m512i hs = _mm512_set_epi64(s1 * 0x0001000100010001, s1 * 0x0001000100010001, s1 * 0x0001000100010001,
                                        s1 * 0x0001000100010001, s0 * 0x0001000100010001, s0 * 0x0001000100010001,
                                        s0 * 0x0001000100010001, s0 * 0x0001000100010001);
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1), hs),
                                        _mm512_set1_epi8(3));
    return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));  // q in [0, 63]; the value is q - 32
  };
  vnni_all_rows(a, blocks * 4, 5, chunk, out);
}

}  // namespace

// x float32 [M, K], q int8 [N, K], s fp16 [N] -> y float32 [M, N] = Q8(x) @ (q * s)^T
namespace {

// int8 rows (q + 128 as VPDPBUSD's unsigned bytes) against 8-bit activations, MT rows of x at a time: each
// lane starts at -128 times its activation bytes' sum (ns128), so it holds the exact integer q . a; one
// multiply-add by the lane's block scale per 64 weights (the row's scale comes last).
template <int MT>
inline void int8_rows(const QAct& a, const int32_t* ns128, int64_t m0, const int8_t* row, float* out) {
  const int64_t K = a.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    fetch_ahead(row + c * 64);
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(row + c * 64), flip);  // q + 128
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(ns128 + m * K / 4 + c * 16), w,
                                              _mm512_loadu_si512(a.q.data() + m * K + c * 64));
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(a.dl.data() + m * K / 4 + c * 16),
                                      acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

}  // namespace

torch::Tensor gemv_int8_a8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "q must be contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  check_vnni_k(K);
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N && s.is_contiguous() && s.scalar_type() == torch::kHalf,
              "s must be contiguous float16 [N]");
  const torch::Tensor xf = x_as_f32(x, K);
  const QAct a = quantize_act(xf.data_ptr<float>(), x.size(0), K, natural);
  std::vector<int32_t> ns128(a.ns.size());
  for (size_t i = 0; i < ns128.size(); ++i) ns128[i] = a.ns[i] * 128;
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const int8_t* row = qp + n * K;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) int8_rows<4>(a, ns128.data(), m, row, out + m);
    for (; m < a.M; ++m) int8_rows<1>(a, ns128.data(), m, row, out + m);
    const float sc = half_to_f32(sp + n);
    for (m = 0; m < a.M; ++m) out[m] *= sc;
  });
}

// x float32 [M, K], q uint8 [N, K/2], s fp16 [N, K/G], z fp16 [N, K/G] (ignored when `symmetric`: all 8)
// -> y float32 [M, N] = Q8(x) @ ((q - z) * s)^T. G a multiple of 64, or 8, 16 or 32.
namespace {

// int4 rows against 8-bit activations, 128 weights (one 64-byte load) per step. The step's low nibbles
// (even k) and high nibbles (odd k) each meet their own 64 activation bytes in VPDPBUSD, chained into one
// int32 vector whose lane l then sums k in [8l, 8l + 8) of the step: one activation block (l / 4) and one
// weight group. Symmetric rows start each lane at -8 times its activation bytes' sum, so the lane holds
// the exact integer (q - 8) . a; asymmetric rows take sum_g s_g z_g xg_g off once per row (xg_g the
// group's dequantized activation sum). The group scales are read as float16 per step (no per-row
// conversion). Half the instructions per weight of the 64-weight chunks (vnni_rows).
// Needs K a multiple of 128 and G dividing 128 or a multiple of it.
struct Int4Act {
  int64_t M = 0, K = 0, groups = 0;
  std::vector<int8_t> q;     // [M, K]: per step of 128, the 64 even-k bytes then the 64 odd-k bytes
  std::vector<int32_t> ns8;  // [M, K / 8]: per step and lane, -8 times the sum of the lane's 8 bytes
  std::vector<float> dl;     // [M, K / 8]: per step, the block scale d of each of the 16 lanes
  std::vector<float> xg;     // [M, groups]: sum over the group of d * q (the rounded x's group sum)
};

// Activation byte p of a step of 128 is x[natural(p)] of the step: the int4 layout's even then odd k, or
// GGUF Q4_0's four blocks' low halves (weights 0-15 of each) then their high halves (16-31). Either way
// lane l of the two halves' chained dot covers 8 weights of block l / 4 of the step.
inline int64_t int4_step_order(int64_t p) { return p < 64 ? 2 * p : 2 * (p - 64) + 1; }
inline int64_t q4_0_step_order(int64_t p) { return (p % 64) / 16 * 32 + (p >= 64 ? 16 : 0) + p % 16; }

template <typename Order>
Int4Act int4_act(const float* x, int64_t M, int64_t K, int64_t G, Order order) {
  const QAct n = quantize_act(x, M, K, natural);
  Int4Act a;
  a.M = M, a.K = K, a.groups = K / G;
  a.q.resize(M * K), a.ns8.assign(M * K / 8, 0), a.dl.resize(M * K / 8), a.xg.assign(M * a.groups, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* qn = n.qn.data() + m * K;
    const float* d = n.d.data() + m * (K / 32);
    int8_t* q = a.q.data() + m * K;
    for (int64_t c = 0; c < K / 128; ++c)
      for (int64_t p = 0; p < 128; ++p) {
        q[c * 128 + p] = qn[c * 128 + order(p)];
        a.ns8[m * (K / 8) + c * 16 + (p % 64) / 4] -= 8 * q[c * 128 + p];
      }
    for (int64_t k = 0; k < K; ++k) a.xg[m * a.groups + k / G] += d[k / 32] * qn[k];
    for (int64_t l = 0; l < K / 8; ++l) a.dl[m * (K / 8) + l] = d[l / 4];
  }
  return a;
}

// R weight rows (rows[r], their group scales sps[r]) against MT rows of x: out[r * MT + t]; every pair runs
// the same operations whatever R and MT.
template <int MT, bool SYM, int R = 1>
inline void int4_wide_rows(const Int4Act& a, int64_t m0, const uint8_t* const* rows, const at::Half* const* sps,
                           __m512i rel, int64_t G, float* out) {
  const int64_t K = a.K, steps = K / 128, per = G >= 128 ? 1 : 128 / G;  // groups per step
  const __mmask16 smask = static_cast<__mmask16>((1u << per) - 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R][MT][2];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < steps; ++c) {
    __m512i lo[R], hi[R];
    __m512 sv[R];
    for (int r = 0; r < R; ++r) {
      fetch_ahead(rows[r] + c * 64);
      const __m512i v = _mm512_loadu_si512(rows[r] + c * 64);
      lo[r] = _mm512_and_si512(v, low), hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      sv[r] = G >= 128 ? _mm512_set1_ps(half_to_f32(sps[r] + c * 128 / G))
                       : _mm512_permutexvar_ps(rel, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(smask, sps[r] + c * per)));
    }
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const int8_t* q = a.q.data() + m * K + c * 128;
      const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 64);
      const __m512i init = SYM ? _mm512_loadu_si512(a.ns8.data() + m * (K / 8) + c * 16) : _mm512_setzero_si512();
      const __m512 dl = _mm512_loadu_ps(a.dl.data() + m * (K / 8) + c * 16);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[r], q0), hi[r], q1);
        acc[r][t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dl, sv[r]), acc[r][t][c & 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) out[r * MT + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
}

// An asymmetric row's zero-point term for x row m: sum_g s_g z_g xg_g
inline float zero_point_term(const Int4Act& a, const at::Half* sp, const at::Half* zp, int64_t m) {
  float zc = 0.f;
  for (int64_t g = 0; g < a.groups; ++g) zc += half_to_f32(sp + g) * half_to_f32(zp + g) * a.xg[m * a.groups + g];
  return zc;
}

// R weight rows against all M rows of x, four x rows at a time: out[r * M + m]
template <bool SYM, int R>
void int4_wide_row(const Int4Act& a, const uint8_t* const* rows, const at::Half* const* sps, const at::Half* const* zps,
                   __m512i rel, int64_t G, float* out) {
  const int64_t M = a.M;
  float part[R * 4];
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    int4_wide_rows<4, SYM, R>(a, m, rows, sps, rel, G, part);
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < 4; ++t) out[r * M + m + t] = part[r * 4 + t];
  }
  for (; m < M; ++m) {
    int4_wide_rows<1, SYM, R>(a, m, rows, sps, rel, G, part);
    for (int r = 0; r < R; ++r) out[r * M + m] = part[r];
  }
  if (SYM) return;
  for (int r = 0; r < R; ++r)
    for (m = 0; m < M; ++m) out[r * M + m] -= zero_point_term(a, sps[r], zps[r], m);
}

torch::Tensor int4_a8_wide(const torch::Tensor& x, const torch::Tensor& xf, const uint8_t* qp, const at::Half* sp,
                           const at::Half* zp, int64_t N, int64_t K, int64_t G, bool symmetric) {
  const int64_t groups = K / G;
  const Int4Act a = int4_act(xf.data_ptr<float>(), x.size(0), K, G, int4_step_order);
  alignas(64) int32_t r[16];
  for (int l = 0; l < 16; ++l) r[l] = G >= 128 ? 0 : static_cast<int32_t>((8 * l) / G);
  const __m512i rel = _mm512_load_si512(r);
  auto rows_from = [&](int64_t n, float* out, auto r_count) {  // weight rows n .. n + R - 1
    constexpr int R = decltype(r_count)::value;
    const uint8_t* rows[R];
    const at::Half *sps[R], *zps[R];
    for (int r = 0; r < R; ++r) rows[r] = qp + (n + r) * (K / 2), sps[r] = sp + (n + r) * groups, zps[r] = zp + (n + r) * groups;
    if (symmetric) int4_wide_row<true, R>(a, rows, sps, zps, rel, G, out);
    else int4_wide_row<false, R>(a, rows, sps, zps, rel, G, out);
  };
  return over_rows(x, N, K, [&](int64_t n, float* out) { rows_from(n, out, std::integral_constant<int, 1>()); },
                   [&](int64_t n, float* out) { rows_from(n, out, std::integral_constant<int, 2>()); });
}

}  // namespace

torch::Tensor gemv_int4_a8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s,
                           const torch::Tensor& z, int64_t G, bool symmetric) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0);
  check_vnni_k(K);
  TORCH_CHECK(G > 0 && K % G == 0 && (G % 64 == 0 || G == 8 || G == 16 || G == 32),
              "group size ", G, " must divide K = ", K, " and be 8, 16, 32 or a multiple of 64");
  const int64_t groups = K / G;
  for (const auto* t : {&s, &z})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups && t->is_contiguous() &&
                t->scalar_type() == torch::kHalf, "scales / zeros must be contiguous float16 [N, K/G]");
  const torch::Tensor xf = x_as_f32(x, K);
  if (K % 128 == 0 && (128 % G == 0 || G % 128 == 0))
    return int4_a8_wide(x, xf, q.data_ptr<uint8_t>(), s.data_ptr<at::Half>(), z.data_ptr<at::Half>(), N, K, G, symmetric);
  const QAct a = quantize_act(xf.data_ptr<float>(), M, K, nibble_split);
  // asymmetric: sum over each group of the dequantized activations, for the zero-point term
  std::vector<float> xg(symmetric ? 0 : M * groups);
  for (int64_t m = 0; m < (symmetric ? 0 : M); ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += a.d[m * (K / 32) + k / 32] * a.qn[m * K + k];
      xg[m * groups + g] = acc;
    }
  __m512i rel = _mm512_setzero_si512();  // each lane's group, relative to the chunk's first (G < 64)
  if (G < 64) {
    alignas(64) int32_t r[16];
    for (int l = 0; l < 16; ++l) r[l] = (8 * (l % 8)) / G;
    rel = _mm512_load_si512(r);
  }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  const at::Half* zp = z.data_ptr<at::Half>();
  const __m512i shifts = _mm512_set_epi64(F, F, F, F, 0, 0, 0, 0);  // 16-bit shift counts: 4 in the upper half
  const __m512i low = _mm512_set1_epi8(0x0F);
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const uint8_t* row = qp + n * (K / 2);
    float sf[groups + 16];  // the row's scales in float32, padded for 16-wide loads
    halves_to_f32(sp + n * groups, sf, groups);
    for (int g = 0; g < 16; ++g) sf[groups + g] = 0.f;
    auto chunk = [&](int64_t c, __m512& sv) {
      const int64_t g0 = c * 64 / G;
      sv = G >= 64 ? _mm512_set1_ps(sf[g0]) : _mm512_permutexvar_ps(rel, _mm512_loadu_ps(sf + g0));
      const __m256i b = _mm256_loadu_si256((const __m256i*)(row + c * 32));
      const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);
      return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), low);  // [32 low nibbles | 32 high nibbles]
    };
    vnni_all_rows(a, K / 64, symmetric ? 3 : 32, chunk, out);  // symmetric: (q - 8) inside the integer sum
    if (!symmetric)
      for (int64_t m = 0; m < M; ++m) {
        float zc = 0.f;
        for (int64_t g = 0; g < groups; ++g) zc += sf[g] * half_to_f32(zp + n * groups + g) * xg[m * groups + g];
        out[m] -= zc;
      }
  });
}

// GGUF Q4_K rows repacked for RAM (formats/gguf.py q4_k_rows_repacked): q uint8 [N, K/2] in the int4 layout
// (values in [0, 15]), sc / mn uint8 [N, K/32] each sub-block's 6-bit scale and min, dd fp16 [N, K/256, 2]
// each super-block's d and dmin; w = d * sc * q - dmin * mn. -> y [M, N] = Q8(x) @ w^T. The weights run
// as int4_wide_rows runs them (128-weight steps, lane l of a step in sub-block l / 4), the lane scales
// d * sc built from four scale bytes per step; the mins meet the activations' sub-block sums once per row,
// 16 sub-blocks per vector. Needs K a multiple of 256.
namespace {

template <int MT>
inline void q4k_rows(const Int4Act& a, int64_t m0, const uint8_t* row, const uint8_t* sc, const at::Half* dd,
                     __m512i rel, float* out) {
  const int64_t K = a.K, steps = K / 128;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < steps; ++c) {
    fetch_ahead(row + c * 64);
    const __m512i v = _mm512_loadu_si512(row + c * 64);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    int32_t four;
    std::memcpy(&four, sc + 4 * c, 4);  // the step's four sub-block scales
    const __m128 s4 = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(four)));
    const __m512 sv = _mm512_mul_ps(_mm512_permutexvar_ps(rel, _mm512_castps128_ps512(s4)),
                                    _mm512_set1_ps(half_to_f32(dd + 2 * (c / 2))));  // d * sc per lane
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const int8_t* q = a.q.data() + m * K + c * 128;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q)),
                                              hi, _mm512_loadu_si512(q + 64));
      const __m512 dl = _mm512_loadu_ps(a.dl.data() + m * (K / 8) + c * 16);
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dl, sv), acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

// sum over the row's sub-blocks j of dmin(j / 8) * mn[j] * xg[j] (xg: the rounded activations' sub-block sums)
inline float q4k_mins(const uint8_t* mn, const at::Half* dd, const float* xg, int64_t subs) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < subs; j += 16) {
    const __mmask16 k = subs - j >= 16 ? 0xFFFF : 0x00FF;  // subs is a multiple of 8
    const __m512 mv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, mn + j)));
    const float d0 = half_to_f32(dd + 2 * (j / 8) + 1), d1 = k == 0xFFFF ? half_to_f32(dd + 2 * (j / 8 + 1) + 1) : 0.f;
    acc = _mm512_fmadd_ps(_mm512_mul_ps(two_scales(d0, d1), mv), _mm512_maskz_loadu_ps(k, xg + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

torch::Tensor gemv_q4k_a8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& sc,
                          const torch::Tensor& mn, const torch::Tensor& dd) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0), subs = K / 32;
  TORCH_CHECK(K % 256 == 0, "Q4_K rows need K a multiple of 256, got ", K);
  for (const auto* t : {&sc, &mn})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == subs && t->is_contiguous() &&
                t->scalar_type() == torch::kUInt8, "sc / mn must be contiguous uint8 [N, K/32]");
  TORCH_CHECK(dd.dim() == 3 && dd.size(0) == N && dd.size(1) == K / 256 && dd.size(2) == 2 && dd.is_contiguous() &&
              dd.scalar_type() == torch::kHalf, "dd must be contiguous float16 [N, K/256, 2]");
  const torch::Tensor xf = x_as_f32(x, K);
  const Int4Act a = int4_act(xf.data_ptr<float>(), M, K, 32, int4_step_order);
  alignas(64) int32_t r[16];
  for (int l = 0; l < 16; ++l) r[l] = l / 4;  // lane l of a step: sub-block l / 4
  const __m512i rel = _mm512_load_si512(r);
  const uint8_t *qp = q.data_ptr<uint8_t>(), *scp = sc.data_ptr<uint8_t>(), *mnp = mn.data_ptr<uint8_t>();
  const at::Half* ddp = dd.data_ptr<at::Half>();
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const uint8_t *row = qp + n * (K / 2), *scn = scp + n * subs, *mnn = mnp + n * subs;
    const at::Half* ddn = ddp + n * (K / 128);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q4k_rows<4>(a, m, row, scn, ddn, rel, out + m);
    for (; m < M; ++m) q4k_rows<1>(a, m, row, scn, ddn, rel, out + m);
    for (m = 0; m < M; ++m) out[m] -= q4k_mins(mnn, ddn, a.xg.data() + m * subs, subs);
  });
}

// GGUF Q6_K rows repacked for RAM (formats/gguf.py q6_k_rows_repacked): ql uint8 [N, K/2] the values' low
// four bits in the int4 layout, qh uint8 [N, K/4] their high two bits (per 128-weight step 32 bytes; byte j
// holds, from bit 0 up, those of the step's even weights 2j and 2j + 64 and odd weights 2j + 1 and
// 2j + 65), sc int8 [N, K/16] the 16-weight blocks' scales, d fp16 [N, K/256]; w = d * sc * (q - 32), q in
// [0, 63]. -> y [M, N] = Q8(x) @ w^T, 210 bytes per 256 weights as the file. As q4k_rows: lanes start at
// -32 times their activation bytes' sum; lane l of a step is in 16-weight block l / 2. Needs K % 256 == 0.
namespace {

template <int MT>
inline void q6k_rows(const Int4Act& a, int64_t m0, const uint8_t* ql, const uint8_t* qh, const int8_t* sc,
                     const at::Half* d, __m512i rel, float* out) {
  const int64_t K = a.K, steps = K / 128;
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  // 16-bit shift counts per half of the 64 bytes: even weights' bits 0-1 (bytes 0-31) / 2-3 (32-63) up to 4-5,
  // odd weights' bits 4-5 / 6-7 down to 4-5
  constexpr int64_t two = 0x0002000200020002, four = 0x0004000400040004;
  const __m512i up = _mm512_set_epi64(two, two, two, two, four, four, four, four);
  const __m512i down = _mm512_set_epi64(two, two, two, two, 0, 0, 0, 0);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < steps; ++c) {
    fetch_ahead(ql + c * 64);
    fetch_ahead(qh + c * 32);
    const __m512i v = _mm512_loadu_si512(ql + c * 64);
    const __m256i h = _mm256_loadu_si256((const __m256i*)(qh + c * 32));
    const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
    const __m512i even = _mm512_or_si512(_mm512_and_si512(v, low), _mm512_and_si512(_mm512_sllv_epi16(hh, up), top));
    const __m512i odd = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                                        _mm512_and_si512(_mm512_srlv_epi16(hh, down), top));
    int64_t eight;
    std::memcpy(&eight, sc + 8 * c, 8);  // the step's eight block scales
    const __m256 s8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
    const __m512 sv = _mm512_mul_ps(_mm512_permutexvar_ps(rel, _mm512_castps256_ps512(s8)),
                                    _mm512_set1_ps(half_to_f32(d + c / 2)));  // d * sc per lane
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const int8_t* q = a.q.data() + m * K + c * 128;
      const __m512i init = _mm512_slli_epi32(_mm512_loadu_si512(a.ns8.data() + m * (K / 8) + c * 16), 2);  // -32 sums
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, even, _mm512_loadu_si512(q)), odd,
                                              _mm512_loadu_si512(q + 64));
      const __m512 dl = _mm512_loadu_ps(a.dl.data() + m * (K / 8) + c * 16);
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dl, sv), acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

}  // namespace

torch::Tensor gemv_q6k_a8(const torch::Tensor& x, const torch::Tensor& ql, const torch::Tensor& qh,
                          const torch::Tensor& sc, const torch::Tensor& d) {
  TORCH_CHECK(ql.dim() == 2 && ql.is_contiguous() && ql.scalar_type() == torch::kUInt8, "ql must be contiguous uint8 [N, K/2]");
  const int64_t N = ql.size(0), K = ql.size(1) * 2, M = x.size(0);
  TORCH_CHECK(K % 256 == 0, "Q6_K rows need K a multiple of 256, got ", K);
  TORCH_CHECK(qh.dim() == 2 && qh.size(0) == N && qh.size(1) == K / 4 && qh.is_contiguous() &&
              qh.scalar_type() == torch::kUInt8, "qh must be contiguous uint8 [N, K/4]");
  TORCH_CHECK(sc.dim() == 2 && sc.size(0) == N && sc.size(1) == K / 16 && sc.is_contiguous() &&
              sc.scalar_type() == torch::kInt8, "sc must be contiguous int8 [N, K/16]");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && d.size(1) == K / 256 && d.is_contiguous() &&
              d.scalar_type() == torch::kHalf, "d must be contiguous float16 [N, K/256]");
  const torch::Tensor xf = x_as_f32(x, K);
  const Int4Act a = int4_act(xf.data_ptr<float>(), M, K, K, int4_step_order);
  alignas(64) int32_t r[16];
  for (int l = 0; l < 16; ++l) r[l] = l / 2;  // lane l of a step: 16-weight block l / 2
  const __m512i rel = _mm512_load_si512(r);
  const uint8_t *qlp = ql.data_ptr<uint8_t>(), *qhp = qh.data_ptr<uint8_t>();
  const int8_t* scp = sc.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const uint8_t *l = qlp + n * (K / 2), *h = qhp + n * (K / 4);
    const int8_t* s = scp + n * (K / 16);
    const at::Half* dn = dp + n * (K / 256);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q6k_rows<4>(a, m, l, h, s, dn, rel, out + m);
    for (; m < M; ++m) q6k_rows<1>(a, m, l, h, s, dn, rel, out + m);
  });
}

// GGUF rows of Q8_0 (34-byte blocks), Q4_0 (18), MXFP4 (17), Q4_K (144) or Q6_K (210) -> y [M, N] =
// Q8(x) @ dequant(q)^T
// Several matrices qs (the same type and K; e.g. gate and up) against one x: y [M, sum of their N], x
// rounded once.
namespace {

inline int ld16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

// GGUF Q8_0 rows (34-byte blocks: fp16 d, 32 int8) against 8-bit activations, two blocks per VPDPBUSD
// (q + 128, each lane started at -128 times its activation bytes' sum: the exact integer q . a), the
// two fp16 scales read as a pair; MT rows of x at a time.
template <int MT>
inline void q8_0_rows(const QAct& a, const int32_t* ns128, int64_t m0, const uint8_t* row, float* out) {
  const int64_t K = a.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
#if defined(__AVX512VBMI__)
  // two blocks' 64 data bytes out of two overlapping loads (bytes 0-63 and 4-67), their scales (words 0 and
  // 17 of the first) in one permute
  static const __m512i data_idx = [] {
    alignas(64) uint8_t pick[64];
    for (int j = 0; j < 64; ++j) pick[j] = static_cast<uint8_t>(j < 32 ? 2 + j : (j + 4 < 64 ? j + 4 : 64 + j));  // 64+: second load
    return _mm512_load_si512(pick);
  }();
  const __m512i scale_idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                             0, 0, 0, 0, 0, 0, 17, 0);
#endif
  for (int64_t c = 0; c < K / 64; ++c) {
    [[maybe_unused]] const uint8_t *b0 = row + c * 68, *b1 = b0 + 34;
    fetch_ahead_lines<128>(b0);
#if defined(__AVX512VBMI__)
    const __m512i v0 = _mm512_loadu_si512(b0);
    const __m512i w = _mm512_xor_si512(_mm512_permutex2var_epi8(v0, data_idx, _mm512_loadu_si512(b0 + 4)), flip);
    const __m512 sv = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_cvtph_ps(_mm512_castsi512_si128(
        _mm512_permutexvar_epi16(scale_idx, v0)))));
#else
    const __m512i w = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
                                                          _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1), flip);
    const __m512 sv = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(ld16(b0) | ld16(b1) << 16))));
#endif
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(ns128 + m * K / 4 + c * 16), w,
                                              _mm512_loadu_si512(a.q.data() + m * K + c * 64));
      const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(a.dl.data() + m * K / 4 + c * 16), sv);
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

// GGUF Q4_0 rows (18-byte blocks: fp16 d, 16 bytes: weight j low nibble, j + 16 high) against 8-bit
// activations, four blocks (128 weights) per step: their low halves and high halves each meet 64
// activation bytes (q4_0_step_order), chained as int4_wide_rows does, lanes started at -8 times their
// activation sum (the value is q - 8).
template <int MT>
inline void q4_0_rows(const Int4Act& a, int64_t m0, const uint8_t* row, float* out) {
  const int64_t K = a.K;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
#if defined(__AVX512VBMI__)
  // the four blocks' 16 data bytes out of two overlapping 64-byte loads (bytes 0-63 and 8-71 of the step),
  // their fp16 scales (words 0, 9, 18, 27 of the first) in one permute each
  static const __m512i data_idx = [] {
    alignas(64) uint8_t pick[64];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 16; ++j) pick[16 * i + j] = static_cast<uint8_t>(i < 3 ? 18 * i + 2 + j : 64 + 48 + j);
    return _mm512_load_si512(pick);
  }();
  const __m512i scale_idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                             0, 0, 0, 0, 27, 18, 9, 0);
#endif
  for (int64_t c = 0; c < K / 128; ++c) {
    const uint8_t* b = row + c * 72;
    fetch_ahead_lines<128>(b);
#if defined(__AVX512VBMI__)
    const __m512i v0 = _mm512_loadu_si512(b);
    const __m512i v = _mm512_permutex2var_epi8(v0, data_idx, _mm512_loadu_si512(b + 8));
    const __m128i h = _mm512_castsi512_si128(_mm512_permutexvar_epi16(scale_idx, v0));
#else
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(b + 2)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(b + 20)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(b + 38)), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(b + 56)), 3);
    const __m128i h = _mm_setr_epi16(static_cast<short>(ld16(b)), static_cast<short>(ld16(b + 18)),
                                     static_cast<short>(ld16(b + 36)), static_cast<short>(ld16(b + 54)), 0, 0, 0, 0);
#endif
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    const __m512 sv = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const int8_t* q = a.q.data() + m * K + c * 128;
      __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.ns8.data() + m * (K / 8) + c * 16), lo, _mm512_loadu_si512(q));
      dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(q + 64));
      const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(a.dl.data() + m * (K / 8) + c * 16), sv);
      acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t][c & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

}  // namespace

torch::Tensor gemv_gguf_a8(const torch::Tensor& x, const std::vector<torch::Tensor>& qs, int64_t block_bytes) {
  TORCH_CHECK(!qs.empty(), "no weight matrices given");
  const int64_t per_block = block_bytes == 144 || block_bytes == 210 ? 256 : 32;  // K-quants: super-blocks
  TORCH_CHECK(block_bytes == 34 || block_bytes == 18 || block_bytes == 17 || block_bytes == 144 || block_bytes == 210,
              "block_bytes must be 34 (Q8_0), 18 (Q4_0), 17 (MXFP4), 144 (Q4_K) or 210 (Q6_K), got ", block_bytes);
  const int64_t rb = qs[0].dim() == 2 ? qs[0].size(1) : 0;
  std::vector<const uint8_t*> starts;  // each matrix's first row
  std::vector<int64_t> ends;           // cumulative row counts
  int64_t N = 0;
  for (const auto& q : qs) {
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8 && q.size(1) == rb,
                "every q must be contiguous uint8 [N, ", rb, "] (one row length)");
    starts.push_back(q.data_ptr<uint8_t>());
    N += q.size(0);
    ends.push_back(N);
  }
  TORCH_CHECK(rb % block_bytes == 0, "row bytes ", rb, " are not whole blocks of ", block_bytes);
  const int64_t blocks = rb / block_bytes, K = blocks * per_block;
  check_vnni_k(K);
  const torch::Tensor xf = x_as_f32(x, K);
  auto row_at = [&](int64_t n) {  // row n of the stacked matrices
    size_t i = 0;
    while (n >= ends[i]) ++i;
    return starts[i] + (n - (i ? ends[i - 1] : 0)) * rb;
  };
  const int64_t M = x.size(0);
  if (block_bytes == 18 && K % 128 == 0) {
    const Int4Act a4 = int4_act(xf.data_ptr<float>(), M, K, K, q4_0_step_order);
    return over_rows(x, N, K, [&](int64_t n, float* out) {
      const uint8_t* row = row_at(n);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) q4_0_rows<4>(a4, m, row, out + m);
      for (; m < M; ++m) q4_0_rows<1>(a4, m, row, out + m);
    });
  }
  const QAct a = quantize_act(xf.data_ptr<float>(), M, K, natural);
  if (block_bytes == 34) {
    std::vector<int32_t> ns128(a.ns.size());
    for (size_t i = 0; i < ns128.size(); ++i) ns128[i] = a.ns[i] * 128;
    return over_rows(x, N, K, [&](int64_t n, float* out) {
      const uint8_t* row = row_at(n);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) q8_0_rows<4>(a, ns128.data(), m, row, out + m);
      for (; m < M; ++m) q8_0_rows<1>(a, ns128.data(), m, row, out + m);
    });
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // MXFP4's e2m1 values doubled (ggml's kvalues), + 16 so they are unsigned, in every 128-bit lane
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(16, 17, 18, 19, 20, 22, 24, 28, 16, 15, 14, 13, 12, 10, 8, 4));
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const uint8_t* row = row_at(n);
    if (block_bytes == 34) {
      auto chunk = [&](int64_t c, __m512& sv) {
        const uint8_t *b0 = row + 2 * c * 34, *b1 = b0 + 34;
        sv = two_scales(f16_bits(b0), f16_bits(b1));
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
                                             _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1);
        return _mm512_xor_si512(v, flip);  // q + 128
      };
      vnni_all_rows(a, K / 64, 7, chunk, out);
    } else if (block_bytes == 18) {
      auto chunk = [&](int64_t c, __m512& sv) {
        const uint8_t *b0 = row + 2 * c * 18, *b1 = b0 + 18;
        sv = two_scales(f16_bits(b0), f16_bits(b1));
        return two_nibble_blocks(b0 + 2, b1 + 2);  // q in [0, 15]; the value is q - 8
      };
      vnni_all_rows(a, K / 64, 3, chunk, out);
    } else if (block_bytes == 144) {
      q4_k_row(a, row, blocks, out);
    } else if (block_bytes == 210) {
      q6_k_row(a, row, blocks, out);
    } else {
      auto e8m0_half = [](uint8_t e) {  // ggml_e8m0_to_fp32_half: 2^(e - 128)
        const uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23);
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      };
      auto chunk = [&](int64_t c, __m512& sv) {
        const uint8_t *b0 = row + 2 * c * 17, *b1 = b0 + 17;
        sv = two_scales(e8m0_half(b0[0]), e8m0_half(b1[0]));
        return _mm512_shuffle_epi8(lut, two_nibble_blocks(b0 + 1, b1 + 1));  // value + 16
      };
      vnni_all_rows(a, K / 64, 4, chunk, out);
    }
  });
}

// MXFP4 as GPT-OSS ships it (the hub layout): blocks uint8 [N, K/32, 16], element 2j of a block in the
// low nibble of byte j and 2j + 1 in the high one (so two blocks are int4's 64-weight chunk), scales
// uint8 [N, K/32] e8m0 (2^(e - 127)) -> y float32 [M, N] = Q8(x) @ W^T
torch::Tensor gemv_mxfp4_a8(const torch::Tensor& x, const torch::Tensor& blocks, const torch::Tensor& scales) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 16 && blocks.is_contiguous() && blocks.scalar_type() == torch::kUInt8,
              "blocks must be contiguous uint8 [N, K/32, 16]");
  const int64_t N = blocks.size(0), nb = blocks.size(1), K = nb * 32;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == nb && scales.is_contiguous() &&
              scales.scalar_type() == torch::kUInt8, "scales must be contiguous uint8 [N, K/32]");
  check_vnni_k(K);
  const torch::Tensor xf = x_as_f32(x, K);
  const QAct a = quantize_act(xf.data_ptr<float>(), x.size(0), K, nibble_split);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(16, 17, 18, 19, 20, 22, 24, 28, 16, 15, 14, 13, 12, 10, 8, 4));
  const __m512i shifts = _mm512_set_epi64(F, F, F, F, 0, 0, 0, 0);
  const __m512i low = _mm512_set1_epi8(0x0F);
  auto pow2_half = [](uint8_t e) {  // 2^(e - 128): the doubled e2m1 values' scale (ggml_e8m0_to_fp32_half)
    const uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  return over_rows(x, N, K, [&](int64_t n, float* out) {
    const uint8_t *row = bp + n * K / 2, *sc = sp + n * nb;
    auto chunk = [&](int64_t c, __m512& sv) {
      // lanes 0-3 and 8-11 hold block 2c's elements, 4-7 and 12-15 block 2c + 1's
      sv = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(pow2_half(sc[2 * c])), _mm512_set1_ps(pow2_half(sc[2 * c + 1])));
      const __m256i b = _mm256_loadu_si256((const __m256i*)(row + c * 32));
      const __m512i v = _mm512_and_si512(_mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1), shifts), low);
      return _mm512_shuffle_epi8(lut, v);  // doubled e2m1 value + 16
    };
    vnni_all_rows(a, K / 64, 4, chunk, out);
  });
}
#endif

// x float32 [M, K] -> (q int8 [M, K], d float32 [M, K/32]): the activation rounding the 8-bit paths use
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x) {
  const int64_t K = x.size(1);
  check_x(x, K);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32, got ", K);
  const torch::Tensor xf = x_as_f32(x, K);
  const QAct a = quantize_act(xf.data_ptr<float>(), x.size(0), K, natural);
  auto q = torch::empty({x.size(0), K}, x.options().dtype(torch::kInt8));
  auto d = torch::empty({x.size(0), K / 32}, x.options());
  std::memcpy(q.data_ptr<int8_t>(), a.qn.data(), a.qn.size());
  std::memcpy(d.data_ptr<float>(), a.d.data(), a.d.size() * 4);
  return {q, d};
}

// ---- decode-step glue: what a one-token step does between the weight products, in one call ----------
// A decode step on the CPU spends ~4 ms per token of the 734M model in PyTorch ops dispatched from
// Python (a dozen per norm, rope and expert). These do the same arithmetic in one call each, rounding
// every intermediate to the activation dtype where the PyTorch ops would, so a bfloat16 step keeps the
// values those ops give (attention's float32 sums excepted: they add in their own order).

namespace {

template <typename T> inline T* ptr(const torch::Tensor& t);
template <> inline float* ptr<float>(const torch::Tensor& t) { return t.data_ptr<float>(); }
template <> inline uint16_t* ptr<uint16_t>(const torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// v rounded to T's precision (float: as is), then widened back
inline float round_to(float v, float*) { return v; }
inline float round_to(float v, uint16_t*) {
  uint16_t b;
  store1(&b, v);
  return bf16_to_f32(b);
}
template <typename T> inline float rnd(float v) { return round_to(v, static_cast<T*>(nullptr)); }

// a product the compiler may not fuse into an FMA with the sum it feeds (PyTorch rounds it first)
inline float kept(float v) {
#if defined(__GNUC__)
  asm("" : "+x"(v));
#endif
  return v;
}

#if defined(__AVX512BF16__)
constexpr bool kPairs = true;  // bfloat16 x against bfloat16 weights: the pair dot, as gemv_bf16
#else
constexpr bool kPairs = false;
#endif
inline float pair_dot(const uint16_t* w, const uint16_t* x, int64_t K) { return dot_bf16_pairs(w, x, K); }
template <typename A, typename B>
inline float pair_dot(const A*, const B*, int64_t) { return 0.f; }  // float32: never taken

// RMSNorm of each row as layers.rms_norm computes it: r = x * rsqrt(mean(x^2) + eps) in float32, then
// w * round(r) (w in x's dtype) or round(w * r) (a float32 w under bfloat16 x)
template <typename T, typename Wt>
void rms_rows(const T* x, const Wt* w, T* y, int64_t M, int64_t H, float eps) {
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, H));
  at::parallel_for(0, M, rows_per_task, [&](int64_t m0, int64_t m1) {
    std::vector<float> xf(H);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t i = 0; i < H; ++i) xf[i] = widen1(x[m * H + i]);
      const float r = 1.f / std::sqrt(dot_f32(xf.data(), xf.data(), H) / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i) {
        const float v = xf[i] * r;
        if (std::is_same<Wt, float>::value && !std::is_same<T, float>::value)
          store1(y + m * H + i, widen1(w[i]) * v);
        else
          store1(y + m * H + i, widen1(w[i]) * rnd<T>(v));
      }
    }
  });
}

// rotate-half RoPE of one head's leading rd dims in place, each product and the sum rounded to T
template <typename T>
void rope_head(T* x, const T* cos, const T* sin, int64_t rd) {
  const int64_t half = rd / 2;
  float v[512];
  for (int64_t i = 0; i < rd; ++i) v[i] = widen1(x[i]);
  for (int64_t i = 0; i < rd; ++i) {
    const float rot = i < half ? -v[i + half] : v[i - half];
    const float a = rnd<T>(kept(v[i] * widen1(cos[i]))), b = rnd<T>(kept(rot * widen1(sin[i])));
    store1(x + i, a + b);
  }
}

// One query head against keys lo..pos of its key/value head: o = sum_j p_j v_j / sum_j p_j with
// p_j = exp(s_j - max), s_j = (q . k_j) * scale in float32. bfloat16: p_j rounded before it multiplies
// v (as SDPA's CPU kernel does). With a sink logit: p_j = round(exp(s_j - m) / Z), Z counting the sink.
template <typename T>
void attend_head(const float* q, const T* kc, const T* vc, int64_t ks, int64_t lo, int64_t pos, int64_t hd,
                 float scale, const float* sink, float* s, float* kr, T* out) {
  float mx = -INFINITY;
  for (int64_t j = lo; j <= pos; ++j) {
    widen(kc + j * ks, kr, hd);
    s[j] = dot_f32(q, kr, hd) * scale;
    mx = std::max(mx, s[j]);
  }
  if (sink) mx = std::max(mx, *sink);
  float z = 0.f;
  for (int64_t j = lo; j <= pos; ++j) {
    s[j] = std::exp(s[j] - mx);
    z += s[j];
  }
  std::vector<float> acc(hd, 0.f);
  if (sink) {
    z += std::exp(*sink - mx);
    for (int64_t j = lo; j <= pos; ++j) s[j] = rnd<T>(s[j] / z);
    z = 1.f;
  } else {
    for (int64_t j = lo; j <= pos; ++j) s[j] = rnd<T>(s[j]);
  }
  for (int64_t j = lo; j <= pos; ++j) {
    const T* v = vc + j * ks;
    for (int64_t d = 0; d < hd; ++d) acc[d] += s[j] * widen1(v[d]);
  }
  for (int64_t d = 0; d < hd; ++d) store1(out + d, sink ? acc[d] : acc[d] / z);
}

template <typename T>
void attn_decode_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                      torch::Tensor& kc, torch::Tensor& vc, int64_t pos, int64_t nh, int64_t nkv, int64_t hd,
                      int64_t rd, int64_t window, float scale, const float* sinks, torch::Tensor& o) {
  T* x = ptr<T>(qkv);  // [nh + 2 nkv, hd]: rotated in place (a scratch copy of the projection)
  const T* c = ptr<T>(cos);
  const T* sn = ptr<T>(sin);
  for (int64_t h = 0; h < nh + nkv; ++h) rope_head(x + h * hd, c, sn, rd);
  T* kp = ptr<T>(kc);
  T* vp = ptr<T>(vc);
  const int64_t hs = kc.stride(0), ks = kc.stride(1);  // per kv head, per position
  for (int64_t g = 0; g < nkv; ++g) {
    std::memcpy(kp + g * hs + pos * ks, x + (nh + g) * hd, hd * sizeof(T));
    std::memcpy(vp + g * hs + pos * ks, x + (nh + nkv + g) * hd, hd * sizeof(T));
  }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  const int64_t rep = nh / nkv;
  T* op = ptr<T>(o);
  auto heads = [&](int64_t h0, int64_t h1) {
    std::vector<float> s(pos + 1), q(hd), kr(hd);
    for (int64_t h = h0; h < h1; ++h) {
      widen(x + h * hd, q.data(), hd);
      const int64_t g = h / rep;
      attend_head(q.data(), kp + g * hs, vp + g * hs, ks, lo, pos, hd, scale, sinks ? sinks + h : nullptr,
                  s.data(), kr.data(), op + h * hd);
    }
  };
  if ((pos + 1 - lo) * nh * hd >= (int64_t{1} << 17)) at::parallel_for(0, nh, 1, heads);
  else heads(0, nh);
}

// One token's routed experts with float weights, ascending as given: out += w_j * W2_j (silu(g) * u),
// [g | u] = W13_j x, each step rounded to T as the PyTorch ops of reference.expert_ffn would.
template <typename T>
void experts_impl(const torch::Tensor& x, const std::vector<torch::Tensor>& w13s,
                  const std::vector<torch::Tensor>& w2s, const float* weights, torch::Tensor& out) {
  const int64_t H = x.size(1), I = w2s[0].size(1);
  const T* xp = ptr<T>(x);
  T* yp = ptr<T>(out);
  const bool pairs = std::is_same<T, uint16_t>::value && kPairs;
  std::vector<float> xf(H), hf(I);
  std::vector<uint16_t> hb(pairs ? I : 0);
  auto gate_up = torch::empty({2 * I}, x.options());  // [g | u] in x's dtype: silu runs as PyTorch's op on g
  T* gu = ptr<T>(gate_up);
  widen(xp, xf.data(), H);
  for (size_t j = 0; j < w13s.size(); ++j) {
    const T* w13 = ptr<T>(w13s[j]);
    const T* w2 = ptr<T>(w2s[j]);
    at::parallel_for(0, 2 * I, grain(H, 1), [&](int64_t n0, int64_t n1) {
      if (pairs) {
        for (int64_t n = n0; n < n1; ++n) store1(gu + n, pair_dot(w13 + n * H, xp, H));
        return;
      }
      std::vector<float> d(n1 - n0);
      dots(w13, H, xf.data(), n0, n1, d.data());
      for (int64_t n = n0; n < n1; ++n) store1(gu + n, d[n - n0]);
    });
    const auto act = at::silu(gate_up.narrow(0, 0, I));  // PyTorch's own silu: its exp, its rounding
    const T* sp = ptr<T>(act);
    for (int64_t i = 0; i < I; ++i) {
      hf[i] = rnd<T>(kept(widen1(sp[i]) * widen1(gu[I + i])));
      if (pairs) store1(hb.data() + i, hf[i]);
    }
    const float wj = weights[j];
    at::parallel_for(0, H, grain(I, 1), [&](int64_t n0, int64_t n1) {
      std::vector<float> d(n1 - n0);
      if (pairs) {
        for (int64_t n = n0; n < n1; ++n) d[n - n0] = pair_dot(w2 + n * I, hb.data(), I);
      } else {
        dots(w2, I, hf.data(), n0, n1, d.data());
      }
      for (int64_t n = n0; n < n1; ++n) store1(yp + n, widen1(yp[n]) + rnd<T>(kept(rnd<T>(d[n - n0]) * wj)));
    });
  }
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              name, " must be contiguous float32 or bfloat16");
}

}  // namespace

// x [M, H] float32 / bfloat16, w [H] (x's dtype, or float32) -> RMSNorm(x) * w [M, H] in x's dtype
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(w, "w");
  const int64_t H = x.size(-1), M = x.numel() / H;
  TORCH_CHECK(w.numel() == H && (w.scalar_type() == x.scalar_type() || w.scalar_type() == torch::kFloat32),
              "w must be [", H, "] in x's dtype or float32");
  auto y = torch::empty_like(x);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == torch::kFloat32) rms_rows(ptr<float>(x), ptr<float>(w), ptr<float>(y), M, H, e);
  else if (w.scalar_type() == torch::kFloat32) rms_rows(ptr<uint16_t>(x), ptr<float>(w), ptr<uint16_t>(y), M, H, e);
  else rms_rows(ptr<uint16_t>(x), ptr<uint16_t>(w), ptr<uint16_t>(y), M, H, e);
  return y;
}

// qkv [(nh + 2 nkv) * hd] one token's projection; cos / sin [>= rd]; kc / vc [nkv, S, hd] the layer's
// cache (written at pos) -> o [nh * hd], all in one dtype (float32 or bfloat16). sinks: [nh] float32 or empty.
torch::Tensor attn_decode(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor kc, torch::Tensor vc, int64_t pos, int64_t nh, int64_t nkv, int64_t rd,
                          int64_t window, double scale, const torch::Tensor& sinks) {
  check_rows(qkv, "qkv");
  const auto dt = qkv.scalar_type();
  const int64_t hd = kc.size(2);
  TORCH_CHECK(qkv.numel() == (nh + 2 * nkv) * hd && nh % nkv == 0 && rd <= hd && rd % 2 == 0 && rd <= 512,
              "qkv must hold nh + 2 nkv heads of ", hd);
  TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes() && vc.strides() == kc.strides() && kc.stride(2) == 1 &&
              kc.size(0) == nkv && pos >= 0 && pos < kc.size(1) && kc.scalar_type() == dt && vc.scalar_type() == dt,
              "the caches must be [", nkv, ", S > ", pos, ", ", hd, "] in qkv's dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() >= rd && sin.numel() >= rd &&
              cos.scalar_type() == dt && sin.scalar_type() == dt, "cos / sin must be [>= ", rd, "] in qkv's dtype");
  const float* sk = nullptr;
  if (sinks.numel()) {
    TORCH_CHECK(sinks.numel() == nh && sinks.scalar_type() == torch::kFloat32 && sinks.is_contiguous(),
                "sinks must be float32 [", nh, "]");
    sk = sinks.data_ptr<float>();
  }
  auto x = qkv.clone();
  auto o = torch::empty({1, nh * hd}, qkv.options());
  const float sc = static_cast<float>(scale);
  if (dt == torch::kFloat32) attn_decode_impl<float>(x, cos, sin, kc, vc, pos, nh, nkv, hd, rd, window, sc, sk, o);
  else attn_decode_impl<uint16_t>(x, cos, sin, kc, vc, pos, nh, nkv, hd, rd, window, sc, sk, o);
  return o;
}

// x [1, H]; w13s [2I, H] and w2s [H, I] per expert, expert j weighted by weights[cols[j]] (float32 [k]);
// out [1, H] += the experts' weighted outputs (see experts_impl). Tensors in x's dtype (float32 or bfloat16).
void experts_decode(const torch::Tensor& x, const std::vector<torch::Tensor>& w13s,
                    const std::vector<torch::Tensor>& w2s, const torch::Tensor& weights,
                    const std::vector<int64_t>& cols, torch::Tensor out) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && out.sizes() == x.sizes() && out.is_contiguous() &&
              out.scalar_type() == x.scalar_type(), "x and out must be [1, H] in one dtype");
  TORCH_CHECK(w13s.size() == w2s.size() && w13s.size() == cols.size(), "one w13, w2 and weight column per expert");
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous() && weights.scalar_type() == torch::kFloat32,
              "weights must be float32 [k]");
  std::vector<float> w(cols.size());
  for (size_t j = 0; j < cols.size(); ++j) {
    TORCH_CHECK(cols[j] >= 0 && cols[j] < weights.size(0), "weight column ", cols[j], " outside [0, ", weights.size(0), ")");
    w[j] = weights.data_ptr<float>()[cols[j]];
  }
  const int64_t H = x.size(1);
  for (size_t j = 0; j < w13s.size(); ++j) {
    const auto& a = w13s[j];
    const auto& b = w2s[j];
    TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.scalar_type() == x.scalar_type() &&
                b.scalar_type() == x.scalar_type() && a.dim() == 2 && b.dim() == 2 && a.size(1) == H &&
                b.size(0) == H && a.size(0) == 2 * b.size(1) && b.size(1) == w2s[0].size(1),
                "expert ", j, ": w13 must be [2I, ", H, "] and w2 [", H, ", I], contiguous, in x's dtype");
  }
  if (w13s.empty()) return;
  if (x.scalar_type() == torch::kFloat32) experts_impl<float>(x, w13s, w2s, w.data(), out);
  else experts_impl<uint16_t>(x, w13s, w2s, w.data(), out);
}

#if MOE_VNNI
namespace {

// One projection of a packed expert against 8-bit activations: kind 0 int8 (q, s), 1 int4 (q, s, z; a the
// group size, b symmetric), 2 GGUF rows (the matrices; a the block bytes), 3 GGUF Q4_K repacked (q, sc, mn,
// dd), 4 GGUF Q6_K repacked (ql, qh, sc, d). y in x's dtype.
torch::Tensor a8_projection(const torch::Tensor& x, int64_t kind, const std::vector<torch::Tensor>& t, int64_t a,
                            int64_t b) {
  switch (kind) {
    case 0: return gemv_int8_a8(x, t.at(0), t.at(1));
    case 1: return gemv_int4_a8(x, t.at(0), t.at(1), t.at(2), a, b != 0);
    case 2: return gemv_gguf_a8(x, t, a);
    case 3: return gemv_q4k_a8(x, t.at(0), t.at(1), t.at(2), t.at(3));
    case 4: return gemv_q6k_a8(x, t.at(0), t.at(1), t.at(2), t.at(3));
  }
  TORCH_CHECK(false, "unknown projection kind ", kind);
}

template <typename T>
void swiglu_into(const torch::Tensor& gu, torch::Tensor& h) {  // h [1, I] = round(silu(g) * u), as PyTorch
  const int64_t I = h.size(1);
  const auto act = at::silu(gu.narrow(1, 0, I).contiguous());
  const T* sp = ptr<T>(act);
  const T* up = ptr<T>(gu) + I;
  T* hp = ptr<T>(h);
  for (int64_t i = 0; i < I; ++i) store1(hp + i, widen1(sp[i]) * widen1(up[i]));
}

template <typename T>
void add_weighted(const torch::Tensor& y, float w, torch::Tensor& out) {  // out += round(y * w), as PyTorch
  const T* yp = ptr<T>(y);
  T* op = ptr<T>(out);
  for (int64_t n = 0; n < out.size(1); ++n) store1(op + n, widen1(op[n]) + rnd<T>(kept(widen1(yp[n]) * w)));
}

}  // namespace

// One token's packed experts against 8-bit activations: expert j's gate|up projection is spec 2j and its
// down projection spec 2j + 1 (kinds, tensors, a, b as a8_projection takes them), weighted by
// weights[cols[j]]; out [1, H] += each expert's output, rounded step by step as the PyTorch ops around
// the same kernels would (reference.moe_loop over the pool's ffn).
void experts_decode_a8(const torch::Tensor& x, const std::vector<int64_t>& kinds,
                       const std::vector<std::vector<torch::Tensor>>& tensors, const std::vector<int64_t>& as,
                       const std::vector<int64_t>& bs, const torch::Tensor& weights, const std::vector<int64_t>& cols,
                       torch::Tensor out) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && out.sizes() == x.sizes() && out.is_contiguous() &&
              out.scalar_type() == x.scalar_type(), "x and out must be [1, H] in one dtype");
  TORCH_CHECK(kinds.size() == 2 * cols.size() && tensors.size() == kinds.size() && as.size() == kinds.size() &&
              bs.size() == kinds.size(), "two projections (gate|up, down) per expert");
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous() && weights.scalar_type() == torch::kFloat32,
              "weights must be float32 [k]");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  for (size_t j = 0; j < cols.size(); ++j) {
    TORCH_CHECK(cols[j] >= 0 && cols[j] < weights.size(0), "weight column ", cols[j], " outside [0, ", weights.size(0), ")");
    const auto gu = a8_projection(x, kinds[2 * j], tensors[2 * j], as[2 * j], bs[2 * j]);  // [1, 2I]
    TORCH_CHECK(gu.size(1) % 2 == 0, "expert ", j, ": gate|up has an odd width ", gu.size(1));
    auto h = torch::empty({1, gu.size(1) / 2}, x.options());
    bf16 ? swiglu_into<uint16_t>(gu, h) : swiglu_into<float>(gu, h);
    const auto y = a8_projection(h, kinds[2 * j + 1], tensors[2 * j + 1], as[2 * j + 1], bs[2 * j + 1]);
    TORCH_CHECK(y.sizes() == out.sizes(), "expert ", j, ": down gives ", y.sizes(), ", out is ", out.sizes());
    const float w = weights.data_ptr<float>()[cols[j]];
    bf16 ? add_weighted<uint16_t>(y, w, out) : add_weighted<float>(y, w, out);
  }
}
#endif

// One projection of a decode step, exactly as model/layers.linear runs it on one row (kernels/cpu_gemv.py's
// StepProjection chooses the kind): 0 bfloat16 pair dots (x and w bfloat16), 1 float32 sums over x as
// float32 (w float32 or bfloat16), 2 int8 rows (q, s) against 8-bit activations, 3 int8 rows against float32
// x; the result in x's dtype, then `+ bias` where bias is not empty (PyTorch's add, its type promotion).
torch::Tensor step_projection(const torch::Tensor& x, int64_t kind, const std::vector<torch::Tensor>& t,
                              const torch::Tensor& bias) {
  torch::Tensor y;
  switch (kind) {
    case 0: y = gemv_bf16(x, t.at(0)); break;
    case 1: y = gemv_float(x.to(torch::kFloat32).contiguous(), t.at(0)).to(x.scalar_type()); break;
#if MOE_VNNI
    case 2: y = gemv_int8_a8(x, t.at(0), t.at(1)).to(x.scalar_type()); break;
#endif
    case 3: y = gemv_int8(x.to(torch::kFloat32).contiguous(), t.at(0), t.at(1)).to(x.scalar_type()); break;
    default: TORCH_CHECK(false, "unknown step projection kind ", kind);
  }
  return bias.numel() ? y + bias : y;
}

// The attention half of one decode step of a grouped-query layer, and its MoE router, planned once per
// layer, run per token: for the residual x [1, H],
//   a = o_proj(attention(qkv_proj(RMSNorm(x) * ln1)))    (RoPE at pos, the cache written at pos; with
//                                                         q_norm / k_norm [hd]: each q and k head normed first)
//   x2 = x + a;  h = RMSNorm(x2) * ln2;  logits = router(h)
// -> {x2, h, logits}, each op the one the Python step runs (rms_norm, step_projection, attn_decode), so the
// values are the same. projections: qkv, o, router (kinds / tensors / biases as step_projection takes them);
// sinks [nh] in any float dtype or empty (read as float32 at each call, so edits in place are seen).
class AttnDecode {
 public:
  AttnDecode(torch::Tensor ln1, torch::Tensor ln2, double eps, std::vector<int64_t> kinds,
             std::vector<std::vector<torch::Tensor>> weights, std::vector<torch::Tensor> biases, int64_t nh, int64_t nkv,
             int64_t rd, int64_t window, double scale, torch::Tensor sinks, torch::Tensor q_norm, torch::Tensor k_norm)
      : ln1_(std::move(ln1)), ln2_(std::move(ln2)), eps_(eps), kinds_(std::move(kinds)), weights_(std::move(weights)),
        biases_(std::move(biases)), nh_(nh), nkv_(nkv), rd_(rd), window_(window), scale_(scale),
        sinks_(std::move(sinks)), q_norm_(std::move(q_norm)), k_norm_(std::move(k_norm)) {
    TORCH_CHECK(kinds_.size() == 3 && weights_.size() == 3 && biases_.size() == 3, "three projections: qkv, o, router");
  }

  // x [1, H]; cos / sin the whole RoPE tables [S, >= rd]; k_cache / v_cache [L, B, nkv, S, hd], of which
  // layer `layer`, row 0 is read and written at pos
  std::vector<torch::Tensor> run(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                 const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t layer,
                                 int64_t pos) const {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "x must be [1, H]");
    TORCH_CHECK(pos >= 0 && pos < cos.size(0) && pos < sin.size(0), "position ", pos, " outside the RoPE tables");
    TORCH_CHECK(k_cache.dim() == 5 && layer >= 0 && layer < k_cache.size(0), "caches must be [L, B, nkv, S, hd]");
    const auto kc = k_cache.select(0, layer).select(0, 0), vc = v_cache.select(0, layer).select(0, 0);
    auto qkv = step_projection(rms_norm(x, ln1_, eps_), kinds_[0], weights_[0], biases_[0]);
    if (q_norm_.numel()) {  // Qwen3: RMSNorm over head_dim, per q and k head (model/transformer.py _qkv)
      const auto heads = qkv.view({nh_ + 2 * nkv_, kc.size(2)});
      qkv = at::cat({rms_norm(heads.narrow(0, 0, nh_), q_norm_, eps_), rms_norm(heads.narrow(0, nh_, nkv_), k_norm_, eps_),
                     heads.narrow(0, nh_ + nkv_, nkv_)}, 0);
    }
    const auto sinks = sinks_.numel() ? sinks_.to(torch::kFloat32).contiguous() : sinks_;
    const auto o = attn_decode(qkv.reshape(-1).contiguous(), cos[pos], sin[pos], kc, vc, pos, nh_, nkv_, rd_, window_,
                               scale_, sinks);
    auto x2 = x + step_projection(o, kinds_[1], weights_[1], biases_[1]);
    auto h = rms_norm(x2, ln2_, eps_);
    auto logits = step_projection(h, kinds_[2], weights_[2], biases_[2]);
    return {x2, h, logits};
  }

 private:
  torch::Tensor ln1_, ln2_;
  double eps_;
  std::vector<int64_t> kinds_;
  std::vector<std::vector<torch::Tensor>> weights_;
  std::vector<torch::Tensor> biases_;
  int64_t nh_, nkv_, rd_, window_;
  double scale_;
  torch::Tensor sinks_, q_norm_, k_norm_;
};

// A MoE layer's router function and its experts, planned once, run per decode token: logits [1, E] ->
// the top_k experts and weights by the same PyTorch ops as families.Routing (softmax then top-k, optionally
// renormalized; or top-k of the logits then softmax over them; then the scale), then the chosen experts in
// ascending id into out = 0 + each weighted output, by experts_decode_a8 (packed experts: two projections
// per expert, kinds / tensors / a / b as a8_projection takes them) or experts_decode (float experts:
// tensors[e] = {w13, w2}), as reference.moe_loop runs one token.
class MoeDecode {
 public:
  MoeDecode(int64_t scoring, bool renormalize, double scale, int64_t top_k, bool packed, std::vector<int64_t> kinds,
            std::vector<std::vector<torch::Tensor>> tensors, std::vector<int64_t> as, std::vector<int64_t> bs)
      : scoring_(scoring), renormalize_(renormalize), scale_(scale), top_k_(top_k), packed_(packed),
        kinds_(std::move(kinds)), tensors_(std::move(tensors)), as_(std::move(as)), bs_(std::move(bs)) {
    TORCH_CHECK(scoring == 0 || scoring == 1, "scoring must be 0 (softmax) or 1 (top-k then softmax)");
    const size_t per = packed ? 2 : 1;
    TORCH_CHECK(!tensors_.empty() && tensors_.size() % per == 0, "one entry per projection (packed) or expert");
    experts_ = static_cast<int64_t>(tensors_.size() / per);
    TORCH_CHECK(top_k >= 1 && top_k <= experts_, "top_k ", top_k, " outside 1..", experts_);
    if (packed) {
#if !MOE_VNNI
      TORCH_CHECK(false, "packed experts need the 8-bit activation kernels (AVX512-VNNI)");
#endif
      TORCH_CHECK(kinds_.size() == tensors_.size() && as_.size() == tensors_.size() && bs_.size() == tensors_.size(),
                  "kinds, a and b: one per projection");
    } else {
      for (const auto& t : tensors_) TORCH_CHECK(t.size() == 2, "float experts: {w13, w2} each");
    }
  }

  // h [1, H], logits [1, E] -> {out [1, H], ids [1, k] int64, weights [1, k] float32}
  std::vector<torch::Tensor> run(const torch::Tensor& h, const torch::Tensor& logits) const {
    TORCH_CHECK(logits.dim() == 2 && logits.size(0) == 1 && logits.size(1) == experts_, "logits must be [1, ", experts_, "]");
    torch::Tensor weights, ids;
    const auto lf = logits.to(torch::kFloat32);
    if (scoring_ == 1) {
      auto top = at::topk(lf, top_k_, -1);
      weights = at::softmax(std::get<0>(top), -1);
      ids = std::get<1>(top);
    } else {
      auto top = at::topk(at::softmax(lf, -1), top_k_, -1);
      weights = std::get<0>(top), ids = std::get<1>(top);
      if (renormalize_) weights = weights / weights.sum(-1, true);
    }
    if (scale_ != 1.0) weights = weights * scale_;
    const int64_t* id = ids.data_ptr<int64_t>();
    std::vector<int64_t> cols(top_k_);
    for (int64_t j = 0; j < top_k_; ++j) cols[j] = j;
    std::stable_sort(cols.begin(), cols.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });
    auto out = torch::zeros_like(h);
    const auto w = weights.select(0, 0).contiguous();
    if (packed_) {
#if MOE_VNNI
      std::vector<int64_t> kinds, as, bs;
      std::vector<std::vector<torch::Tensor>> tensors;
      for (int64_t j : cols)
        for (int64_t p = 2 * id[j]; p < 2 * id[j] + 2; ++p)
          kinds.push_back(kinds_[p]), tensors.push_back(tensors_[p]), as.push_back(as_[p]), bs.push_back(bs_[p]);
      experts_decode_a8(h, kinds, tensors, as, bs, w, cols, out);
#endif
    } else {
      std::vector<torch::Tensor> w13s, w2s;
      for (int64_t j : cols) w13s.push_back(tensors_[id[j]][0]), w2s.push_back(tensors_[id[j]][1]);
      experts_decode(h, w13s, w2s, w, cols, out);
    }
    return {out, ids, weights};
  }

 private:
  int64_t scoring_;
  bool renormalize_;
  double scale_;
  int64_t top_k_, experts_ = 0;
  bool packed_;
  std::vector<int64_t> kinds_;
  std::vector<std::vector<torch::Tensor>> tensors_;
  std::vector<int64_t> as_, bs_;
};

bool has_vnni() { return MOE_VNNI; }
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
  mod.def("dequant_int4", &dequant_int4, "W [N, K] = (q - z) * s per group (float32 or bf16), bit-equal to the reference");
  mod.def("dequant_int8", &dequant_int8, "W [N, K] = q * s[:, None] (float32 or bf16), bit-equal to the reference");
  mod.def("rms_norm", &rms_norm, "RMSNorm(x [M, H]) * w, as layers.rms_norm rounds it");
  mod.def("attn_decode", &attn_decode, "one token's RoPE, cache write and grouped-query attention");
  mod.def("experts_decode", &experts_decode, "out [1, H] += one token's float experts, weighted");
  mod.def("step_projection", &step_projection, "one decode projection as layers.linear runs it (kind 0-3)");
  pybind11::class_<AttnDecode>(mod, "AttnDecode", pybind11::module_local(),
                               "a decode step's attention half and router for one layer")
      .def(pybind11::init<torch::Tensor, torch::Tensor, double, std::vector<int64_t>, std::vector<std::vector<torch::Tensor>>,
                          std::vector<torch::Tensor>, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor,
                          torch::Tensor, torch::Tensor>())
      .def("run", &AttnDecode::run, "x [1, H], cos, sin, k_cache, v_cache, layer, pos -> [x2, h, logits]");
  pybind11::class_<MoeDecode>(mod, "MoeDecode", pybind11::module_local(),
                              "a MoE layer's router function and experts for one decode token")
      .def(pybind11::init<int64_t, bool, double, int64_t, bool, std::vector<int64_t>, std::vector<std::vector<torch::Tensor>>,
                          std::vector<int64_t>, std::vector<int64_t>>())
      .def("run", &MoeDecode::run, "h [1, H], logits [1, E] -> [out, ids, weights]");
  mod.def("has_avx512", &has_avx512, "whether the AVX-512 paths were compiled in");
  mod.def("has_vnni", &has_vnni, "whether the 8-bit activation (AVX512-VNNI) paths were compiled in");
  mod.def("quantize_activations", &quantize_activations, "x [M, K] -> (int8 q, float32 d per 32): x ~ q * d");
#if MOE_VNNI
  mod.def("gemv_int8_a8", &gemv_int8_a8, "y = Q8(x) @ (q * s[:, None])^T");
  mod.def("gemv_int4_a8", &gemv_int4_a8, "y = Q8(x) @ ((q - z) * s per group)^T");
  mod.def("gemv_gguf_a8", &gemv_gguf_a8, "y = Q8(x) @ dequant(q)^T for GGUF Q8_0 / Q4_0 / MXFP4 rows");
  mod.def("gemv_q4k_a8", &gemv_q4k_a8, "y = Q8(x) @ W^T, W GGUF Q4_K repacked (q, sc, mn, dd)");
  mod.def("gemv_q6k_a8", &gemv_q6k_a8, "y = Q8(x) @ W^T, W GGUF Q6_K repacked (ql, qh, sc, d)");
  mod.def("experts_decode_a8", &experts_decode_a8, "out [1, H] += one token's packed experts (8-bit activations)");
  mod.def("gemv_mxfp4_a8", &gemv_mxfp4_a8, "y = Q8(x) @ W^T, W MXFP4 as GPT-OSS ships it (blocks, e8m0 scales)");
#endif
}
