// Metal prelude for the kernel bodies in *.inc, which are written once in a small
// subset common to Metal and CUDA. The part above "@body" goes into the kernel's
// header; the part below opens the kernel body. MLX's metal_kernel adds the thread
// attributes it finds named in the body (thread_index_in_simdgroup, ...).

#define FM_SHARED threadgroup
#define FM_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define FM_SIMD_SUM(v) simd_sum(v)
#define FM_FMA(a, b, c) fma(a, b, c)
#define FM_FLOAT4(a, b, c, d) float4(a, b, c, d)
#define FM_GMEM device                            // address space of kernel buffers
#define FM_LOAD4(p) (*((const device uint4*)(p)))  // 128-bit load of 4 words, 16-byte aligned
#define FM_AS_FLOAT(u) as_type<float>(u)
#define FM_AS_UINT(f) as_type<uint32_t>(f)
#define FM_SHUFFLE_XOR(v, m) simd_shuffle_xor(v, ushort(m))
#define FM_UNROLL
#define FM_EXP(v) metal::precise::exp(v)
#define FM_LOG(v) metal::precise::log(v)
#define FM_RSQRT(v) metal::precise::rsqrt(v)
#define FM_EXP2(v) metal::precise::exp2(v)
#define FM_COS(v) metal::precise::cos(v)
#define FM_SIN(v) metal::precise::sin(v)
// x's RMSNorm as mx.fast.rms_norm rounds it: w * T(x * factor), the product rounded to T, as float
#define FM_RMS_NORMED(T, x, w, factor) \
  static_cast<float>(static_cast<T>(static_cast<float>(w) * static_cast<float>(static_cast<T>(static_cast<float>(x) * (factor)))))

// @body
const int fm_lane = int(thread_index_in_simdgroup);        // lane in its SIMD group, 0..31
const int fm_warp = int(simdgroup_index_in_threadgroup);   // SIMD group in its threadgroup
const int fm_thread = int(thread_index_in_threadgroup);    // thread in its threadgroup
const int fm_group_x = int(threadgroup_position_in_grid.x);
const int fm_group_y = int(threadgroup_position_in_grid.y);
