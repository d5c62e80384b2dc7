#include "gated_delta.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels.h"  // FLASHMOE_CLONES
#include "mlx/backend/cpu/encoder.h"
#include "primitive.h"  // shape_str, row_contiguous
#include "thread_pool.h"

namespace flashmoe_native {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

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

// q, k, v: token (b, t) at (b T + t) * token floats, heads within it at dk / dv apart; `token` 0:
// q/k/v's own (B, T, heads, dims) layouts (Hk dk and Hv dv floats a token).
void compute(const Dims& d, const float* q, const float* k, const float* v, const float* g, const float* beta,
             const float* state_in, float* y, float* state_out, int64_t token = 0) {
  const int64_t qk_token = token ? token : static_cast<int64_t>(d.Hk) * d.dk;
  const int64_t v_token = token ? token : static_cast<int64_t>(d.Hv) * d.dv;
  const int64_t rows = static_cast<int64_t>(d.B) * d.Hv * d.dv;  // units of work: state rows
  const int64_t row_floats = d.dk, head_rows = d.dv;
  const int ratio = d.Hv / d.Hk;
  auto body = [&](int64_t begin, int64_t end, const ThreadPool::Next&) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / head_rows, i = r % head_rows;  // (batch row, value head), row in the head
      const int64_t b = bh / d.Hv, h = bh % d.Hv, hk = h / ratio;
      float* s = state_out + r * row_floats;
      std::memcpy(s, state_in + r * row_floats, sizeof(float) * row_floats);
      const int64_t qk0 = b * d.T * qk_token + hk * d.dk;  // token 0 of key head hk
      const int64_t v0 = b * d.T * v_token + h * d.dv + i, gb0 = b * d.T * d.Hv + h;
      const int64_t y0 = (b * d.T * d.Hv + h) * d.dv + i;
      row_steps(s, d.dk, d.T, q + qk0, k + qk0, qk_token, v + v0, v_token, g + gb0, beta + gb0, d.Hv, y + y0,
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

struct StepDims {
  int B, W, C, Hk, Hv, dk, dv;
  float qk_eps, rms_eps;
};

float silu(float x) { return x / (1.f + std::exp(-x)); }

// x[0, n) *= scale / sqrt(mean(x^2) + eps)
void rms_scale(float* x, int n, float eps, float scale) {
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += x[i] * x[i];
  const float f = scale / std::sqrt(sum / n + eps);
  for (int i = 0; i < n; ++i) x[i] *= f;
}

// inputs: qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state (row-contiguous float32)
void step(const StepDims& d, const std::vector<mx::array>& in, float* out, float* state_out, float* conv_out) {
  const float *qkv = in[0].data<float>(), *past = in[1].data<float>(), *w = in[2].data<float>();
  const float *z = in[3].data<float>(), *bb = in[4].data<float>(), *aa = in[5].data<float>();
  const float *A_log = in[6].data<float>(), *dt_bias = in[7].data<float>(), *norm_w = in[8].data<float>();
  const int C = d.C, keep = d.W - 1, key_dim = d.Hk * d.dk;
  const float inv = 1.f / std::sqrt(static_cast<float>(d.dk)), eps = d.qk_eps * inv * inv;
  // per sequence: the conv's output (q | k | v after silu and the q/k norms), decay and beta
  std::vector<float> conv(static_cast<size_t>(d.B) * C), g(static_cast<size_t>(d.B) * d.Hv),
      beta(static_cast<size_t>(d.B) * d.Hv);
  for (int b = 0; b < d.B; ++b) {
    const float* window = past + static_cast<int64_t>(b) * keep * C;  // rows 0..W-2, then qkv[b]
    const float* x = qkv + static_cast<int64_t>(b) * C;
    float* c = conv.data() + static_cast<int64_t>(b) * C;
    for (int ch = 0; ch < C; ++ch) {
      float acc = 0.f;
      for (int j = 0; j < keep; ++j) acc += window[j * C + ch] * w[j * C + ch];
      c[ch] = silu(acc + x[ch] * w[keep * C + ch]);
    }
    float* next = conv_out + static_cast<int64_t>(b) * keep * C;  // the window shifted by one
    if (keep > 1) std::memcpy(next, window + C, sizeof(float) * (keep - 1) * C);
    if (keep > 0) std::memcpy(next + (keep - 1) * C, x, sizeof(float) * C);
    for (int h = 0; h < d.Hk; ++h) {
      rms_scale(c + h * d.dk, d.dk, eps, inv * inv);
      rms_scale(c + key_dim + h * d.dk, d.dk, eps, inv);
    }
    for (int h = 0; h < d.Hv; ++h) {
      const int i = b * d.Hv + h;
      const float u = aa[i] + dt_bias[h];
      const float softplus = std::max(u, 0.f) + std::log1p(std::exp(-std::abs(u)));  // logaddexp(u, 0)
      g[i] = std::exp(-std::exp(A_log[h]) * softplus);
      beta[i] = 1.f / (1.f + std::exp(-bb[i]));
    }
  }
  // the rule: q, k, v of sequence b at conv[b], as (B, T = 1, heads, dims) with C floats per token
  const Dims rule{d.B, 1, d.Hk, d.Hv, d.dk, d.dv};
  std::vector<float> y(static_cast<size_t>(d.B) * d.Hv * d.dv);
  compute(rule, conv.data(), conv.data() + key_dim, conv.data() + 2 * key_dim, g.data(), beta.data(),
          in[9].data<float>(), y.data(), state_out, C);
  // RMSNorm(y) norm_w silu(z), per value head
  for (int64_t r = 0; r < static_cast<int64_t>(d.B) * d.Hv; ++r) {
    float* yr = y.data() + r * d.dv;
    rms_scale(yr, d.dv, d.rms_eps, 1.f);
    for (int i = 0; i < d.dv; ++i) out[r * d.dv + i] = yr[i] * norm_w[i] * silu(z[r * d.dv + i]);
  }
}

// The stream's CPU encoder with the inputs registered and the outputs allocated and registered.
mx::cpu::CommandEncoder& encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs,
                                     std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) encoder.set_input_array(a);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
  }
  return encoder;
}

}  // namespace

void GatedDeltaStep::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = encoder_for(stream(), inputs, outputs);
  const auto &qkv = inputs[0], &conv_w = inputs[2], &z = inputs[3];
  StepDims d{qkv.shape(0), conv_w.shape(0), qkv.shape(1), key_heads_, z.shape(1), 0, z.shape(2), qk_eps_, rms_eps_};
  d.dk = (d.C - d.Hv * d.dv) / (2 * d.Hk);
  encoder.dispatch([d, inputs = std::vector<mx::array>(inputs), out = mx::array::unsafe_weak_copy(outputs[0]),
                    state = mx::array::unsafe_weak_copy(outputs[1]),
                    conv = mx::array::unsafe_weak_copy(outputs[2])]() mutable {
    for (auto& a : inputs) a = row_contiguous(a);
    step(d, inputs, out.data<float>(), state.data<float>(), conv.data<float>());
  });
}

void GatedDeltaStep::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("flashmoe native kernels run on the CPU only; use stream=mx.cpu");
}

bool GatedDeltaStep::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatedDeltaStep&>(other);
  return key_heads_ == o.key_heads_ && qk_eps_ == o.qk_eps_ && rms_eps_ == o.rms_eps_;
}

void GatedDeltaUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = encoder_for(stream(), inputs, outputs);
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
    if (arrays[i]->dtype() != mx::float32) fail(std::string("gated_delta_update: ") + names[i] + " must be float32 (cast it first)");
  }
  if (q.ndim() != 4 || k.shape() != q.shape())
    fail("gated_delta_update: q and k must both be (B, T, Hk, dk), got q " + shape_str(q) + " and k " + shape_str(k));
  const int B = q.shape(0), T = q.shape(1), Hk = q.shape(2), dk = q.shape(3);
  if (v.ndim() != 4 || v.shape(0) != B || v.shape(1) != T)
    fail("gated_delta_update: v must be (B, T, Hv, dv) with q's B = " + std::to_string(B) + " and T = " + std::to_string(T) +
         ", got " + shape_str(v));
  const int Hv = v.shape(2), dv = v.shape(3);
  if (Hk <= 0 || Hv % Hk != 0)
    fail("gated_delta_update: value heads " + std::to_string(Hv) + " must be a multiple of key heads " +
         std::to_string(Hk));
  const mx::Shape gates{B, T, Hv};
  if (g.shape() != gates || beta.shape() != gates)
    fail("gated_delta_update: g and beta must both be (B, T, Hv) = " + dims_str(gates) + ", got g " + shape_str(g) +
         " and beta " + shape_str(beta));
  const mx::Shape states{B, Hv, dv, dk};
  if (state.shape() != states)
    fail("gated_delta_update: state must be (B, Hv, dv, dk) = " + dims_str(states) + ", got " + shape_str(state));
  return mx::array::make_arrays({v.shape(), state.shape()}, {mx::float32, mx::float32},
                                std::make_shared<GatedDeltaUpdate>(mx::to_stream(s)), {q, k, v, g, beta, state});
}

std::vector<mx::array> gated_delta_step(const mx::array& qkv, const mx::array& conv_state, const mx::array& conv_w,
                                        const mx::array& z, const mx::array& b, const mx::array& a,
                                        const mx::array& A_log, const mx::array& dt_bias, const mx::array& norm_w,
                                        const mx::array& state, int key_heads, float qk_eps, float rms_eps,
                                        mx::StreamOrDevice s) {
  const char* names[] = {"qkv", "conv_state", "conv_w", "z", "b", "a", "A_log", "dt_bias", "norm_w", "state"};
  const mx::array* arrays[] = {&qkv, &conv_state, &conv_w, &z, &b, &a, &A_log, &dt_bias, &norm_w, &state};
  for (int i = 0; i < 10; ++i) {
    if (arrays[i]->dtype() != mx::float32)
      fail(std::string("gated_delta_step: ") + names[i] + " must be float32 (cast it first)");
  }
  if (state.ndim() != 4 || z.ndim() != 3 || qkv.ndim() != 2)
    fail("gated_delta_step: qkv must be (B, C), z (B, Hv, dv), state (B, Hv, dv, dk); got qkv " + shape_str(qkv) +
         ", z " + shape_str(z) + ", state " + shape_str(state));
  const int B = state.shape(0), Hv = state.shape(1), dv = state.shape(2), dk = state.shape(3);
  const int C = 2 * key_heads * dk + Hv * dv;
  if (key_heads <= 0 || Hv % key_heads != 0)
    fail("gated_delta_step: value heads " + std::to_string(Hv) + " must be a multiple of key heads " +
         std::to_string(key_heads));
  const int W = conv_w.ndim() == 2 ? conv_w.shape(0) : 0;
  const std::pair<const mx::array*, mx::Shape> expected[] = {
      {&qkv, {B, C}},     {&conv_state, {B, W - 1, C}}, {&conv_w, {W, C}},     {&z, {B, Hv, dv}},
      {&b, {B, Hv}},      {&a, {B, Hv}},                {&A_log, {Hv}},        {&dt_bias, {Hv}},
      {&norm_w, {dv}}};
  for (int i = 0; i < 9; ++i) {
    if (W < 1 || expected[i].first->shape() != expected[i].second)
      fail(std::string("gated_delta_step: ") + names[i] + " must be " + dims_str(expected[i].second) +
           " (B, Hv, dv, dk from state " + shape_str(state) + ", " + std::to_string(key_heads) +
           " key heads, W from conv_w), got " + shape_str(*expected[i].first));
  }
  return mx::array::make_arrays({z.shape(), state.shape(), conv_state.shape()}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<GatedDeltaStep>(mx::to_stream(s), key_heads, qk_eps, rms_eps),
                                {qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state});
}

}  // namespace flashmoe_native
