// Enough of CUDA, on the CPU, to *run* a kernel body that kernels/prelude.cu opens: every thread of
// a block is an OS thread, __syncthreads a std::barrier over the block, a warp shuffle a barrier
// over the warp's 32 threads around a shared slot array. Blocks run one after another, so
// __shared__ arrays are plain statics. Slow (thousands of threads for a tiny matrix) and strict:
// a body that leaned on lanes running in lockstep without a barrier would show it here.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct fm_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local fm_dim3 threadIdx, blockIdx;

struct float4 {
  float x, y, z, w;
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

// bfloat16 as cuda_bf16.h's conversions give it: the top half of a float32, rounded to nearest even.
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: its threads share the static

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
using std::max;
using std::min;

struct fm_warp_ctx {
  std::barrier<> bar{32};
  uint64_t slots[32];
};
struct fm_block_ctx {
  explicit fm_block_ctx(int threads) : bar(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<fm_warp_ctx>());
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<fm_warp_ctx>> warps;
};
inline thread_local fm_block_ctx* fm_block = nullptr;

inline void __syncthreads() { fm_block->bar.arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  fm_warp_ctx& w = *fm_block->warps[threadIdx.x / 32];
  const int lane = int(threadIdx.x) & 31;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  w.slots[lane] = bits;
  w.bar.arrive_and_wait();
  V out;
  bits = w.slots[lane ^ mask];
  std::memcpy(&out, &bits, sizeof(V));
  w.bar.arrive_and_wait();  // every lane has read before any writes again
  return out;
}

// Runs kernel() for every thread of a (gx, gy) grid of blocks of `threads` threads, block by block.
inline void fm_launch(const std::function<void()>& kernel, int gx, int gy, int threads) {
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      fm_block_ctx block(threads);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = {unsigned(t), 0, 0};
          blockIdx = {unsigned(bx), unsigned(by), 0};
          fm_block = &block;
          kernel();
          block.warps[t / 32]->bar.arrive_and_drop();  // a finished thread no longer holds others up
          block.bar.arrive_and_drop();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}
