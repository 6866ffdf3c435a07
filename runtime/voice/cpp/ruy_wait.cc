// ruy's `Wait`, without its busy-wait: linked in place of CTranslate2's
// vendored `third_party/ruy/ruy/wait.cc` (see runtime/voice/build.rs).
//
// Why. CTranslate2 runs its matrix products on ruy's thread pool and every
// other kernel on OpenMP's. Both pools have `threads - 1` workers beside
// the calling thread, so a model with as many threads as cores runs more
// busy threads than there are cores. ruy's workers spin for 2 ms after each
// product (`ThreadPool::spin_duration_`) before they sleep; a Whisper
// decoding step is a few hundred microseconds of products with OpenMP
// kernels between them, so on two cores the ruy worker never slept, took a
// core from the OpenMP worker, and the two waited on each other through the
// scheduler. `perf` put 40% of the process's samples in ruy's spin
// (`clock_gettime` from `ruy::Wait`) before this, and with one core busy
// elsewhere a 30 s clip took 10 s instead of 3.
//
// What. ruy's own `Wait` as it runs with a zero spin duration ("Setting it
// to zero disables the spin-waiting entirely", ruy/wait.h): the waiter
// checks once and then sleeps on the condition variable. No wakeup is
// lost: ruy's notifiers store the new state, then lock `mutex` around
// `notify_all`, and the waiter checks under that lock. The cost, where
// cores sit idle, is a futex wake per product instead of a spinning
// worker's immediate start (measured only on this 2-core machine, where
// sleeping is faster with or without other load).
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
}  // namespace

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

extern "C" std::uint64_t stack_voice_ruy_waits() noexcept {
  return waits.load(std::memory_order_relaxed);
}
