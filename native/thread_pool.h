// A small persistent thread pool: parallel_for splits [0, n) into one contiguous range per
// thread (the calling thread takes the first). Threads are started once, never per call.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace flashmoe_native {

class ThreadPool {
 public:
  static ThreadPool& instance();  // sized by FLASHMOE_NATIVE_THREADS, else the core count
  explicit ThreadPool(int threads);
  ~ThreadPool();
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(begin, end) on up to size() threads; returns when all are done.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker(int id);
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int active_ = 0;  // threads taking part in the current call
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace flashmoe_native
