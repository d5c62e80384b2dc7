// SIMD kernels for affine dequantizing dot products (2/4/8-bit, little-endian uint32 packing).
//
// The caller permutes x once per call (permute_x) so that the k-th value of each of the W
// words in a block lines up with W contiguous floats; a row then costs, per block of W
// words, one load of packed weights and for each k: shift, mask, convert, FMA.
#pragma once

#include <cstdint>

// Hot loops, cloned for AVX-512/AVX2 and picked at load time (GCC/Clang on x86 Linux).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FLASHMOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FLASHMOE_CLONES
#endif

namespace flashmoe_native {

// For each of nrows consecutive rows r of one matrix (row r at w + r*words):
//   out[r] = sum over the row's words of scale(word) * dot(q(word), x(word))
//          + sum over groups g of bias[r][g] * xsum[g]
// with xp permuted for block width `width` (in words) and xsum the per-group sums of x.
// sf, bf: the rows' scales and biases as float, rows ngroups = words / wpg apart, sf readable
// 16 floats past its last row (the AVX-512 kernel loads 16 scales from any group).
// wpg: words per quantization group, a power of two (group sizes 32/64/128, 2/4/8 bits).
// next: where this thread's reading goes on after these rows (rows of `words` from there), or
// null: the AVX-512 kernel prefetches a few KB ahead along that path.
// kMaxRows: rows per tile (the AVX-512 kernel computes a tile per pass over x); the caller's
// unit of work is a tile too.
constexpr int kMaxRows = 4;
using RowsFn = void (*)(const uint32_t* w, int nrows, const uint32_t* next, const float* sf, const float* bf,
                        const float* xp, const float* xsum, int words, int wpg, float* out);

struct Isa {
  const char* name;  // "avx512", "avx2", "neon", "scalar"
  int width;         // block width in words the kernel expects x to be permuted for
};

// The best instruction set this CPU supports (decided once, at run time).
Isa best_isa();

// The widest block width usable for a row of `words` words, and its kernel for `bits`
// (AVX-512 computes up to kMaxRows rows in one pass over x; the others one row at a time).
int block_width(int words);
RowsFn rows_kernel(int bits, int width);

// xp[blk*W*vpw + k*W + j] = x[blk*W*vpw + j*vpw + k] for whole blocks (times 2^(-bits*k) for the
// AVX-512 kernel, which leaves values in place), identity for the tail.
void permute_x(const float* x, float* xp, int in, int bits, int width);

}  // namespace flashmoe_native
