#include "primitive.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "thread_pool.h"

namespace flashmoe_native {

std::string shape_str(const mx::array& a) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// Common checks; returns the input dimension.
int check_common(const char* fn, const mx::array& x, const mx::array& w, const mx::array& scales,
                 const mx::array& biases, int bits, int group_size, int w_ndim) {
  std::ostringstream err;
  err << fn << ": ";
  if (bits != 2 && bits != 4 && bits != 8) fail(err.str() + "bits must be 2, 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail(err.str() + "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  if (x.dtype() != mx::float32) fail(err.str() + "x must be float32 (cast it first)");
  if (x.ndim() < 1) fail(err.str() + "x must have at least one dimension");
  if (w.dtype() != mx::uint32) fail(err.str() + "packed weights w must be uint32");
  if (w.ndim() != w_ndim)
    fail(err.str() + "w must have " + std::to_string(w_ndim) + " dimensions, got " + shape_str(w));
  for (const mx::array* a : {&scales, &biases}) {
    if (a->dtype() != mx::float32 && a->dtype() != mx::bfloat16 && a->dtype() != mx::float16)
      fail(err.str() + "scales and biases must be float32, bfloat16 or float16");
  }
  const int in = x.shape(-1);
  if (in <= 0) fail(err.str() + "x has no inputs (last dim 0)");
  if (in % group_size != 0)
    fail(err.str() + "x has " + std::to_string(in) + " inputs, not a multiple of group_size " + std::to_string(group_size));
  if (static_cast<int64_t>(w.shape(-1)) * 32 != static_cast<int64_t>(in) * bits)
    fail(err.str() + "w " + shape_str(w) + " does not hold " + std::to_string(in) + " " + std::to_string(bits) +
         "-bit values per row (x has " + std::to_string(in) + " inputs)");
  auto expect = w.shape();
  expect.back() = in / group_size;
  if (scales.shape() != expect || biases.shape() != expect)
    fail(err.str() + "scales " + shape_str(scales) + " and biases " + shape_str(biases) +
         " must both be w.shape[:-1] + (in / group_size,) = w " + shape_str(w) + " with last dim " +
         std::to_string(in / group_size));
  return in;
}

FLASHMOE_CLONES void bf16_to_f32(const uint16_t* p, int n, float* dst) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(p[i]) << 16;
}

// Prefetches (into L2) the cache lines of [p, p + bytes).
void prefetch_lines(const void* p, int64_t bytes) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
  for (uintptr_t a = begin & ~uintptr_t{63}; a < end; a += 64) __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2);
}

// Scales or biases: a raw view of one input, read as float a tile at a time.
struct FloatRows {
  const char* data;
  mx::Dtype dtype;
  int64_t itemsize;
  explicit FloatRows(const mx::array& a)
      : data(static_cast<const char*>(a.data<void>())), dtype(a.dtype()), itemsize(a.itemsize()) {}

  // dst[0, n) = elements [offset, offset + n) as float.
  void load(int64_t offset, int n, float* dst) const {
    const char* p = data + offset * itemsize;
    switch (dtype) {
      case mx::float32: std::memcpy(dst, p, sizeof(float) * n); break;
      case mx::bfloat16: bf16_to_f32(reinterpret_cast<const uint16_t*>(p), n, dst); break;
      default: {
        const mx::float16_t* h = reinterpret_cast<const mx::float16_t*>(p);
        for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(h[i]);
      }
    }
  }

  // Prefetches (into L2) the cache lines of elements [offset, offset + n).
  void prefetch(int64_t offset, int n) const { prefetch_lines(data + offset * itemsize, n * itemsize); }
};

}  // namespace

// a itself if row-contiguous, else a row-contiguous copy of it. The ops take their inputs as they
// are rather than through mx::contiguous (and int32 ids without astype): each such graph node
// cost about 1-2 us per call at evaluation even when it copied nothing, 4-5 per call, a fixed
// cost of every matvec of a decode step (a gathered call with tiny experts, interleaved
// medians: 0.012 -> 0.005 ms).
mx::array row_contiguous(const mx::array& a) {
  if (a.flags().row_contiguous) return a;
  mx::array c(a.shape(), a.dtype(), nullptr, {});
  c.set_data(mx::allocator::malloc(c.nbytes()));
  const int nd = a.ndim();
  const int64_t isz = a.itemsize(), n = a.size();
  const int64_t inner = nd ? a.shape(-1) : 1, inner_stride = nd ? a.strides(nd - 1) : 1;
  const char* src = static_cast<const char*>(a.data<void>());
  char* dst = c.data<char>();
  std::vector<int64_t> pos(std::max(nd - 1, 0), 0);  // index over the outer dims
  for (int64_t done = 0; done < n; done += inner) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; ++d) off += pos[d] * a.strides(d);
    const char* s = src + off * isz;
    if (inner_stride == 1) {
      std::memcpy(dst + done * isz, s, inner * isz);
    } else {
      for (int64_t j = 0; j < inner; ++j) std::memcpy(dst + (done + j) * isz, s + j * inner_stride * isz, isz);
    }
    for (int d = nd - 2; d >= 0 && ++pos[d] == a.shape(d); --d) pos[d] = 0;
  }
  return c;
}

namespace {

struct Problem {
  int bits, group_size, in, out_dim, experts;
  bool gathered, shared_x;
};

void compute(const Problem& P, const mx::array& x, const mx::array& w, const mx::array& scales,
             const mx::array& biases, const mx::array* indices, mx::array& out) {
  const int in = P.in, words = in * P.bits / 32, ngroups = in / P.group_size;
  const int wpg = P.group_size * P.bits / 32;
  const int width = block_width(words);
  const RowsFn rows = rows_kernel(P.bits, width);
  const int64_t xrows = x.size() / in;

  // Per call: x permuted for the kernel's block width, and the sum of x over each group.
  std::vector<float> xp(xrows * in), xsum(xrows * ngroups);
  const float* xr = x.data<float>();
  for (int64_t r = 0; r < xrows; ++r) {
    permute_x(xr + r * in, xp.data() + r * in, in, P.bits, width);
    for (int g = 0; g < ngroups; ++g) {
      float s = 0.f;
      for (int j = 0; j < P.group_size; ++j) s += xr[r * in + g * P.group_size + j];
      xsum[r * ngroups + g] = s;
    }
  }

  const uint32_t* wp = w.data<uint32_t>();
  float* y = out.data<float>();
  const uint32_t* idx = indices ? indices->data<uint32_t>() : nullptr;  // uint32 or int32 (read as uint32)
  const int K = indices ? indices->shape(-1) : 1;
  // Units of work: up to kMaxRows consecutive output rows of one matrix (plain: for every x
  // row; gathered: of one (token, expert) pair), so the kernel shares x loads across them.
  const int64_t pairs = indices ? static_cast<int64_t>(indices->size()) : 1;
  const int64_t tiles = (P.out_dim + kMaxRows - 1) / kMaxRows;  // row tiles per matrix
  const int64_t units = pairs * tiles;
  const FloatRows scale_rows(scales), bias_rows(biases);

  // Unit u is tile t = u % tiles of pair p = u / tiles. Its first weight row in w viewed as
  // (experts * out_dim, words), or -1 for an out-of-range expert:
  auto first_row = [&](int64_t p, int64_t t) -> int64_t {
    if (!idx) return t * kMaxRows;
    const uint32_t e = idx[p];
    return e < static_cast<uint32_t>(P.experts) ? static_cast<int64_t>(e) * P.out_dim + t * kMaxRows : -1;
  };
  // A chunk is walked in runs: consecutive units of one pair, about kRunBytes of weights (at
  // least one unit), each one kernel call, so that the per-call costs (scale conversion,
  // kernel setup) are shared by several tiles of short rows. While a run is computed, the
  // scales and biases of the next are prefetched here and its weights by the kernel.
  constexpr int64_t kRunBytes = 8 << 10;
  const int64_t run_units = std::max<int64_t>(1, kRunBytes / (static_cast<int64_t>(kMaxRows) * words * 4));
  struct Run {
    int64_t p, t, row;  // pair, first tile, first weight row (-1: out-of-range expert)
    int o, n;           // first output row within the pair, rows
  };
  auto run_at = [&](int64_t u, int64_t end) {
    Run r;
    r.p = u / tiles, r.t = u % tiles, r.row = first_row(r.p, r.t);
    r.o = static_cast<int>(r.t) * kMaxRows;
    const int64_t len = std::min({end - u, tiles - r.t, run_units});
    r.n = static_cast<int>(std::min<int64_t>(P.out_dim - r.o, len * kMaxRows));
    return r;
  };
  auto first_run_of = [&](ThreadPool::Range r) {
    return r.begin < r.end ? run_at(r.begin, r.end) : Run{0, 0, -1, 0, 0};
  };

  auto body = [&](int64_t begin, int64_t end, const ThreadPool::Next& next_chunk) {
    // Scales and biases of the current rows as float, rows ngroups apart (the kernel may read
    // 16 floats past the last scale); kept per thread across calls.
    thread_local std::vector<float> sf, bf;
    sf.resize(run_units * kMaxRows * ngroups + 16);
    bf.resize(run_units * kMaxRows * ngroups);
    Run cur = run_at(begin, end);
    // The first run's weights have had no prefetch along the way: ask for them all at once.
    if (cur.row >= 0) prefetch_lines(wp + cur.row * words, static_cast<int64_t>(cur.n) * words * 4);
    for (int64_t u = begin; u < end;) {
      const int64_t u_next = u + (cur.n + kMaxRows - 1) / kMaxRows;
      const Run nxt = u_next < end ? run_at(u_next, end) : Run{0, 0, -1, 0, 0};
      // Where this thread reads next: the next run, or in the chunk's last run, the first run
      // of the chunk it claims next (thread_pool.cpp: prefetched, it does not start cold).
      const Run ahead = u_next < end ? nxt : first_run_of(next_chunk());
      if (ahead.row >= 0) {
        scale_rows.prefetch(ahead.row * ngroups, ahead.n * ngroups);
        bias_rows.prefetch(ahead.row * ngroups, ahead.n * ngroups);
      }
      if (cur.row < 0) {  // out-of-range expert: make it visible
        std::fill_n(y + cur.p * P.out_dim + cur.o, cur.n, std::numeric_limits<float>::quiet_NaN());
      } else {
        scale_rows.load(cur.row * ngroups, cur.n * ngroups, sf.data());
        bias_rows.load(cur.row * ngroups, cur.n * ngroups, bf.data());
        const uint32_t* next = ahead.row >= 0 ? wp + ahead.row * words : nullptr;
        const int64_t r0 = idx ? (P.shared_x ? cur.p / K : cur.p) : 0;
        const int64_t r1 = idx ? r0 + 1 : xrows;
        for (int64_t r = r0; r < r1; ++r) {  // further x rows reuse the weights from cache
          rows(wp + cur.row * words, cur.n, r == r0 ? next : nullptr, sf.data(), bf.data(), xp.data() + r * in,
               xsum.data() + r * ngroups, words, wpg, y + (idx ? cur.p : r) * P.out_dim + cur.o);
        }
      }
      u = u_next;
      cur = nxt;
    }
  };
  // Chunks of about kChunkBytes of weights: small enough to balance threads that a shared
  // machine slows unevenly, large enough that claiming one costs nothing by comparison.
  constexpr int64_t kChunkBytes = 64 << 10;
  const int64_t unit_bytes = static_cast<int64_t>(kMaxRows) * words * 4 * (idx ? 1 : xrows);
  auto& pool = ThreadPool::instance();
  if (units * unit_bytes < kChunkBytes) {
    body(0, units, [units] { return ThreadPool::Range{units, units}; });
  } else {
    const int64_t grain = std::min((kChunkBytes + unit_bytes - 1) / unit_bytes, std::max<int64_t>(1, units / (4 * pool.size())));
    pool.parallel_for(units, grain, body);
  }
}

}  // namespace

void DequantMatvec::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  encoder.set_output_array(out);
  const auto& w = inputs[1];
  Problem P{bits_, group_size_, inputs[0].shape(-1), w.shape(-2), gathered_ ? w.shape(0) : 1, gathered_,
            shared_x_};
  encoder.dispatch([P, inputs = std::vector<mx::array>(inputs), out = mx::array::unsafe_weak_copy(out)]() mutable {
    // Inputs in any layout (the ops add no copy nodes): a strided one is copied here, once.
    for (auto& a : inputs) a = row_contiguous(a);
    compute(P, inputs[0], inputs[1], inputs[2], inputs[3], P.gathered ? &inputs[4] : nullptr, out);
  });
}

void DequantMatvec::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "flashmoe native kernels run on the CPU only; use stream=mx.cpu (or flashmoe's metal/cuda backends)");
}

bool DequantMatvec::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DequantMatvec&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && gathered_ == o.gathered_ && shared_x_ == o.shared_x_;
}

mx::array dequant_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int bits, int group_size, mx::StreamOrDevice s) {
  check_common("dequant_matvec", x, w, scales, biases, bits, group_size, 2);
  auto stream = mx::to_stream(s);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<DequantMatvec>(stream, bits, group_size, false, false),
                   {x, w, scales, biases});
}

mx::array gather_dequant_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                                const mx::array& biases, const mx::array& indices, int bits, int group_size,
                                mx::StreamOrDevice s) {
  check_common("gather_dequant_matvec", x, w, scales, biases, bits, group_size, 3);
  if (indices.dtype() != mx::uint32 && indices.dtype() != mx::int32)
    fail("gather_dequant_matvec: indices must be uint32 or int32 expert ids");
  if (indices.ndim() < 1) fail("gather_dequant_matvec: indices must be (..., K)");
  auto lead = x.shape();
  lead.pop_back();
  const bool shared = x.ndim() == indices.ndim() &&
                      std::equal(lead.begin(), lead.end(), indices.shape().begin(), indices.shape().end() - 1);
  const bool per_expert = !shared && lead == indices.shape();
  if (!shared && !per_expert)
    fail("gather_dequant_matvec: x " + shape_str(x) + " must be indices.shape[:-1] + (in,) or indices.shape + (in,) for indices " +
         shape_str(indices));
  auto stream = mx::to_stream(s);
  auto shape = indices.shape();
  shape.push_back(w.shape(1));
  // int32 ids are read as uint32 (what astype would give: a negative id wraps out of range).
  return mx::array(shape, mx::float32, std::make_shared<DequantMatvec>(stream, bits, group_size, true, shared),
                   {x, w, scales, biases, indices});
}

}  // namespace flashmoe_native
