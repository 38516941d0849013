// One decode step of grouped-query attention over a bf16 KV cache on the CPU, and the step's
// keys and values written into the cache in place.
//
// For each batch row b and kv head k, the M query heads of the group attend, with one joint
// softmax, to the cache slots the row sees (visible[b, s]) and to the step's own key and value
// (when new_visible[b]); the new key and value are then written, narrowed to bf16, into cache
// slot `slot`. XLA:CPU computes the same as batched dots over every slot of the cache, written
// or not, plus a copy of each layer's cache for the write (docs/performance.md): this kernel reads
// only the visible slots, once, and writes one slot per head.
//
// It computes what `t2jax.attention.grouped_attention` computes for a bf16 cache: scores of the
// cache in fp32 from bf16-rounded queries, the new token's in fp32, softmax weights rounded to
// bf16 before they weight the cache's values (fp32 sums), the new value weighted in fp32, the sum
// divided by the unrounded weights' total; equal up to summation order and exp's last bit. A
// query that sees nothing gets zeros. Tiles are (row, kv head) pairs, shared with helpers on XLA's
// intra-op pool (`crew.h`). Built at first use by `t2jax.native` (-O3 -march=native).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "crew.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using t2jax_native::Widen;
using t2jax_native::Narrow;

// e^x for the softmax's x <= 0, in plain arithmetic that vectorizes (libm's expf does not):
// 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2 by a degree-6 Taylor polynomial
// (relative error ~2e-7, about an ulp). Below -87 it returns e^-87 (~2e-38) instead of less.
inline float Exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f, kLn2Low = 1.428606765330187e-06f;
  x = std::max(x, -87.0f);
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = (x - n * kLn2High) - n * kLn2Low;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r / 720)))));
  const uint32_t power = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &power, sizeof(scale));
  return p * scale;
}

// a . b over n floats. With AVX-512 and whole 16-float vectors: fused multiply-adds into one
// vector, then its lanes summed by shuffles (the compiler's reduction clause stores the vector and
// sums its lanes one by one).
inline float Dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 sums = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      sums = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), sums);
    }
    return _mm512_reduce_add_ps(sums);
  }
#endif
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The sum of n floats, in 16 lanes with AVX-512 (as `Dot`).
inline float Sum(const float* a, int64_t n) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 sums = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) sums = _mm512_add_ps(_mm512_loadu_ps(a + i), sums);
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; i < n; ++i) sum += a[i];
  return sum;
}

constexpr int64_t kAhead = 16;  // visible slots ahead whose rows are prefetched

// row [H] = the j-th visible slot's row of `rows` [S, H] (keys or values), widened; the row
// kAhead visible slots later is prefetched.
inline void WidenRow(const uint16_t* rows, const std::vector<int64_t>& seen, size_t j,
                     int64_t h_count, float* row) {
  if (j + kAhead < seen.size()) {
    const uint16_t* later = rows + seen[j + kAhead] * h_count;
    for (int64_t h = 0; h < h_count; h += 32) __builtin_prefetch(later + h);  // 64-byte lines
  }
  const uint16_t* from = rows + seen[j] * h_count;
#pragma omp simd
  for (int64_t h = 0; h < h_count; ++h) row[h] = Widen(from[h]);
}

// The operands of one call.
struct Step {
  const float* q;          // [B, K, M, H]
  const float* k_new;      // [B, K, H]
  const float* v_new;      // [B, K, H]
  const uint16_t* k;       // [B, K, S, H] bf16 bits
  const uint16_t* v;       // [B, K, S, H]
  const bool* visible;     // [B, S]
  const bool* new_visible; // [B]
  float* out;              // [B, K, M, H]
  int64_t batch, kv_heads, group, slots, head_dim;
  float scale;             // sqrt(H), as the scores' divisor
};

// The M queries of (row, kv head) `pair` against its visible slots and its new key and value.
void AttendPair(const Step& step, int64_t pair) {
  const int64_t b = pair / step.kv_heads, m_count = step.group, h_count = step.head_dim;
  thread_local std::vector<int64_t> seen;  // the visible slots, in order
  thread_local std::vector<float> scratch;
  seen.clear();
  const bool* visible = step.visible + b * step.slots;
  for (int64_t s = 0; s < step.slots; ++s) {
    if (visible[s]) seen.push_back(s);
  }
  const int64_t n = static_cast<int64_t>(seen.size());
  scratch.resize(m_count * (h_count + n + 2) + h_count);
  float* rounded = scratch.data();           // [M, H]: the queries as bf16
  float* weights = rounded + m_count * h_count;  // [M, n]: scores, then their exps
  float* own = weights + m_count * n;        // [M]: the new token's weights
  float* total = own + m_count;              // [M]: the weights' sums
  float* row = total + m_count;              // [H]: one widened key or value
  const float* q = step.q + pair * m_count * h_count;
  for (int64_t i = 0; i < m_count * h_count; ++i) rounded[i] = Widen(Narrow(q[i]));

  const uint16_t* keys = step.k + pair * step.slots * h_count;
  const uint16_t* values = step.v + pair * step.slots * h_count;
  for (int64_t j = 0; j < n; ++j) {
    WidenRow(keys, seen, j, h_count, row);
    for (int64_t m = 0; m < m_count; ++m) {
      weights[m * n + j] = Dot(rounded + m * h_count, row, h_count) / step.scale;
    }
  }

  const bool new_visible = step.new_visible[b];
  const float* k_new = step.k_new + pair * h_count;
  for (int64_t m = 0; m < m_count; ++m) {
    float* wm = weights + m * n;
    float score = -std::numeric_limits<float>::infinity();  // the new token's
    if (new_visible) score = Dot(q + m * h_count, k_new, h_count) / step.scale;
    float peak = score;
#pragma omp simd reduction(max : peak)
    for (int64_t j = 0; j < n; ++j) peak = wm[j] > peak ? wm[j] : peak;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) wm[j] = Exp(wm[j] - peak);
    own[m] = new_visible ? Exp(score - peak) : 0.0f;
    total[m] = Sum(wm, n) + own[m];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) wm[j] = Widen(Narrow(wm[j]));  // in the cache's dtype
  }

  float* out = step.out + pair * m_count * h_count;  // [M, H]: weighted values, then averages
  std::fill(out, out + m_count * h_count, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    WidenRow(values, seen, j, h_count, row);
    for (int64_t m = 0; m < m_count; ++m) {
      const float w = weights[m * n + j];
      float* om = out + m * h_count;
#pragma omp simd
      for (int64_t h = 0; h < h_count; ++h) om[h] += w * row[h];
    }
  }
  const float* v_new = step.v_new + pair * h_count;
  for (int64_t m = 0; m < m_count; ++m) {
    float* om = out + m * h_count;
    const float divisor = total[m] > 0.0f ? total[m] : 1.0f;  // sees nothing: zeros
#pragma omp simd
    for (int64_t h = 0; h < h_count; ++h) om[h] = (om[h] + own[m] * v_new[h]) / divisor;
  }
}

// Writes the step's keys or values [B, K, H], narrowed, into slot `slot` of cache [B, K, S, H].
void WriteSlot(const float* fresh, uint16_t* cache, const Step& step, int64_t slot) {
  for (int64_t pair = 0; pair < step.batch * step.kv_heads; ++pair) {
    uint16_t* to = cache + (pair * step.slots + slot) * step.head_dim;
    const float* from = fresh + pair * step.head_dim;
    for (int64_t h = 0; h < step.head_dim; ++h) to[h] = Narrow(from[h]);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                           ffi::Buffer<ffi::BF16> k_cache, ffi::Buffer<ffi::BF16> v_cache,
                           ffi::Buffer<ffi::PRED> visible, ffi::Buffer<ffi::PRED> new_visible,
                           ffi::Buffer<ffi::S32> slot, ffi::Result<ffi::Buffer<ffi::F32>> out,
                           ffi::Result<ffi::Buffer<ffi::BF16>> k_out,
                           ffi::Result<ffi::Buffer<ffi::BF16>> v_out) {
  const auto q_dims = q.dimensions(), cache_dims = k_cache.dimensions();
  if (q_dims.size() != 4 || cache_dims.size() != 4) {
    return ffi::Error::InvalidArgument("decode_attention: q and the caches must be 4-D");
  }
  Step step{};
  step.batch = q_dims[0];
  step.kv_heads = q_dims[1];
  step.group = q_dims[2];
  step.head_dim = q_dims[3];
  step.slots = cache_dims[2];
  const int64_t pairs = step.batch * step.kv_heads;
  const bool fits =
      cache_dims[0] == step.batch && cache_dims[1] == step.kv_heads &&
      cache_dims[3] == step.head_dim && v_cache.dimensions() == cache_dims &&
      k_new.element_count() == pairs * step.head_dim &&
      v_new.element_count() == pairs * step.head_dim &&
      visible.element_count() == step.batch * step.slots &&
      new_visible.element_count() == step.batch && slot.element_count() == 1 &&
      out->element_count() == q.element_count() &&
      k_out->untyped_data() == k_cache.untyped_data() &&
      v_out->untyped_data() == v_cache.untyped_data();
  if (!fits) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expects q [B, K, M, H], new keys and values [B, K, 1, H], caches "
        "[B, K, S, H] aliased to the outputs, masks [B, S] and [B], a scalar slot");
  }
  const int64_t index = slot.typed_data()[0];
  if (index < 0 || index >= step.slots) {
    return ffi::Error::InvalidArgument("decode_attention: the slot is outside the cache");
  }
  step.q = q.typed_data();
  step.k_new = k_new.typed_data();
  step.v_new = v_new.typed_data();
  step.k = reinterpret_cast<const uint16_t*>(k_cache.untyped_data());
  step.v = reinterpret_cast<const uint16_t*>(v_cache.untyped_data());
  step.visible = visible.typed_data();
  step.new_visible = new_visible.typed_data();
  step.out = out->typed_data();
  step.scale = static_cast<float>(std::sqrt(static_cast<double>(step.head_dim)));

  auto tile = [&step](int64_t pair) { AttendPair(step, pair); };
  t2jax_native::Crew& crew = t2jax_native::TheCrew();
  std::unique_lock<std::mutex> lock(crew.caller(), std::try_to_lock);
  if (lock.owns_lock()) {
    crew.Run(pool, t2jax_native::Helpers(pool), pairs, tile);
  } else {  // another call has the crew: compute alone
    for (int64_t pair = 0; pair < pairs; ++pair) tile(pair);
  }
  // After every read of the cache: the slot may be one the rows see.
  WriteSlot(step.k_new, reinterpret_cast<uint16_t*>(k_out->untyped_data()), step, index);
  WriteSlot(step.v_new, reinterpret_cast<uint16_t*>(v_out->untyped_data()), step, index);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(T2jaxDecodeAttentionBf16, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k_cache
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // visible
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // new_visible
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slot
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // k_cache, updated in place
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // v_cache, updated in place
