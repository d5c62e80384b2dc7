#include "gated_delta.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "kernels.h"  // FLASHMOE_CLONES
#include "mlx/backend/cpu/encoder.h"
#include "primitive.h"  // shape_str, row_contiguous
#include "thread_pool.h"

namespace flashmoe_native {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("gated_delta_update: " + what); }

std::string dims_str(const mx::Shape& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + ")";
}

// One row i of a value head's state, s = S[i, :] (dk floats), through T tokens; strides in floats
// between tokens: q/k `qk_step`, v `v_step`, g/beta `gb_step`, y `y_step`. Every row is independent
// of the others (the k.S, the update and the q.S of row i read row i only), so the row stays in L1
// across the tokens and the state is read and written once per call.
FLASHMOE_CLONES void row_steps(float* s, int dk, int T, const float* q, const float* k, int64_t qk_step,
                               const float* v, int64_t v_step, const float* g, const float* beta,
                               int64_t gb_step, float* y, int64_t y_step) {
  for (int t = 0; t < T; ++t) {
    const float* qt = q + t * qk_step;
    const float* kt = k + t * qk_step;
    const float decay = g[t * gb_step];
    float kv = 0.f;
#pragma omp simd reduction(+ : kv)
    for (int j = 0; j < dk; ++j) {
      s[j] *= decay;
      kv += s[j] * kt[j];
    }
    const float delta = (v[t * v_step] - kv) * beta[t * gb_step];
    float out = 0.f;
#pragma omp simd reduction(+ : out)
    for (int j = 0; j < dk; ++j) {
      s[j] += kt[j] * delta;
      out += s[j] * qt[j];
    }
    y[t * y_step] = out;
  }
}

struct Dims {
  int B, T, Hk, Hv, dk, dv;
};

void compute(const Dims& d, const float* q, const float* k, const float* v, const float* g, const float* beta,
             const float* state_in, float* y, float* state_out) {
  const int64_t rows = static_cast<int64_t>(d.B) * d.Hv * d.dv;  // units of work: state rows
  const int64_t row_floats = d.dk, head_rows = d.dv;
  const int ratio = d.Hv / d.Hk;
  auto body = [&](int64_t begin, int64_t end, const ThreadPool::Next&) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / head_rows, i = r % head_rows;  // (batch row, value head), row in the head
      const int64_t b = bh / d.Hv, h = bh % d.Hv, hk = h / ratio;
      float* s = state_out + r * row_floats;
      std::memcpy(s, state_in + r * row_floats, sizeof(float) * row_floats);
      const int64_t qk0 = (b * d.T * d.Hk + hk) * d.dk;  // token 0 of key head hk
      const int64_t v0 = (b * d.T * d.Hv + h) * d.dv + i, gb0 = b * d.T * d.Hv + h;
      row_steps(s, d.dk, d.T, q + qk0, k + qk0, static_cast<int64_t>(d.Hk) * d.dk, v + v0,
                static_cast<int64_t>(d.Hv) * d.dv, g + gb0, beta + gb0, d.Hv, y + v0,
                static_cast<int64_t>(d.Hv) * d.dv);
    }
  };
  // Chunks of whole heads' rows (64 KB of state for dk = dv = 128): the state is the bytes moved.
  auto& pool = ThreadPool::instance();
  const int64_t grain = std::max<int64_t>(head_rows, (64 << 10) / (sizeof(float) * row_floats));
  if (rows <= grain) {
    body(0, rows, [rows] { return ThreadPool::Range{rows, rows}; });
  } else {
    pool.parallel_for(rows, grain, body);
  }
}

}  // namespace

void GatedDeltaUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
  }
  const auto& v = inputs[2];
  Dims d{v.shape(0), v.shape(1), inputs[0].shape(2), v.shape(2), inputs[0].shape(3), v.shape(3)};
  encoder.dispatch([d, inputs = std::vector<mx::array>(inputs), y = mx::array::unsafe_weak_copy(outputs[0]),
                    state = mx::array::unsafe_weak_copy(outputs[1])]() mutable {
    for (auto& a : inputs) a = row_contiguous(a);
    compute(d, inputs[0].data<float>(), inputs[1].data<float>(), inputs[2].data<float>(), inputs[3].data<float>(),
            inputs[4].data<float>(), inputs[5].data<float>(), y.data<float>(), state.data<float>());
  });
}

void GatedDeltaUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("flashmoe native kernels run on the CPU only; use stream=mx.cpu");
}

std::vector<mx::array> gated_delta_update(const mx::array& q, const mx::array& k, const mx::array& v,
                                          const mx::array& g, const mx::array& beta, const mx::array& state,
                                          mx::StreamOrDevice s) {
  const char* names[] = {"q", "k", "v", "g", "beta", "state"};
  const mx::array* arrays[] = {&q, &k, &v, &g, &beta, &state};
  for (int i = 0; i < 6; ++i) {
    if (arrays[i]->dtype() != mx::float32) fail(std::string(names[i]) + " must be float32 (cast it first)");
  }
  if (q.ndim() != 4 || k.shape() != q.shape())
    fail("q and k must both be (B, T, Hk, dk), got q " + shape_str(q) + " and k " + shape_str(k));
  const int B = q.shape(0), T = q.shape(1), Hk = q.shape(2), dk = q.shape(3);
  if (v.ndim() != 4 || v.shape(0) != B || v.shape(1) != T)
    fail("v must be (B, T, Hv, dv) with q's B = " + std::to_string(B) + " and T = " + std::to_string(T) +
         ", got " + shape_str(v));
  const int Hv = v.shape(2), dv = v.shape(3);
  if (Hk <= 0 || Hv % Hk != 0)
    fail("value heads " + std::to_string(Hv) + " must be a multiple of key heads " + std::to_string(Hk));
  const mx::Shape gates{B, T, Hv};
  if (g.shape() != gates || beta.shape() != gates)
    fail("g and beta must both be (B, T, Hv) = " + dims_str(gates) + ", got g " + shape_str(g) +
         " and beta " + shape_str(beta));
  const mx::Shape states{B, Hv, dv, dk};
  if (state.shape() != states)
    fail("state must be (B, Hv, dv, dk) = " + dims_str(states) + ", got " + shape_str(state));
  return mx::array::make_arrays({v.shape(), state.shape()}, {mx::float32, mx::float32},
                                std::make_shared<GatedDeltaUpdate>(mx::to_stream(s)), {q, k, v, g, beta, state});
}

}  // namespace flashmoe_native
