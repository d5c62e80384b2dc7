// Python bindings: the top-level module _flashmoe_native.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "gated_delta.h"
#include "kernels.h"
#include "mlx/version.h"
#include "primitive.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

#define FLASHMOE_STR2(x) #x
#define FLASHMOE_STR(x) FLASHMOE_STR2(x)

NB_MODULE(_flashmoe_native, m) {
  nb::module_::import_("mlx.core");  // registers mlx's array/stream types with nanobind
  m.doc() = "flashmoe's native CPU kernels: affine 2/4/8-bit dequantizing matvec and the Gated DeltaNet recurrence as MLX primitives";
  m.attr("mlx_version") =
      FLASHMOE_STR(MLX_VERSION_MAJOR) "." FLASHMOE_STR(MLX_VERSION_MINOR) "." FLASHMOE_STR(MLX_VERSION_PATCH);
  m.def("isa", [] { return std::string(flashmoe_native::best_isa().name); },
        "The instruction set the kernels use on this CPU (avx512, avx2, neon or scalar).");
  m.def("threads", [] { return flashmoe_native::ThreadPool::instance().size(); },
        "Threads the kernels split rows across (FLASHMOE_NATIVE_THREADS, else the core count).");
  m.def("dequant_matvec", &flashmoe_native::dequant_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a, "bits"_a,
        "group_size"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x (..., in) float32 @ dequantize(w).T -> (..., out) float32; w (out, in*bits/32) uint32.");
  m.def("gather_dequant_matvec", &flashmoe_native::gather_dequant_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "indices"_a, "bits"_a, "group_size"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x (..., in) or (..., K, in) float32 against experts indices (..., K) of w (E, out, words) "
        "-> (..., K, out) float32.");
  m.def("gated_delta_update", &flashmoe_native::gated_delta_update, "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "state"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "The Gated DeltaNet recurrence over T tokens, float32 (mx.fast.gated_delta_update's math): q, k "
        "(B, T, Hk, dk), v (B, T, Hv, dv), g, beta (B, T, Hv), state (B, Hv, dv, dk) -> [y (B, T, Hv, dv), state].");
  m.def("gated_delta_step", &flashmoe_native::gated_delta_step, "qkv"_a, "conv_state"_a, "conv_w"_a, "z"_a, "b"_a,
        "a"_a, "A_log"_a, "dt_bias"_a, "norm_w"_a, "state"_a, "key_heads"_a, "qk_eps"_a, "rms_eps"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "One decode token of a Gated DeltaNet layer after its in-projections, float32 (conv, silu, q/k norms, "
        "gates, the rule, gated RMSNorm) -> [out (B, Hv, dv), state, conv_state].");
}
