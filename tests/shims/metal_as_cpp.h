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

// Added for the 128-bit loads, bit casts, shuffles and math of the newer bodies.
#include <cstring>
struct uint4 {
  unsigned x, y, z, w;
};
using ushort = unsigned short;
template <typename To, typename From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
inline float simd_shuffle_xor(float v, ushort) { return v; }
inline float simd_sum_(float v) { return v; }
namespace metal {
namespace precise {
inline float exp(float v) { return std::exp(v); }
inline float log(float v) { return std::log(v); }
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline float exp2(float v) { return std::exp2(v); }
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
}  // namespace precise
}  // namespace metal
using std::fabs;
using std::max;
