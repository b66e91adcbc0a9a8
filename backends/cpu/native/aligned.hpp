// Vectors whose data start on a 64-byte line: the buffers AMX tile loads and 512-bit loads read.
//
// glibc serves large blocks (>= 128 KB) from mmap with the data 16 bytes past a page start, so a
// plain std::vector's tile rows straddle two cache lines each: one Qwen3-30B-A3B MoE layer's
// int8 prefill ran ~35% slower that way (bench/README.md, "64-byte aligned tile buffers").
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace kt {

template <class T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  LineAllocator() noexcept = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kAlign)); }
  template <class U>
  bool operator==(const LineAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const LineAllocator<U>&) const noexcept { return false; }
};

// std::vector with its data on a 64-byte boundary
template <class T>
using lvector = std::vector<T, LineAllocator<T>>;

}  // namespace kt
