// SIMD kernels for affine dequantizing dot products (2/4/8-bit, little-endian uint32 packing).
//
// The caller permutes x once per call (permute_x) so that the k-th value of each of the W
// words in a block lines up with W contiguous floats; a row then costs, per block of W
// words, one load of packed weights and for each k: shift, mask, convert, FMA.
#pragma once

#include <cstdint>

namespace flashmoe_native {

// For each of nrows (1..kMaxRows) rows w + r*row_stride: out[r] = sum over the row's words of
// scale(word) * dot(q(word), x(word)), with xp permuted for block width `width` (in words)
// and the row's scales as float at sf + r*sf_stride (each padded by 16 floats).
// wpg: words per quantization group. The bias term is added by the caller.
constexpr int kMaxRows = 4;
using RowsFn = void (*)(const uint32_t* w, int64_t row_stride, int nrows, const float* xp, const float* sf,
                        int sf_stride, int words, int wpg, float* out);

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
