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

// One decode token of a Gated DeltaNet layer after its in-projections, float32 (flashmoe's
// kernels.gated_delta.reference, the GPU's gated_delta_step): qkv (B, C) with C = 2 Hk dk + Hv dv,
// conv_state (B, W-1, C), conv_w (W, C), z (B, Hv, dv), b and a (B, Hv), A_log and dt_bias (Hv,),
// norm_w (dv,), state (B, Hv, dv, dk): the depthwise conv and silu; q and k through an RMSNorm with
// eps qk_eps / dk, then q times 1/dk and k times 1/sqrt(dk) (unit length with qk_eps added to sum(x^2),
// q also carrying the 1/sqrt(dk) readout scale); decay exp(-exp(A_log) softplus(a + dt_bias)), beta
// sigmoid(b); the rule; then RMSNorm(y) (eps rms_eps) norm_w silu(z)
// -> [out (B, Hv, dv), state, conv_state (B, W-1, C)].
std::vector<mx::array> gated_delta_step(const mx::array& qkv, const mx::array& conv_state, const mx::array& conv_w,
                                        const mx::array& z, const mx::array& b, const mx::array& a,
                                        const mx::array& A_log, const mx::array& dt_bias, const mx::array& norm_w,
                                        const mx::array& state, int key_heads, float qk_eps, float rms_eps,
                                        mx::StreamOrDevice s = {});

class GatedDeltaStep : public mx::Primitive {
 public:
  GatedDeltaStep(mx::Stream stream, int key_heads, float qk_eps, float rms_eps)
      : mx::Primitive(stream), key_heads_(key_heads), qk_eps_(qk_eps), rms_eps_(rms_eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashMoeGatedDeltaStep"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int key_heads_;
  float qk_eps_, rms_eps_;
};

class GatedDeltaUpdate : public mx::Primitive {
 public:
  explicit GatedDeltaUpdate(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashMoeGatedDeltaUpdate"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace flashmoe_native
