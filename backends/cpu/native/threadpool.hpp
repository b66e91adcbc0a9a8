// A persistent worker pool: the caller plus (n-1) workers take items of a job from an
// atomic counter. Idle workers spin briefly, then sleep on a condition variable, so a
// process that is not running kernels is not starved by busy-waiting workers.
//
// Thread safety: run() and resize() may be called from any threads at once. Jobs run one at a
// time (run_mu_), and resize() takes the same lock, so it waits for the job in flight instead
// of stopping workers under it. An exception thrown by an item (std::bad_alloc from a scratch
// buffer, ...) never leaves a worker thread (that would std::terminate the process): the first
// one is kept, the job's remaining items are skipped, and run() rethrows it to its caller once
// every worker has left the job.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop(); }

  int size() const { return n_.load(std::memory_order_acquire); }

  // Throws (std::system_error, std::bad_alloc) when workers cannot be started; the pool then
  // keeps the workers it got, and size() says how many threads that is.
  void resize(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> one_job_at_a_time(run_mu_);
    if (n == size()) return;
    stop();
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = false;
    }
    n_.store(1, std::memory_order_release);
    workers_.reserve(static_cast<size_t>(n - 1));
    for (int i = 1; i < n; ++i) {
      workers_.emplace_back([this] { loop(); });
      n_.store(i + 1, std::memory_order_release);
    }
  }

  // Run fn(item) for item in [0, n_items) across the pool; returns when all are done.
  void run(int64_t n_items, const std::function<void(int64_t)>& fn) {
    if (n_items <= 0) return;
    if (size() == 1 || n_items == 1) {  // on the caller alone: exceptions simply propagate
      for (int64_t i = 0; i < n_items; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(run_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      total_ = n_items;
      next_.store(0);
      done_.store(0);
      failed_.store(false);
      error_ = nullptr;
      ++generation_;
      generation_seen_.store(generation_, std::memory_order_release);
    }
    cv_.notify_all();
    work(&fn, n_items);
    while (done_.load(std::memory_order_acquire) < n_items) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = nullptr;  // no worker can join this job any more
    }
    // a worker that joined may still be between its last item and leaving work()
    while (active_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    if (failed_.load(std::memory_order_acquire)) {
      std::exception_ptr e;
      {
        std::lock_guard<std::mutex> lk(mu_);
        e = error_;
        error_ = nullptr;
      }
      std::rethrow_exception(e);
    }
  }

 private:
  void work(const std::function<void(int64_t)>* fn, int64_t total) {
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= total) break;
      if (!failed_.load(std::memory_order_relaxed)) {  // after a failure the rest are only counted
        try {
          (*fn)(i);
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu_);
          if (!failed_.load(std::memory_order_relaxed)) error_ = std::current_exception();
          failed_.store(true, std::memory_order_release);
        }
      }
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* fn;
      int64_t total;
      // Poll a short while (a kernel's next stage usually follows within microseconds), then
      // sleep. Polling yields the core, so a thread with work (another pool's worker, the
      // caller) runs first on a busy machine; it lasts at most kSpin after the last job.
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (generation_seen_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < spin_until)
        std::this_thread::yield();
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || (generation_ != seen && fn_ != nullptr); });
        if (quit_) return;
        seen = generation_;
        fn = fn_;
        total = total_;
        active_.fetch_add(1, std::memory_order_acq_rel);
      }
      work(fn, total);
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::atomic<int> n_{0};  // threads, caller included (read without a lock by run() and size())
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> failed_{false};  // an item of the current job threw; error_ holds the first
  std::exception_ptr error_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> generation_seen_{0};  // generation_, readable without the lock (spinning)
  static constexpr std::chrono::microseconds kSpin{200};
  bool quit_ = false;
};

}  // namespace kt
