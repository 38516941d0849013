// Helpers on XLA's intra-op pool that share the tiles of one native call with its thread.
//
// One core streams about half of what two do, and a decoder's kernels take tens of microseconds
// each, so a call shares its tiles with helpers: tasks on XLA's intra-op pool (one per further
// pool thread, at most kMaxHelpers) that stay for kSpin after their last tile, claiming the tiles
// of the next calls from a shared ticket (generation << 32 | next tile), then give their thread
// back. Running on the pool's own threads, they do not compete with it for cores. One call at a
// time, of any kernel, uses the helpers; a concurrent call computes alone, so calls never wait on
// each other.

#ifndef T2JAX_NATIVE_CREW_H_
#define T2JAX_NATIVE_CREW_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace t2jax_native {

namespace ffi = xla::ffi;

constexpr int kMaxHelpers = 7;
constexpr auto kSpin = std::chrono::microseconds(300);  // a helper idles this long, then leaves

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// The helpers a call may use on `pool`.
inline int Helpers(ffi::ThreadPool& pool) {
  return std::clamp<int>(pool.num_threads() - 1, 0, kMaxHelpers);
}

// The one call that helpers share, and their loop.
class Crew {
 public:
  std::mutex& caller() { return caller_; }

  // Runs tile(0) .. tile(tiles - 1) on this thread and up to `helpers` pool threads, and returns
  // when all are done; called under caller().
  void Run(ffi::ThreadPool& pool, int helpers, int64_t tiles,
           std::function<void(int64_t)> tile) {
    const uint32_t generation = ++generation_;  // wraps after 2^32 calls, as the ticket's half
    tile_ = std::move(tile);
    // The ticket moves first: no helper still on the last call can claim a tile of this one.
    ticket_.store(uint64_t{generation} << 32, std::memory_order_seq_cst);
    tiles_.store(tiles, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    published_.store(generation, std::memory_order_seq_cst);
    for (int active = active_.load(); active < helpers;) {
      if (active_.compare_exchange_weak(active, active + 1)) {
        pool.Schedule([this] { Serve(); });
        ++active;
      }
    }
    Claim(generation);
    while (done_.load(std::memory_order_acquire) < tiles) Pause();
  }

 private:
  // Computes tiles of `generation` until none is left or a newer call has started.
  void Claim(uint32_t generation) {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if ((ticket >> 32) != generation) return;
      const int64_t tile = static_cast<int64_t>(ticket & 0xffffffffu);
      if (tile >= tiles_.load(std::memory_order_relaxed)) return;
      if (ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) {
        tile_(tile);
        done_.fetch_add(1, std::memory_order_release);
        ticket = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  // A helper: claims tiles of each new call, and gives its pool thread back after kSpin idle.
  void Serve() {
    uint32_t seen = 0;
    auto idle_since = std::chrono::steady_clock::now();
    for (int spin = 1;; ++spin) {
      const uint32_t generation = published_.load(std::memory_order_acquire);
      if (generation != seen) {
        seen = generation;
        Claim(generation);
        idle_since = std::chrono::steady_clock::now();
      } else if (spin % 64 == 0 && std::chrono::steady_clock::now() - idle_since > kSpin) {
        active_.fetch_sub(1);
        return;
      }
      Pause();
    }
  }

  std::function<void(int64_t)> tile_;  // written under caller_, before the ticket moves
  uint32_t generation_ = 0;            // written under caller_ only
  std::mutex caller_;
  // Each counter on its own cache line: helpers poll `published_` while tiles are claimed and
  // counted on the others.
  alignas(64) std::atomic<uint64_t> ticket_{0};
  alignas(64) std::atomic<uint32_t> published_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<int64_t> tiles_{0};
  std::atomic<int> active_{0};  // helpers in Serve
};

// The crew of every kernel of the library (an inline function's static: one per program).
inline Crew& TheCrew() {
  static Crew* crew = new Crew();
  return *crew;  // never destroyed: helpers may still be leaving Serve at exit
}

}  // namespace t2jax_native

#endif  // T2JAX_NATIVE_CREW_H_
