// The GatedDeltaUpdate primitive: the Gated DeltaNet recurrence over T tokens, float32, on the CPU,
// what mx.fast.gated_delta_update computes (flashmoe's linear-attention layers on the native backend).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace flashmoe_native {

namespace mx = mlx::core;

// q, k (B, T, Hk, dk), v (B, T, Hv, dv), g and beta (B, T, Hv), state (B, Hv, dv, dk), all float32;
// Hv a multiple of Hk (value head h reads key head h / (Hv / Hk)). Per token t and value head h:
//   S = g S;  delta = beta (v - S k);  S += delta k^T;  y = S q
// -> [y (B, T, Hv, dv), the state after the last token (B, Hv, dv, dk)].
std::vector<mx::array> gated_delta_update(const mx::array& q, const mx::array& k, const mx::array& v,
                                          const mx::array& g, const mx::array& beta, const mx::array& state,
                                          mx::StreamOrDevice s = {});

class GatedDeltaUpdate : public mx::Primitive {
 public:
  explicit GatedDeltaUpdate(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashMoeGatedDeltaUpdate"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace flashmoe_native
