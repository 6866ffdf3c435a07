// ruy's `PreparePackedMatrices`, packing a model's weights once: linked in
// place of CTranslate2's vendored `third_party/ruy/ruy/
// prepare_packed_matrices.cc` (see runtime/voice/build.rs), and compiled
// against that copy's headers.
//
// Why. Every matrix product ruy computes first packs both operands into
// the kernel's block layout. CTranslate2 hands ruy its weights with ruy's
// default cache policy (never cache), so each Whisper decoding step packs
// every weight matrix of the decoder and the vocabulary projection again:
// about as many bytes read and written as the product itself reads, for a
// product of a few rows (the beams). `perf` put ruy's 8-bit packing at 12%
// of a transcription's compute. faster-whisper's CTranslate2 (MKL and
// oneDNN) packs weights once, when the model loads.
//
// What. ruy's own function, with one more case: an operand whose data is a
// weight of a model loaded with `pack_weights_once` (the allocator in
// cpu_allocator.cc registers the buffers allocated on the loading thread
// while such a model loads, and forgets each when it is freed) is always
// taken from the context's prepacked cache, packed on first use. Every
// other operand (activations, attention scores, and weights of other
// models) is handled exactly as upstream's code does. Correctness rests on
// three rules:
// - Only buffers allocated on the thread that loads the model, while it
//   loads, are weights: a transcription running meanwhile on another
//   thread (CTranslate2 runs them on its own workers) registers nothing.
//   The cache is keyed by the data pointer, so an activation buffer whose
//   contents change from step to step must never be cached.
// - A registered buffer's contents never change while it is registered:
//   CTranslate2 fills its weights while loading and never writes them
//   after.
// - When a registered buffer is freed (a model dropped), the weights'
//   generation changes, and every context clears its cache before its
//   next product, so a new buffer at the same address is never served an
//   old packing. (CTranslate2's contexts are thread-local to the model's
//   workers, which end with the model, so this is a second guard.)
// Weights are cached only while all registered weights come to at most
// half of ruy's 256 MiB cache (see cpu_allocator.cc), and not in a context
// whose cache has evicted an entry since the weights last changed: there
// ruy's least-recently-used eviction, meeting the layers' cyclic order,
// would pack every weight again at every step, more slowly than not
// caching.
//
// The cost is memory: a packed copy of each weight matrix a context
// multiplies by (about the weights' own size; some 30 MB for Whisper
// tiny), per context: the model's worker thread, and the OpenMP threads
// that run CTranslate2's convolution products for clips of more than one
// window. The copies go when their thread ends (with the model, for
// libgomp's threads) or when the weights' generation changes.
//
// `stack_voice_prepacked_weight_uses` counts the products that took a
// weight from the cache without packing it, so a test can tell this one
// runs.

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "ruy/allocator.h"
#include "ruy/ctx.h"
#include "ruy/mat.h"
#include "ruy/prepacked_cache.h"
#include "ruy/prepare_packed_matrices.h"
#include "ruy/side_pair.h"
#include "ruy/trmul_params.h"

// From cpu_allocator.cc.
extern "C" bool stack_voice_is_cacheable_weight(const void* data) noexcept;
extern "C" std::uint64_t stack_voice_weights_generation() noexcept;

namespace {

std::atomic<std::uint64_t> prepacked_uses{0};

// Upstream's heuristic, for operands that are not registered weights
// (CTranslate2 sets no cache policy, so it says "never" for them all).
bool upstream_should_cache(const ruy::TrMulParams& params, ruy::Side side) {
  const ruy::CachePolicy cache_policy = params.src[side].cache_policy;
  const ruy::Side other_side = ruy::OtherSide(side);
  const int other_width = params.src[other_side].layout.cols;
  const int other_kernel_width =
      params.packed_matrix[other_side].layout.kernel.cols;
  switch (cache_policy) {
    case ruy::CachePolicy::kNeverCache:
      return false;
    case ruy::CachePolicy::kAlwaysCache:
      return true;
    case ruy::CachePolicy::kCacheIfLargeSpeedup:
      return other_width <= other_kernel_width;
    case ruy::CachePolicy::kCacheIfSignificantSpeedup:
      return other_width <= 4 * other_kernel_width;
    default:
      return false;
  }
}

// This thread's context, as last seen: which one, at which generation of
// the weights, and whether its cache has evicted an entry since.
struct SeenContext {
  ruy::Ctx* ctx = nullptr;
  std::uint64_t generation = 0;
  bool evicted = false;
};

thread_local SeenContext seen;

// Clears `ctx`'s cache when the weights' generation has changed since this
// thread last used it (or when this thread last used another context).
void forget_freed_weights(ruy::Ctx* ctx) {
  const std::uint64_t generation = stack_voice_weights_generation();
  if (seen.ctx != ctx || seen.generation != generation) {
    ctx->ClearPrepackedCache();
    seen = SeenContext{ctx, generation, false};
  }
}

}  // namespace

namespace ruy {

void PreparePackedMatrices(Ctx* ctx, TrMulParams* params) {
  forget_freed_weights(ctx);
  for (Side side : {Side::kLhs, Side::kRhs}) {
    PEMat& packed_matrix = params->packed_matrix[side];
    const bool weight =
        !seen.evicted && stack_voice_is_cacheable_weight(params->src[side].data);
    if (weight || upstream_should_cache(*params, side)) {
      // Use a cached packed matrix (possibly packing and caching now).
      auto* cache = ctx->GetPrepackedCache();
      const int entries = cache->MatrixCount();
      auto action = cache->Get(params->src[side].data, &packed_matrix);
      if (action == PrepackedCache::Action::kInsertedNewEntry) {
        if (weight && cache->MatrixCount() <= entries) {
          // Full: it evicted to make room. Weights go uncached here from
          // the next product on, until they change.
          seen.evicted = true;
        }
        params->RunPack(side, ctx->GetMainThreadTuning(), 0,
                        packed_matrix.layout.cols);
      } else if (weight) {
        prepacked_uses.fetch_add(1, std::memory_order_relaxed);
      }
      params->is_prepacked[side] = true;
    } else {
      // Do not use a cached packed matrix. Only need to allocate buffers now.
      Allocator* allocator = ctx->GetMainAllocator();
      packed_matrix.data = allocator->AllocateBytesAvoidingAliasingWith(
          DataBytes(packed_matrix), params->src[side].data);
      packed_matrix.sums = allocator->AllocateBytes(SumsBytes(packed_matrix));
    }
  }
}

}  // namespace ruy

extern "C" std::uint64_t stack_voice_prepacked_weight_uses() noexcept {
  return prepacked_uses.load(std::memory_order_relaxed);
}
