// ruy's `Wait`, without its busy-wait: linked in place of CTranslate2's
// vendored `third_party/ruy/ruy/wait.cc` (see runtime/voice/build.rs).
//
// Why. CTranslate2 runs its matrix products on ruy's thread pool and every
// other kernel on OpenMP's. Both pools hold one worker per intra-op thread,
// so a 2-thread model runs three busy threads on two cores. ruy's workers
// spin for 2 ms after each product (`ThreadPool::spin_duration_`) before
// they sleep; a Whisper decoding step is a few hundred microseconds of
// products with OpenMP kernels between them, so the ruy worker never
// sleeps and takes a core from the OpenMP worker, and the two wait on each
// other through the scheduler. `perf` put 40% of the process's samples in
// ruy's spin (`clock_gettime` from `ruy::Wait`) before this.
//
// What. The same contract as ruy's own `Wait` (return once `condition()`
// holds, waiting on `condvar` under `mutex`, whose notifier changes the
// condition under the mutex), with the spin phase left out: a waiter
// checks once and then sleeps on the condition variable.
//
// The signature must match ruy's declaration in `ruy/wait.h` exactly, or
// the linker keeps ruy's own object; `stack_voice_ruy_waits` counts the
// calls so a test can tell which one runs.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>

namespace {
std::atomic<std::uint64_t> waits{0};
}

namespace ruy {

using Duration = std::chrono::steady_clock::duration;

void Wait(const std::function<bool()>& condition, const Duration& spin_duration,
          std::condition_variable* condvar, std::mutex* mutex) {
  (void)spin_duration;
  waits.fetch_add(1, std::memory_order_relaxed);
  if (condition()) {
    return;
  }
  std::unique_lock<std::mutex> lock(*mutex);
  condvar->wait(lock, condition);
}

}  // namespace ruy

extern "C" std::uint64_t stack_voice_ruy_waits() {
  return waits.load(std::memory_order_relaxed);
}
