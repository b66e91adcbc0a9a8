// A persistent worker pool: the caller plus (n-1) workers take items of a job from an
// atomic counter. Idle workers spin briefly, then sleep on a condition variable, so a
// process that is not running kernels is not starved by busy-waiting workers.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop(); }

  int size() const { return n_; }

  void resize(int n) {
    if (n < 1) n = 1;
    if (n == n_) return;
    stop();
    n_ = n;
    quit_ = false;
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
  }

  // Run fn(item) for item in [0, n_items) across the pool; returns when all are done.
  void run(int64_t n_items, const std::function<void(int64_t)>& fn) {
    if (n_items <= 0) return;
    if (n_ == 1 || n_items == 1) {
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
  }

 private:
  void work(const std::function<void(int64_t)>* fn, int64_t total) {
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= total) break;
      (*fn)(i);
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

  int n_ = 0;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0};
  uint64_t generation_ = 0;
  std::atomic<uint64_t> generation_seen_{0};  // generation_, readable without the lock (spinning)
  static constexpr std::chrono::microseconds kSpin{200};
  bool quit_ = false;
};

}  // namespace kt
