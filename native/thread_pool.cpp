#include "thread_pool.h"

#include <algorithm>
#include <cstdlib>

namespace flashmoe_native {

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool([] {
    if (const char* env = std::getenv("FLASHMOE_NATIVE_THREADS")) return std::max(1, std::atoi(env));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }());
  return pool;
}

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back(&ThreadPool::worker, this);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks(uint32_t gen) {
  // A claim succeeds only while the counter still carries this job's generation, so a worker
  // that wakes after the job ended (or during the next one) claims nothing of it. Until its
  // claimed chunk is done the job cannot end, so fn_, n_ and grain_ stay valid meanwhile.
  uint64_t c = next_.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<uint32_t>(c >> 32) != gen || static_cast<uint32_t>(c) >= chunks_.load(std::memory_order_relaxed)) return;
    if (!next_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
    const int64_t begin = static_cast<int64_t>(static_cast<uint32_t>(c)) * grain_;
    (*fn_)(begin, std::min(n_, begin + grain_));
    done_.fetch_add(1, std::memory_order_acq_rel);
    c = next_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker() {
  uint32_t seen = 0;
  for (;;) {
    uint32_t gen;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = gen = generation_;
    }
    run_chunks(gen);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  if (size() <= 1 || chunks <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call(call_mutex_);
  uint32_t gen;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    gen = ++generation_;
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    chunks_.store(static_cast<uint32_t>(chunks), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    next_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);  // opens the job
  }
  start_cv_.notify_all();
  run_chunks(gen);
  // The last chunks may still be running on workers; they are short, so yield until done.
  while (done_.load(std::memory_order_acquire) != static_cast<uint32_t>(chunks)) std::this_thread::yield();
}

}  // namespace flashmoe_native
