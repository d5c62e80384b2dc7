// A small persistent thread pool. parallel_for hands out [0, n) in chunks through an atomic
// counter, the calling thread included: on a shared machine a worker that wakes late (or is
// descheduled) then costs at most the chunk it holds, not a fixed share of the call.
// Threads are started once, never per call.
#pragma once

#include <atomic>
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
  // The range [begin, end) of the chunk a thread runs next; begin == end: none.
  struct Range {
    int64_t begin, end;
  };
  // next(): claims now (on the first call) the chunk this thread runs after the current one and
  // returns its range, so fn can prefetch across into it near the end of the current chunk.
  using Next = std::function<Range()>;
  using ChunkFn = std::function<void(int64_t, int64_t, const Next&)>;
  // fn(begin, end, next) over chunks of about `grain` items covering [0, n), on up to size()
  // threads; returns when all chunks are done.
  void parallel_for(int64_t n, int64_t grain, const ChunkFn& fn);

 private:
  void worker();
  // Runs chunks of job `gen` until none are left.
  void run_chunks(uint32_t gen);
  // Claims the next chunk of job `gen`: its index, or -1 if none is left (or the job is over).
  int64_t claim(uint32_t gen);
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable start_cv_;
  // The current job; fn_, n_, grain_, chunks_ change only while no chunk of it is claimable.
  const ChunkFn* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<uint32_t> chunks_{0};
  std::atomic<uint64_t> next_{0};  // (job generation << 32) | next unclaimed chunk
  std::atomic<uint32_t> done_{0};  // chunks finished in the current job
  uint32_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace flashmoe_native
