// A few rows times bf16 matrices on the CPU: y[m, :] = x[m, :] @ [w_1 | w_2 | ...], each w_i
// [depth, width_i] (or [width_i, depth], `transposed`), fp32 accumulation.
//
// XLA:CPU streams a bf16 kernel at a fraction of the memory bandwidth when only one or two rows
// multiply it (decoding at batch 1; docs/performance.md). This kernel reads each weight row once,
// contiguously, widens bf16 to fp32 by a 16-bit shift (exact) and accumulates in fp32, so it
// returns what the einsum returns up to the summation order. Several matrices of one input (q, k
// and v; gate and up) go in one call, which saves the per-call start of the memory streams
// without the fused copy of the weights that `model.fuse_projections` makes.
//
// The work is cut into tiles: blocks of output columns times, for [depth, width] weights, slices
// of the depth whose partial sums are added at the end; the call's thread shares them with
// helpers on XLA's intra-op pool (`crew.h`). Built at first use by `t2jax.native` (-O3
// -march=native).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "bf16.h"
#include "crew.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using t2jax_native::Widen;
using t2jax_native::TheCrew;

constexpr int64_t kRowsPerPass = 4;   // rows of x that share one read of a weight row
constexpr int64_t kKPerPass = 4;      // weight rows accumulated per pass over the outputs
constexpr int64_t kAccFloats = 8192;  // fp32 partial sums per tile (32 KB, in L1)
constexpr int64_t kPrefetchRows = 4;  // weight rows ahead that a pass over short rows prefetches
constexpr int64_t kShortRow = 1024;   // columns up to which a tile's rows count as short
constexpr int64_t kLine = 32;         // bf16 per cache line
constexpr int64_t kOutInBlock = 2048;  // output columns per tile of a [width, depth] matrix
constexpr int64_t kMinSlice = 64;     // weight rows per depth slice, at least
constexpr int64_t kTilesPerThread = 4;

// One matrix of a call: its weights, its columns of y, and its tiles.
struct Part {
  const uint16_t* w;      // bf16 bits: [depth, width], or [width, depth] when transposed
  int64_t width, column;  // its output columns, the first of them in y
  int64_t block, blocks;  // output columns per tile, column blocks
  int64_t slice, slices;  // weight rows per depth slice, depth slices
  int64_t first_tile;     // of the call's tiles; blocks * slices of them are this part's
  int64_t partial;        // offset of its [slices, rows, width] partial sums when sliced
};

// A call: the rows of x times each part's matrix, side by side in y.
struct Job {
  std::vector<float> x;        // [rows, depth], widened once
  std::vector<float> partial;  // the parts' depth-slice partial sums
  std::vector<Part> parts;
  float* y;                    // [rows, width]: the parts' outputs side by side
  bool transposed;
  int64_t rows, depth, width;  // width: of y, all parts together
  int64_t tiles;
};

// Lays out a part's tiles: about `target` of them.
void PlanPart(const Job& job, Part& part, int64_t target) {
  if (job.transposed) {  // one contiguous dot per column: split the columns only
    const int64_t per_block = (part.width + target - 1) / target;
    part.block = std::clamp<int64_t>((per_block + 63) / 64 * 64, 64, kOutInBlock);
    part.slices = 1;
  } else {  // whole rows where they fit in L1, read in memory order; the depth sliced for tiles
    const int64_t max_block = kAccFloats / std::min(job.rows, kRowsPerPass) / 64 * 64;
    const int64_t blocks = (part.width + max_block - 1) / max_block;
    part.block = ((part.width + blocks - 1) / blocks + 63) / 64 * 64;
    const int64_t wanted = (target + blocks - 1) / blocks;
    part.slices = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, job.depth / kMinSlice));
  }
  part.blocks = (part.width + part.block - 1) / part.block;
  part.slice = (job.depth + part.slices - 1) / part.slices;
  part.slices = (job.depth + part.slice - 1) / part.slice;
}

// Lays out a call's tiles for `threads` threads: about kTilesPerThread each, shared among the
// parts by their widths.
void Plan(Job& job, int64_t threads) {
  int64_t tiles = 0, partial = 0;
  for (Part& part : job.parts) {
    const int64_t target = kTilesPerThread * threads * part.width / std::max<int64_t>(1, job.width);
    PlanPart(job, part, std::max<int64_t>(1, target));
    part.first_tile = tiles;
    part.partial = partial;
    tiles += part.blocks * part.slices;
    if (part.slices > 1) partial += part.slices * job.rows * part.width;
  }
  job.tiles = tiles;
  job.partial.resize(partial);
}

// out[r, c0:c0+nc] = x[r0+r, k0:k1] @ w[k0:k1, c0:c0+nc] for NR rows (out's rows `stride`
// apart): each weight row of the tile is read once, contiguously, widened once for all NR rows,
// into fp32 sums that stay in L1.
template <int NR>
void TileInOut(const Job& job, const Part& part, int64_t r0, int64_t k0, int64_t k1, int64_t c0,
               int64_t nc, float* out, int64_t stride) {
  alignas(64) float acc[NR][kAccFloats / NR];
  for (int r = 0; r < NR; ++r) std::fill(acc[r], acc[r] + nc, 0.0f);
  const int64_t width = part.width;
  const float* x = job.x.data() + r0 * job.depth;
  int64_t k = k0;
  for (; k + kKPerPass <= k1; k += kKPerPass) {
    const uint16_t* w0 = part.w + k * width + c0;
    const uint16_t* w1 = w0 + width;
    const uint16_t* w2 = w1 + width;
    const uint16_t* w3 = w2 + width;
    // The hardware prefetcher loses short rows read side by side (and keeps up with long ones):
    // fetch a later pass's rows.
    if (nc <= kShortRow && k + kPrefetchRows + kKPerPass <= k1) {
      const uint16_t* ahead = w0 + kPrefetchRows * width;
      for (int i = 0; i < kKPerPass; ++i) {
        for (int64_t c = 0; c < nc; c += kLine) __builtin_prefetch(ahead + i * width + c);
      }
    }
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
  for (; k < k1; ++k) {
    const uint16_t* w0 = part.w + k * width + c0;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const float v0 = Widen(w0[c]);
      for (int r = 0; r < NR; ++r) acc[r][c] += x[r * job.depth + k] * v0;
    }
  }
  for (int r = 0; r < NR; ++r) std::memcpy(out + r * stride + c0, acc[r], nc * sizeof(float));
}

// The same with w stored [width, depth] (a tied embedding used as the output head): one
// contiguous dot product per output column and row, straight into y. (Four columns at a time,
// as four streams, ran slower.)
void TileOutIn(const Job& job, const Part& part, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  for (int64_t c = c0; c < c0 + nc; ++c) {
    const uint16_t* wc = part.w + c * job.depth;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const float* xr = job.x.data() + r * job.depth;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < job.depth; ++k) sum += xr[k] * Widen(wc[k]);
      job.y[r * job.width + part.column + c] = sum;
    }
  }
}

void RunTile(Job& job, int64_t tile) {
  const Part* part = &job.parts.front();
  while (tile >= part->first_tile + part->blocks * part->slices) ++part;
  const int64_t local = tile - part->first_tile;
  const int64_t s = local / part->blocks, b = local % part->blocks;
  const int64_t c0 = b * part->block, nc = std::min(part->block, part->width - c0);
  const int64_t k0 = s * part->slice, k1 = std::min(job.depth, k0 + part->slice);
  const bool sliced = part->slices > 1;  // then into the part's partial sums of slice s
  float* out = sliced ? job.partial.data() + part->partial + s * job.rows * part->width
                      : job.y + part->column;
  const int64_t stride = sliced ? part->width : job.width;
  for (int64_t r0 = 0; r0 < job.rows; r0 += kRowsPerPass) {
    const int64_t nr = std::min(kRowsPerPass, job.rows - r0);
    float* rows_out = out + r0 * stride;
    if (job.transposed) {
      TileOutIn(job, *part, r0, nr, c0, nc);
    } else if (nr == 4) {
      TileInOut<4>(job, *part, r0, k0, k1, c0, nc, rows_out, stride);
    } else if (nr == 3) {
      TileInOut<3>(job, *part, r0, k0, k1, c0, nc, rows_out, stride);
    } else if (nr == 2) {
      TileInOut<2>(job, *part, r0, k0, k1, c0, nc, rows_out, stride);
    } else {
      TileInOut<1>(job, *part, r0, k0, k1, c0, nc, rows_out, stride);
    }
  }
}

// Each sliced part's columns of y = the sum of its slices' partial sums.
void AddSlices(Job& job) {
  for (const Part& part : job.parts) {
    if (part.slices == 1) continue;
    const float* partial = job.partial.data() + part.partial;
    for (int64_t r = 0; r < job.rows; ++r) {
      float* y = job.y + r * job.width + part.column;
      std::memcpy(y, partial + r * part.width, part.width * sizeof(float));
      for (int64_t s = 1; s < part.slices; ++s) {
        const float* slice = partial + (s * job.rows + r) * part.width;
#pragma omp simd
        for (int64_t c = 0; c < part.width; ++c) y[c] += slice[c];
      }
    }
  }
}

// Fills the job's operands from the call; an error message for operands that do not fit.
const char* Prepare(Job& job, ffi::Buffer<ffi::BF16> x, ffi::RemainingArgs kernels,
                    ffi::Result<ffi::Buffer<ffi::F32>> y, bool transposed, int64_t threads) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2 || kernels.size() == 0) return "rowdot: x must be [rows, depth]";
  job.rows = x_dims[0];
  job.depth = x_dims[1];
  job.transposed = transposed;
  job.parts.clear();
  job.width = 0;
  for (size_t i = 0; i < kernels.size(); ++i) {
    auto kernel = kernels.get<ffi::Buffer<ffi::BF16>>(i);
    if (!kernel.has_value()) return "rowdot: every kernel must be bf16";
    const auto dims = kernel->dimensions();
    if (dims.size() != 2 || dims[transposed ? 1 : 0] != job.depth || dims[0] * dims[1] == 0) {
      return "rowdot: kernels must be non-empty [depth, width] ([width, depth] transposed)";
    }
    Part part{};
    part.w = reinterpret_cast<const uint16_t*>(kernel->untyped_data());
    part.width = dims[transposed ? 0 : 1];
    part.column = job.width;
    job.width += part.width;
    job.parts.push_back(part);
  }
  const auto y_dims = y->dimensions();
  if (y_dims.size() != 2 || y_dims[0] != job.rows || y_dims[1] != job.width) {
    return "rowdot: y must be [rows, the kernels' widths together]";
  }
  const auto* x_bits = reinterpret_cast<const uint16_t*>(x.untyped_data());
  job.x.resize(job.rows * job.depth);
  for (int64_t i = 0; i < job.rows * job.depth; ++i) job.x[i] = Widen(x_bits[i]);
  job.y = y->typed_data();
  Plan(job, threads);
  return nullptr;
}

ffi::Error RowDot(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::RemainingArgs kernels,
                  ffi::Result<ffi::Buffer<ffi::F32>> y, bool transposed) {
  const int helpers = t2jax_native::Helpers(pool);
  t2jax_native::Crew& crew = TheCrew();
  std::unique_lock<std::mutex> lock(crew.caller(), std::try_to_lock);
  static Job& shared = *new Job();  // the crew caller's, kept between calls under its lock
  Job alone;          // when another call has the crew: compute alone
  Job& job = lock.owns_lock() ? shared : alone;
  if (const char* error = Prepare(job, x, kernels, y, transposed, lock.owns_lock() ? helpers + 1 : 1)) {
    return ffi::Error::InvalidArgument(error);
  }
  if (lock.owns_lock()) {
    crew.Run(pool, helpers, job.tiles, [&job](int64_t tile) { RunTile(job, tile); });
  } else {
    for (int64_t tile = 0; tile < job.tiles; ++tile) RunTile(job, tile);
  }
  AddSlices(job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(T2jaxRowDotBf16, RowDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
