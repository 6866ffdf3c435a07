// CTranslate2's CPU allocator, with freed large buffers kept for reuse:
// linked in place of CTranslate2's `src/cpu/allocator.cc` (see
// runtime/voice/build.rs).
//
// Why. Without MKL, CTranslate2 allocates every tensor with
// `posix_memalign` and frees it with `free`. Buffers over glibc's mmap
// threshold (128 KiB to 32 MiB, adaptive) are fresh `mmap`s, so each
// decoding step page-faults its activations in again and each `free` is a
// `munmap`: `perf` put 12% of a transcription's time in page faults and
// unmapping. The PyPI wheels that faster-whisper uses are built with MKL,
// whose `mkl_malloc` keeps freed buffers; this does the same for our
// build, and only for CTranslate2's tensors (glibc's thresholds, which the
// whole process shares, stay as they are).
//
// What.
// - Requests under 1 MiB go to `posix_memalign` and `free`, as upstream's:
//   glibc's arenas already reuse those without faults.
// - Requests of 1 MiB or more are rounded up to a size class (at most 1/8
//   more than asked) and, once freed, kept on that class's list for the
//   next request of the class, up to 256 MiB held unused in all; past that
//   a freed buffer goes back to the system.
// - `clear_cache()` (and `stack_voice_release_kept_buffers`, which the
//   Rust side calls when a model has loaded, when a transcription ends and
//   when a model is dropped) hands every kept buffer back: between
//   transcriptions the process holds no more than upstream's allocator
//   would.
// - Thread-safe: one mutex, held only for the list and map operations.
//   `free`, `clear_cache` and the `extern "C"` functions let no exception
//   out (`free` runs in destructors, the others are called from Rust): a
//   failed bookkeeping allocation in `free` gives the buffer back instead
//   of keeping it. `allocate` throws, as upstream's does, when memory runs
//   out, and then holds on to nothing.
//
// The declarations below must match CTranslate2's `ctranslate2/allocator.h`
// and `ctranslate2/devices.h` (the version ct2rs vendors), or the linker
// keeps the upstream object. `stack_voice_reused_buffers` counts the
// buffers handed out again, so a test can tell this one runs.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace ctranslate2 {

enum class Device { CPU, CUDA };

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(std::size_t size, int device_index) = 0;
  virtual void free(void* ptr, int device_index) = 0;
  virtual void clear_cache() {}

  void* allocate(std::size_t size) { return allocate(size, -1); }
  void free(void* ptr) { free(ptr, -1); }
};

template <Device D>
Allocator& get_allocator();

}  // namespace ctranslate2

namespace {

constexpr std::size_t kAlignment = 64;
constexpr std::size_t kSmallestKept = std::size_t{1} << 20;
constexpr std::size_t kMostKept = std::size_t{256} << 20;

std::atomic<std::uint64_t> reused{0};

// `size` rounded up to the next multiple of an eighth of its highest power
// of two: 1 MiB, 1.125 MiB, …, 2 MiB, 2.25 MiB, …; 0 where that would not
// fit a `size_t` (such a request is passed through, untracked).
std::size_t size_class(std::size_t size) {
  std::size_t top = kSmallestKept;
  while (top <= size / 2) {
    top *= 2;
  }
  const std::size_t step = top / 8;
  if (size > SIZE_MAX - step) {
    return 0;
  }
  return (size + step - 1) / step * step;
}

void* aligned(std::size_t size) {
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kAlignment, size) != 0) {
    throw std::runtime_error("aligned_alloc: failed to allocate memory");
  }
  return ptr;
}

class KeepingAllocator final : public ctranslate2::Allocator {
 public:
  void* allocate(std::size_t size, int) override {
    const std::size_t cls = size < kSmallestKept ? 0 : size_class(size);
    if (cls == 0) {
      return aligned(size);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto kept = kept_.find(cls);
      if (kept != kept_.end() && !kept->second.empty()) {
        void* ptr = kept->second.back();
        // Noted as lent before it leaves the list: if noting it throws,
        // it is still kept.
        lent_.emplace(ptr, cls);
        kept->second.pop_back();
        kept_bytes_ -= cls;
        reused.fetch_add(1, std::memory_order_relaxed);
        return ptr;
      }
    }
    void* ptr = aligned(cls);
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      lent_.emplace(ptr, cls);
    } catch (...) {
      std::free(ptr);
      throw;
    }
    return ptr;
  }

  void free(void* ptr, int) noexcept override {
    if (ptr == nullptr) {
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto lent = lent_.find(ptr);
      if (lent != lent_.end()) {
        const std::size_t cls = lent->second;
        lent_.erase(lent);
        if (kept_bytes_ + cls <= kMostKept) {
          try {
            kept_[cls].push_back(ptr);
            kept_bytes_ += cls;
            return;
          } catch (...) {
            // No room to note it: give it back instead.
          }
        }
      }
    }
    std::free(ptr);
  }

  void clear_cache() noexcept override {
    std::unordered_map<std::size_t, std::vector<void*>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(kept_);
      kept_bytes_ = 0;
    }
    for (auto& entry : released) {
      for (void* ptr : entry.second) {
        std::free(ptr);
      }
    }
  }

 private:
  std::mutex mutex_;
  std::unordered_map<void*, std::size_t> lent_;
  std::unordered_map<std::size_t, std::vector<void*>> kept_;
  std::size_t kept_bytes_ = 0;
};

// Never destroyed: CTranslate2's own statics and thread-locals may free
// tensors after this file's statics would have been torn down at exit.
KeepingAllocator& keeping_allocator() {
  static KeepingAllocator* allocator = new KeepingAllocator();
  return *allocator;
}

}  // namespace

namespace ctranslate2 {

template <>
Allocator& get_allocator<Device::CPU>() {
  return keeping_allocator();
}

}  // namespace ctranslate2

extern "C" std::uint64_t stack_voice_reused_buffers() noexcept {
  return reused.load(std::memory_order_relaxed);
}

extern "C" void stack_voice_release_kept_buffers() noexcept {
  keeping_allocator().clear_cache();
}
