// CUDA prelude for the kernel bodies in *.inc, which are written once in a small
// subset common to Metal and CUDA. The part above "@body" goes into the kernel's
// header; the part below opens the kernel body. A warp plays a SIMD group.

__device__ __forceinline__ float fm_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

#define FM_SHARED __shared__
#define FM_BARRIER() __syncthreads()
#define FM_SIMD_SUM(v) fm_warp_sum(v)
#define FM_FMA(a, b, c) fmaf(a, b, c)
#define FM_FLOAT4(a, b, c, d) make_float4(a, b, c, d)
#define FM_GMEM                                   // address space of kernel buffers (Metal: device)
#define FM_LOAD4(p) (*reinterpret_cast<const uint4*>(p))  // 128-bit load of 4 words, 16-byte aligned
#define FM_AS_FLOAT(u) __uint_as_float(u)
#define FM_AS_UINT(f) __float_as_uint(f)
#define FM_SHUFFLE_XOR(v, m) __shfl_xor_sync(0xffffffffu, v, m)
#define FM_UNROLL _Pragma("unroll")
#define FM_EXP(v) expf(v)
#define FM_LOG(v) logf(v)
#define FM_RSQRT(v) rsqrtf(v)
#define FM_EXP2(v) exp2f(v)
#define FM_COS(v) cosf(v)
#define FM_SIN(v) sinf(v)
// x's RMSNorm as mx.fast.rms_norm rounds it: w * T(x * factor), the product rounded to T, as float
#define FM_RMS_NORMED(T, x, w, factor) \
  static_cast<float>(static_cast<T>(static_cast<float>(w) * static_cast<float>(static_cast<T>(static_cast<float>(x) * (factor)))))

// @body
const int fm_lane = int(threadIdx.x) & 31;   // lane in its warp, 0..31
const int fm_warp = int(threadIdx.x) >> 5;   // warp in its block
const int fm_thread = int(threadIdx.x);      // thread in its block
const int fm_group_x = int(blockIdx.x);
const int fm_group_y = int(blockIdx.y);
