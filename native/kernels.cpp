// Row kernels: a portable scalar path, AVX2+FMA and AVX-512 (x86, chosen at run time with
// __builtin_cpu_supports and per-function target attributes), NEON (Apple Silicon / arm64).
#include "kernels.h"

#include <algorithm>
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

// The bias term of one row: sum over groups of bias * (sum of x over the group).
inline float bias_dot(const float* bf, const float* xsum, int ngroups) {
  float acc = 0.f;
  for (int g = 0; g < ngroups; ++g) acc += bf[g] * xsum[g];
  return acc;
}

// Whether the AVX-512 kernel unpacks value k of a BITS-bit word by table permute (as q) rather
// than masked in place (as q * 2^(BITS*k)): 2 and 4 bits, the values in the word's low 16 bits
// (see tile_avx512); permute_x scales xp to match.
constexpr bool table_unpack(int bits, int k) { return (bits == 2 || bits == 4) && bits * k < 16; }

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

// AVX-512: a tile of R consecutive rows shares every load of x, so a value costs its unpacking
// (below) and one FMA per row; one accumulator per row per block, R independent chains.
//
// Prefetching: each line of w loaded goes with a prefetch (into L2) of the same line of the
// tile kAheadBytes further along the thread's path (the rows of this call, then `next`). The
// hardware prefetchers alone, facing R interleaved streams that jump at every tile (and
// across experts), left a core stalled on DRAM about as long as it computed. Measured on one
// Zen 4 core, 4096x4096 from DRAM: 4-bit 7.6 -> 12.1 GB/s, 8-bit 11.3 -> 18.7 GB/s (into L1
// instead: 12.1 -> 11.2 and 18.7 -> 14.5; the old 2048 bytes ahead within each row: 8.3 and
// 10.2). At least one tile ahead; 4 KB ahead for short rows (4 rows of 256 bytes).
constexpr int kAheadBytes = 4 << 10;

// AVX-512, unpacking the k-th value of each of 16 words into floats, one of two ways:
//  - masked in place: (v & (mask << BITS*k)) = q * 2^(BITS*k), converted unsigned (exact: at
//    most BITS significant bits), the 2^(-BITS*k) folded into xp (permute_x). AND + convert.
//  - table permute (2 and 4 bits): vpermps (_mm512_permutexvar_ps) reads only the low 4 bits
//    of each 32-bit index lane, so with the word shifted right to put the value's field in
//    bits 0-3 (no shift for the lowest nibble), permuting a 16-float table whose entry i is
//    the value those 4 bits hold gives q as a float with no mask and no convert (4 bits: entry
//    i = i; 2 bits: one shift serves two values, tables i & 3 and i >> 2). Exact: the tables
//    hold the integers 0..2^BITS-1, the same floats the convert makes, and q * x is the same
//    exact product as (q * 2^(BITS*k)) * (x * 2^(-BITS*k)), so results are bit-identical.
// Neither way alone is best on Zen 4: per 16 values AND + convert + FMA ran at 1.5 FMA-times
// and shift + permute + FMA at 1.67 (permute + FMA, the lowest nibble: 1.39), but the two
// load different FP pipes, so a mix is faster than either: 2 and 4 bits take the values in
// each word's low 16 bits by table and those in its high 16 bits in place. From L2 on one Zen 4 core (GB/s of weights, best of 6):
// 4-bit 128x4096 18.7 -> 19.4, 512x2048 18.3 -> 18.9, 2048x512 16.3 -> 16.6; 2-bit 10.2 ->
// 11.4 (all values by table: 4-bit 17.2, 2-bit 10.8; 8-bit stays in place: a 256-entry
// table does not fit a permute).

// The table for value k of a BITS-bit word: entry i = value of field k's bits that sit in
// bits 0-3 of i once the word is shifted right by 4 * (BITS*k / 4).
template <int BITS, int K>
__attribute__((target("avx512f"), always_inline)) inline __m512 unpack_table() {
  constexpr int sub = (BITS * K) % 4;  // the field's bit offset within the 4 index bits
  constexpr int m = (1 << BITS) - 1;
  return _mm512_setr_ps((0 >> sub) & m, (1 >> sub) & m, (2 >> sub) & m, (3 >> sub) & m, (4 >> sub) & m,
                        (5 >> sub) & m, (6 >> sub) & m, (7 >> sub) & m, (8 >> sub) & m, (9 >> sub) & m,
                        (10 >> sub) & m, (11 >> sub) & m, (12 >> sub) & m, (13 >> sub) & m, (14 >> sub) & m,
                        (15 >> sub) & m);
}

// The shifted word whose low 4 bits index value k's table (shared by the values of one nibble).
template <int BITS, int K>
__attribute__((target("avx512f"), always_inline)) inline __m512i unpack_index(__m512i v) {
  constexpr int shift = 4 * ((BITS * K) / 4);
  if constexpr (shift == 0) return v;
  else return _mm512_srli_epi32(v, shift);
}

// Value k of each of the 16 words in v as floats: q (table) or q * 2^(BITS*k) (masked).
template <int BITS, int K>
__attribute__((target("avx512f"), always_inline)) inline __m512 unpack(__m512i v) {
  if constexpr (table_unpack(BITS, K)) {
    return _mm512_permutexvar_ps(unpack_index<BITS, K>(v), unpack_table<BITS, K>());
  } else {
    const __m512i m = _mm512_set1_epi32(static_cast<int>(((1u << BITS) - 1) << (BITS * K)));
    return _mm512_cvtepu32_ps(_mm512_and_si512(v, m));
  }
}

// d[r] += unpack<K>(v[r]) * xk for values K.., one x load per K shared by the R rows.
template <int BITS, int R, int K = 0>
__attribute__((target("avx512f"), always_inline)) inline void dot_block(const __m512i* v, const float* xb,
                                                                      __m512* d) {
  if constexpr (K < 32 / BITS) {
    const __m512 xk = _mm512_loadu_ps(xb + 16 * K);
    for (int r = 0; r < R; ++r) d[r] = _mm512_fmadd_ps(unpack<BITS, K>(v[r]), xk, d[r]);
    dot_block<BITS, R, K + 1>(v, xb, d);
  }
}

// One tile: out[r] for rows w + r*words, r < R; pf[r]: the row to prefetch alongside (or null).
template <int BITS, int R>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void tile_avx512(
    const uint32_t* w, const uint32_t* const* pf, const float* sf, const float* bf, const float* xp,
    const float* xsum, int words, int group_shift, __m512i sidx, float* out) {
  constexpr int VPW = 32 / BITS;
  const int ngroups = words >> group_shift;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int nb = words / 16;
  for (int b = 0; b < nb; ++b) {
    __m512i v[R];
    for (int r = 0; r < R; ++r) {
      if (pf[r]) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + 16 * b), _MM_HINT_T1);
      v[r] = _mm512_loadu_si512(w + r * words + 16 * b);
    }
    const float* xb = xp + 16 * VPW * b;
    __m512 d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
    dot_block<BITS, R>(v, xb, d);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(sf + r * ngroups + ((16 * b) >> group_shift)));
      acc[r] = _mm512_fmadd_ps(d[r], s, acc[r]);
    }
  }
  // The bias terms, 16 groups at a time (masked past the last group).
  for (int g = 0; g < ngroups; g += 16) {
    const __mmask16 m = ngroups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ngroups - g)) - 1);
    const __m512 xs = _mm512_maskz_loadu_ps(m, xsum + g);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, bf + r * ngroups + g), xs, acc[r]);
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) +
             scalar_tail<BITS>(w + r * words, xp, sf + r * ngroups, nb * 16, words, 1 << group_shift);
}

// All nrows rows, a tile of 4 at a time; the per-call setup is paid once for all of them.
template <int BITS>
__attribute__((target("avx512f,avx2,fma"))) void rows_avx512(
    const uint32_t* w, int nrows, const uint32_t* next, const float* sf, const float* bf, const float* xp,
    const float* xsum, int words, int wpg, float* out) {
  // wpg is a power of two: shifts, not divisions (an integer division per block, or 16 per
  // tile, cost a quarter of the time on rows of 64 words).
  const int group_shift = __builtin_ctz(wpg);
  const int ngroups = words >> group_shift;
  // Lane j's group within a block of 16 words, j / wpg.
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sidx = _mm512_srl_epi32(lane, _mm_cvtsi32_si128(group_shift));
  // Rows ahead on the path: whole tiles, at least one.
  const int ahead = kMaxRows * std::max(1, kAheadBytes / (kMaxRows * words * 4));
  auto path_row = [&](int i) -> const uint32_t* {
    if (i < nrows) return w + static_cast<int64_t>(i) * words;
    return next ? next + static_cast<int64_t>(i - nrows) * words : nullptr;
  };
  int i = 0;
  for (; i + kMaxRows <= nrows; i += kMaxRows) {
    const uint32_t* pf[kMaxRows];
    for (int r = 0; r < kMaxRows; ++r) pf[r] = path_row(i + ahead + r);
    tile_avx512<BITS, kMaxRows>(w + static_cast<int64_t>(i) * words, pf, sf + i * ngroups, bf + i * ngroups, xp,
                                xsum, words, group_shift, sidx, out + i);
  }
  const uint32_t* const none[kMaxRows] = {};
  const uint32_t* wi = w + static_cast<int64_t>(i) * words;
  switch (nrows - i) {  // the last rows of a matrix (out_dim not a multiple of 4)
    case 3: return tile_avx512<BITS, 3>(wi, none, sf + i * ngroups, bf + i * ngroups, xp, xsum, words, group_shift, sidx, out + i);
    case 2: return tile_avx512<BITS, 2>(wi, none, sf + i * ngroups, bf + i * ngroups, xp, xsum, words, group_shift, sidx, out + i);
    case 1: return tile_avx512<BITS, 1>(wi, none, sf + i * ngroups, bf + i * ngroups, xp, xsum, words, group_shift, sidx, out + i);
    default: return;
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
void rows_each(const uint32_t* w, int nrows, const uint32_t* /*next*/, const float* sf, const float* bf,
               const float* xp, const float* xsum, int words, int wpg, float* out) {
  const int ngroups = words / wpg;
  for (int r = 0; r < nrows; ++r)
    out[r] = F(w + static_cast<int64_t>(r) * words, xp, sf + r * ngroups, words, wpg) +
             bias_dot(bf + r * ngroups, xsum, ngroups);
}

template <int BITS>
RowsFn pick(int width) {
#ifdef FLASHMOE_X86
  if (width == 16) return rows_avx512<BITS>;
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
  // 2^(-bits*k) for the AVX-512 kernel's values masked in place (exact powers of two), else 1.
  float unit[32];
  for (int k = 0; k < vpw; ++k) unit[k] = width == 16 && !table_unpack(bits, k) ? std::ldexp(1.f, -bits * k) : 1.f;
  for (int base = 0; base < whole; base += block)
    for (int j = 0; j < width; ++j)
      for (int k = 0; k < vpw; ++k)
        xp[base + k * width + j] = x[base + j * vpw + k] * unit[k];
  std::memcpy(xp + whole, x + whole, sizeof(float) * (in - whole));
}

}  // namespace flashmoe_native
