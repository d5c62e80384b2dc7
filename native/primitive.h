// The DequantMatvec primitive: y = x @ dequantize(w).T for affine 2/4/8-bit weights,
// plain (w: out x words) or over gathered experts (w: E x out x words, indices ... x K).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace flashmoe_native {

namespace mx = mlx::core;

// x (..., in) float32 -> (..., out) float32.
mx::array dequant_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int bits, int group_size, mx::StreamOrDevice s = {});

// x (..., in) shared by the K experts, or (..., K, in); indices (..., K) -> (..., K, out) float32.
mx::array gather_dequant_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                                const mx::array& biases, const mx::array& indices, int bits,
                                int group_size, mx::StreamOrDevice s = {});

// "(2, 3)": a shape as error messages give it.
std::string shape_str(const mx::array& a);

// a itself if row-contiguous, else a row-contiguous copy (inside a primitive's eval, not a graph node).
mx::array row_contiguous(const mx::array& a);

class DequantMatvec : public mx::UnaryPrimitive {
 public:
  DequantMatvec(mx::Stream stream, int bits, int group_size, bool gathered, bool shared_x)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size), gathered_(gathered),
        shared_x_(shared_x) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "FlashMoeDequantMatvec"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int bits_, group_size_;
  bool gathered_, shared_x_;
};

}  // namespace flashmoe_native
