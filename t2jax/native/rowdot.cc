// A few rows times a bf16 matrix on the CPU: y[m, n] = sum_k x[m, k] * w[k, n] (or w[n, k],
// `transposed`), fp32 accumulation.
//
// XLA:CPU streams a bf16 kernel at a fraction of the memory bandwidth when only one or two rows
// multiply it (decoding at batch 1; docs/performance.md). This kernel reads each weight row once,
// contiguously, widens bf16 to fp32 by a 16-bit shift (exact) and accumulates in fp32, so it
// returns what the einsum returns up to the summation order. Columns are split into blocks that
// the caller and XLA's intra-op threads claim from a shared counter; the caller only ever waits
// for blocks already being computed, never for a task that has not started, so concurrent calls
// cannot deadlock the pool. Built at first use by `t2jax.native` (-O3 -march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerPass = 4;  // rows of x that share one read of a weight row
constexpr int64_t kKPerPass = 4;     // weight rows accumulated per pass over the outputs
constexpr int64_t kMaxBlock = 2048;  // output columns per block (fp32 partial sums in L1)

inline float Widen(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

struct Job {
  std::vector<float> x;  // [rows, depth], widened once
  const uint16_t* w;     // bf16 bits: [depth, width], or [width, depth] when transposed
  float* y;              // [rows, width]
  bool transposed;
  int64_t rows, depth, width, block, blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// y[r0:r0+NR, c0:c0+nc] = x[r0:r0+NR] @ w[:, c0:c0+nc]: each weight row of the block is read
// once, contiguously, widened once for all NR rows, into fp32 partial sums that stay in L1.
template <int NR>
void BlockInOut(const Job& job, int64_t r0, int64_t c0, int64_t nc) {
  alignas(64) float acc[NR][kMaxBlock];
  for (int r = 0; r < NR; ++r) std::fill(acc[r], acc[r] + nc, 0.0f);
  const int64_t width = job.width;
  const float* x = job.x.data() + r0 * job.depth;
  int64_t k = 0;
  for (; k + kKPerPass <= job.depth; k += kKPerPass) {
    const uint16_t* w0 = job.w + k * width + c0;
    const uint16_t* w1 = w0 + width;
    const uint16_t* w2 = w1 + width;
    const uint16_t* w3 = w2 + width;
    float xs[NR][kKPerPass];
    for (int r = 0; r < NR; ++r) {
      for (int i = 0; i < kKPerPass; ++i) xs[r][i] = x[r * job.depth + k + i];
    }
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const float v0 = Widen(w0[c]), v1 = Widen(w1[c]), v2 = Widen(w2[c]), v3 = Widen(w3[c]);
      for (int r = 0; r < NR; ++r) {
        acc[r][c] += xs[r][0] * v0 + xs[r][1] * v1 + xs[r][2] * v2 + xs[r][3] * v3;
      }
    }
  }
  for (; k < job.depth; ++k) {
    const uint16_t* w0 = job.w + k * width + c0;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const float v0 = Widen(w0[c]);
      for (int r = 0; r < NR; ++r) acc[r][c] += x[r * job.depth + k] * v0;
    }
  }
  for (int r = 0; r < NR; ++r) {
    std::memcpy(job.y + (r0 + r) * width + c0, acc[r], nc * sizeof(float));
  }
}

// The same block with w stored [width, depth] (a tied embedding used as the output head): one
// contiguous dot product per output column and row.
void BlockOutIn(const Job& job, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  for (int64_t c = c0; c < c0 + nc; ++c) {
    const uint16_t* wc = job.w + c * job.depth;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const float* xr = job.x.data() + r * job.depth;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < job.depth; ++k) sum += xr[k] * Widen(wc[k]);
      job.y[r * job.width + c] = sum;
    }
  }
}

void Work(Job& job) {
  for (;;) {
    const int64_t b = job.next.fetch_add(1, std::memory_order_relaxed);
    if (b >= job.blocks) return;
    const int64_t c0 = b * job.block;
    const int64_t nc = std::min(job.block, job.width - c0);
    for (int64_t r0 = 0; r0 < job.rows; r0 += kRowsPerPass) {
      const int64_t nr = std::min(kRowsPerPass, job.rows - r0);
      if (job.transposed) {
        BlockOutIn(job, r0, nr, c0, nc);
      } else if (nr == 4) {
        BlockInOut<4>(job, r0, c0, nc);
      } else if (nr == 3) {
        BlockInOut<3>(job, r0, c0, nc);
      } else if (nr == 2) {
        BlockInOut<2>(job, r0, c0, nc);
      } else {
        BlockInOut<1>(job, r0, c0, nc);
      }
    }
    job.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error RowDot(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                  ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const int64_t depth_axis = transposed ? 1 : 0;
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[depth_axis]) {
    return ffi::Error::InvalidArgument(
        "rowdot: x must be [rows, depth] and w [depth, width] ([width, depth] transposed)");
  }
  auto job = std::make_shared<Job>();
  job->rows = x_dims[0];
  job->depth = x_dims[1];
  job->width = w_dims[1 - depth_axis];
  job->transposed = transposed;
  const auto* x_bits = reinterpret_cast<const uint16_t*>(x.untyped_data());
  job->x.resize(job->rows * job->depth);
  for (int64_t i = 0; i < job->rows * job->depth; ++i) job->x[i] = Widen(x_bits[i]);
  job->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  job->y = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About four blocks per thread, each a multiple of 64 columns (whole cache lines of bf16).
  const int64_t per_block = (job->width + 4 * threads - 1) / (4 * threads);
  job->block = std::clamp<int64_t>((per_block + 63) / 64 * 64, 64, kMaxBlock);
  job->blocks = (job->width + job->block - 1) / job->block;
  const int64_t helpers = std::min(threads - 1, job->blocks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { Work(*job); });
  Work(*job);
  while (job->done.load(std::memory_order_acquire) < job->blocks) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(T2jaxRowDotBf16, RowDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
