// Row kernels: a portable scalar path, AVX2+FMA and AVX-512 (x86, chosen at run time with
// __builtin_cpu_supports and per-function target attributes), NEON (Apple Silicon / arm64).
#include "kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASHMOE_X86 1
#endif
#if defined(__aarch64__) || defined(__ARM_NEON)
#include <arm_neon.h>
#define FLASHMOE_NEON 1
#endif

namespace flashmoe_native {
namespace {

// Words [from, words) one value at a time, x in original order (the tail keeps identity order).
template <int BITS>
inline float scalar_tail(const uint32_t* w, const float* xp, const float* sf, int from, int words, int wpg) {
  constexpr int VPW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  float acc = 0.f;
  for (int i = from; i < words; ++i) {
    const uint32_t v = w[i];
    const float* xw = xp + i * VPW;
    float d = 0.f;
    for (int k = 0; k < VPW; ++k) d += float((v >> (BITS * k)) & MASK) * xw[k];
    acc += sf[i / wpg] * d;
  }
  return acc;
}

template <int BITS>
float row_scalar(const uint32_t* w, const float* xp, const float* sf, int words, int wpg) {
  return scalar_tail<BITS>(w, xp, sf, 0, words, wpg);
}

#ifdef FLASHMOE_X86
template <int BITS>
__attribute__((target("avx2,fma"))) float row_avx2(
    const uint32_t* w, const float* xp, const float* sf, int words, int wpg) {
  constexpr int VPW = 32 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  alignas(32) int idx[8];
  for (int j = 0; j < 8; ++j) idx[j] = j / wpg;  // lane j's group within the block
  const __m256i sidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  __m256 acc = _mm256_setzero_ps();
  const int nb = words / 8;
  for (int b = 0; b < nb; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * b));
    const float* xb = xp + 8 * VPW * b;
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int k = 0; k < VPW; k += 2) {
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, BITS * k), mask));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, BITS * (k + 1)), mask));
      d0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xb + 8 * k), d0);
      d1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8 * (k + 1)), d1);
    }
    const __m256 s = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf + (8 * b) / wpg), sidx);
    acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), s, acc);
  }
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r) + scalar_tail<BITS>(w, xp, sf, nb * 8, words, wpg);
}

// AVX-512: each value is masked in place, (v & (mask << BITS*k)) = q * 2^(BITS*k), converted
// unsigned (exact: at most BITS significant bits), and the 2^(-BITS*k) is folded into xp.
// R rows at once (rows of one matrix, row_stride words apart) share every load of x, so a
// value costs one AND, one convert and one FMA per row; two accumulators per row keep the
// FMA chains short. At 2 and 4 bits the weight stream is prefetched kPrefetchBytes ahead in
// each row: a core spends twice the time per byte there than at 8 bits, and the hardware
// prefetchers alone then leave it well short of DRAM bandwidth (+15-25% measured, one core);
// at 8 bits the extra instructions cost more than they save (-7-15%), so none.
template <int BITS>
constexpr int kPrefetchBytes = BITS == 8 ? 0 : 2048;

template <int BITS, int R>
__attribute__((target("avx512f,avx2,fma"))) void rows_avx512(
    const uint32_t* w, int64_t row_stride, const float* xp, const float* sf, int sf_stride, int words, int wpg,
    float* out) {
  constexpr int VPW = 32 / BITS;
  alignas(64) int idx[16];
  for (int j = 0; j < 16; ++j) idx[j] = j / wpg;  // lane j's group within the block
  const __m512i sidx = _mm512_load_si512(idx);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int nb = words / 16;
  for (int b = 0; b < nb; ++b) {
    __m512i v[R];
    for (int r = 0; r < R; ++r) {
      const uint32_t* wb = w + r * row_stride + 16 * b;
      if (kPrefetchBytes<BITS> > 0) _mm_prefetch(reinterpret_cast<const char*>(wb) + kPrefetchBytes<BITS>, _MM_HINT_T0);
      v[r] = _mm512_loadu_si512(wb);
    }
    const float* xb = xp + 16 * VPW * b;
    __m512 d0[R], d1[R];
    for (int r = 0; r < R; ++r) d0[r] = d1[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int k = 0; k < VPW; k += 2) {
      const __m512i m0 = _mm512_set1_epi32(static_cast<int>(((1u << BITS) - 1) << (BITS * k)));
      const __m512i m1 = _mm512_set1_epi32(static_cast<int>(((1u << BITS) - 1) << (BITS * (k + 1))));
      const __m512 x0 = _mm512_loadu_ps(xb + 16 * k), x1 = _mm512_loadu_ps(xb + 16 * (k + 1));
      for (int r = 0; r < R; ++r) {
        d0[r] = _mm512_fmadd_ps(_mm512_cvtepu32_ps(_mm512_and_si512(v[r], m0)), x0, d0[r]);
        d1[r] = _mm512_fmadd_ps(_mm512_cvtepu32_ps(_mm512_and_si512(v[r], m1)), x1, d1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(sf + r * sf_stride + (16 * b) / wpg));
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(d0[r], d1[r]), s, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) +
             scalar_tail<BITS>(w + r * row_stride, xp, sf + r * sf_stride, nb * 16, words, wpg);
}

template <int BITS>
void rows_avx512_any(const uint32_t* w, int64_t row_stride, int nrows, const float* xp, const float* sf,
                     int sf_stride, int words, int wpg, float* out) {
  switch (nrows) {
    case 4: return rows_avx512<BITS, 4>(w, row_stride, xp, sf, sf_stride, words, wpg, out);
    case 3: return rows_avx512<BITS, 3>(w, row_stride, xp, sf, sf_stride, words, wpg, out);
    case 2: return rows_avx512<BITS, 2>(w, row_stride, xp, sf, sf_stride, words, wpg, out);
    default: return rows_avx512<BITS, 1>(w, row_stride, xp, sf, sf_stride, words, wpg, out);
  }
}
#endif  // FLASHMOE_X86

#ifdef FLASHMOE_NEON
template <int BITS>
float row_neon(const uint32_t* w, const float* xp, const float* sf, int words, int wpg) {
  constexpr int VPW = 32 / BITS;
  const uint32x4_t mask = vdupq_n_u32((1u << BITS) - 1);
  float32x4_t acc = vdupq_n_f32(0.f);
  const int nb = words / 4;
  for (int b = 0; b < nb; ++b) {
    const uint32x4_t v = vld1q_u32(w + 4 * b);
    const float* xb = xp + 4 * VPW * b;
    float32x4_t d0 = vdupq_n_f32(0.f), d1 = vdupq_n_f32(0.f);
#pragma GCC unroll 16
    for (int k = 0; k < VPW; k += 2) {
      const float32x4_t q0 = vcvtq_f32_u32(vandq_u32(vshlq_u32(v, vdupq_n_s32(-BITS * k)), mask));
      const float32x4_t q1 = vcvtq_f32_u32(vandq_u32(vshlq_u32(v, vdupq_n_s32(-BITS * (k + 1))), mask));
      d0 = vfmaq_f32(d0, q0, vld1q_f32(xb + 4 * k));
      d1 = vfmaq_f32(d1, q1, vld1q_f32(xb + 4 * (k + 1)));
    }
    const int g = (4 * b) / wpg;
    float32x4_t s;
    if (wpg >= 4) {
      s = vdupq_n_f32(sf[g]);
    } else {
      const float lanes[4] = {sf[g], sf[g + 1 / wpg], sf[g + 2 / wpg], sf[g + 3 / wpg]};
      s = vld1q_f32(lanes);
    }
    acc = vfmaq_f32(acc, vaddq_f32(d0, d1), s);
  }
  return vaddvq_f32(acc) + scalar_tail<BITS>(w, xp, sf, nb * 4, words, wpg);
}
#endif  // FLASHMOE_NEON

// Single-row kernels serve several rows one after the other (AVX2, NEON, scalar).
using RowFn = float (*)(const uint32_t* w, const float* xp, const float* sf, int words, int wpg);

template <RowFn F>
void rows_each(const uint32_t* w, int64_t row_stride, int nrows, const float* xp, const float* sf, int sf_stride,
               int words, int wpg, float* out) {
  for (int r = 0; r < nrows; ++r) out[r] = F(w + r * row_stride, xp, sf + r * sf_stride, words, wpg);
}

template <int BITS>
RowsFn pick(int width) {
#ifdef FLASHMOE_X86
  if (width == 16) return rows_avx512_any<BITS>;
  if (width == 8) return rows_each<row_avx2<BITS>>;
#endif
#ifdef FLASHMOE_NEON
  if (width == 4) return rows_each<row_neon<BITS>>;
#endif
  return rows_each<row_scalar<BITS>>;
}

Isa detect() {
  const char* force = std::getenv("FLASHMOE_NATIVE_ISA");  // for tests: "scalar", "avx2", ...
  Isa best{"scalar", 1};
#ifdef FLASHMOE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = {"avx2", 8};
  if (__builtin_cpu_supports("avx512f") && best.width == 8) best = {"avx512", 16};
#endif
#ifdef FLASHMOE_NEON
  best = {"neon", 4};
#endif
  if (force && std::strcmp(force, "scalar") == 0) return {"scalar", 1};
  if (force && std::strcmp(force, "avx2") == 0 && best.width >= 8) return {"avx2", 8};
  return best;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

int block_width(int words) {
  int w = best_isa().width;  // 16 -> 8 -> 1 on x86, 4 -> 1 on arm64
  while (w > 1 && words < w) w = (w == 16) ? 8 : 1;
  return w;
}

RowsFn rows_kernel(int bits, int width) {
  return bits == 2 ? pick<2>(width) : bits == 4 ? pick<4>(width) : pick<8>(width);
}

void permute_x(const float* x, float* xp, int in, int bits, int width) {
  const int vpw = 32 / bits;
  const int block = width * vpw;
  const int whole = (in / block) * block;
  float unit[32];  // 2^(-bits*k) for the AVX-512 kernel (exact powers of two), else 1
  for (int k = 0; k < vpw; ++k) unit[k] = width == 16 ? std::ldexp(1.f, -bits * k) : 1.f;
  for (int base = 0; base < whole; base += block)
    for (int j = 0; j < width; ++j)
      for (int k = 0; k < vpw; ++k)
        xp[base + k * width + j] = x[base + j * vpw + k] * unit[k];
  std::memcpy(xp + whole, x + whole, sizeof(float) * (in - whole));
}

}  // namespace flashmoe_native
