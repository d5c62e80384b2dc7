// Just enough of the Metal Shading Language, as C++, to syntax-check a kernel body that
// kernels/prelude.metal opens: Metal cannot compile on Linux, g++ can read the same lines.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

struct float4 {
  float x, y, z, w;
  float4() = default;
  float4(float a, float b, float c, float d) : x(a), y(b), z(c), w(d) {}
};
struct uint3 {
  unsigned x, y, z;
};
using uint = unsigned;
#define threadgroup
#define device
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_sum(float v) { return v; }
using std::fma;
using std::min;
