// Bipartite soft matching on CPU (spec: reference.match).
//
// 1. L2-normalise every non-protected token once, in the accumulation dtype: x / max(||x||, 1e-12).
// 2. Scores a tile at a time, never the whole nA x nB matrix: a band of A rows of one batch row against all
//    its B rows (at most kBandScores scores, equal bands), or, when a whole batch row has fewer scores than
//    kTileScores, several batch rows at once (one batched BLAS call instead of many small ones: ViT-B/16 has
//    98 x 98 scores per row). The product is at::bmm into a per-thread buffer, single-threaded inside the
//    OpenMP region, followed by a max/argmax per A row.
// 3. Per batch row: stable descending sort of the best scores (ties -> lower A position); the first r are the
//    sources, the rest unmerged (re-sorted by position when protected >= 1; r = 0 skips all of this).
// Tiles depend on the shapes only, not on the thread count, so results are bit-identical for any thread count.
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "common.h"

namespace tome::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
// Bands are large because each BLAS call packs all nB B rows again (DETR: 550 x 256): 512 KB of fp32 scores,
// half an L2. Batch-row tiles stay smaller so that ViT-sized batches still split into many work items.
constexpr int64_t kBandScores = 131072;
constexpr int64_t kTileScores = 32768;

// The row helpers, compiled for the x86-64 baseline (or the native target elsewhere) and, on x86-64, also
// for AVX2, chosen at run time. The build is ISO C++ (-ffp-contract=off: no FMA contraction) and the
// helpers fix their summation order, so both give the same bits.
namespace base {
#define TOME_VECTOR_BYTES 16
#include "match_rows.inc"
#undef TOME_VECTOR_BYTES
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#define TOME_VECTOR_BYTES 32
#include "match_rows.inc"
#undef TOME_VECTOR_BYTES
}  // namespace avx2
#pragma GCC pop_options

bool use_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#else
namespace avx2 = base;
bool use_avx2() { return false; }
#endif

template <class scalar_t, class acc_t>
void match_kernel(const at::Tensor& metric, const Layout& layout, int64_t batch, int64_t* unm_idx,
                  int64_t* src_idx, int64_t* dst_idx) {
  const int64_t num_tokens = layout.num_tokens, channels = metric.size(2);
  const int64_t na = layout.num_a(), nb = layout.num_b(), r = layout.r, nu = layout.num_unmerged();
  if (r == 0) {  // nothing merges: no scores needed, the A tokens stay in order
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < na; ++k) unm_idx[b * na + k] = layout.a_position(k);
    }
    return;
  }
  const bool avx2 = use_avx2();
  const auto normalise_row = avx2 ? avx2::normalise_row<scalar_t, acc_t> : base::normalise_row<scalar_t, acc_t>;
  const auto first_argmax = avx2 ? avx2::first_argmax<acc_t> : base::first_argmax<acc_t>;
  const auto options = metric.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Normalised tokens [batch, N, C] (protected rows left unset: never read), and which hold a NaN.
  at::Tensor normalised = at::empty({batch, num_tokens, channels}, options);
  std::vector<uint8_t> has_nan(batch * num_tokens, 0);
  {
    const scalar_t* in = metric.const_data_ptr<scalar_t>();
    acc_t* out = normalised.mutable_data_ptr<acc_t>();
    const int64_t rows = num_tokens - layout.protected_tokens;
    parallel_chunks(batch * rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1)),
                    [&](int64_t begin, int64_t end) {
                      for (int64_t i = begin; i < end; ++i) {
                        const int64_t n = (i / rows) * num_tokens + layout.protected_tokens + i % rows;
                        has_nan[n] = normalise_row(in + n * channels, out + n * channels, channels);
                      }
                    });
  }
  // As torch.max: a score row with a NaN has the maximum NaN at its first NaN, which is column 0 when the A
  // token holds a NaN, else the first B token that does. -1: no B token of the batch row holds a NaN.
  std::vector<int64_t> first_nan_b(batch, -1);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = nb - 1; j >= 0; --j) {
      if (has_nan[b * num_tokens + layout.b_position(j)]) first_nan_b[b] = j;
    }
  }

  std::vector<acc_t> best_score(batch * na, acc_t(0));
  std::vector<int64_t> best_b(batch * na, 0);
  if (nb > 0 && na > 0) {
    // Strided views (row stride 2C) go to BLAS as they are: no de-interleaving copy.
    const at::Tensor a_rows = normalised.slice(1, layout.first_a(), num_tokens, 2);  // [batch, nA, C]
    const at::Tensor b_rows = normalised.slice(1, layout.first_b(), num_tokens, 2);  // [batch, nB, C]
    const int64_t max_band = std::max<int64_t>(1, kBandScores / nb);
    const int64_t bands = (na + max_band - 1) / max_band, band = (na + bands - 1) / bands;  // A rows per tile
    const int64_t rows_per_tile = bands > 1 ? 1 : std::clamp<int64_t>(kTileScores / (na * nb), 1, batch);
    const int64_t groups = (batch + rows_per_tile - 1) / rows_per_tile;
    const int64_t tile_grain = std::max<int64_t>(1, 8 * kGrainElements / (rows_per_tile * band * nb * channels + 1));
    parallel_chunks(groups * bands, tile_grain, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({rows_per_tile * band * nb}, options);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b0 = (item / bands) * rows_per_tile, rows = std::min(rows_per_tile, batch - b0);
        const int64_t first = (item % bands) * band, count = std::min(band, na - first);
        at::Tensor scores = buffer.narrow(0, 0, rows * count * nb).view({rows, count, nb});
        at::bmm_out(scores, a_rows.narrow(0, b0, rows).narrow(1, first, count),
                    b_rows.narrow(0, b0, rows).transpose(1, 2));
        const acc_t* s = scores.const_data_ptr<acc_t>();
        for (int64_t b = b0; b < b0 + rows; ++b) {
          for (int64_t i = first; i < first + count; ++i, s += nb) {
            const int64_t a = b * na + i;
            if (has_nan[b * num_tokens + layout.a_position(i)] || first_nan_b[b] >= 0) {
              best_score[a] = std::numeric_limits<acc_t>::quiet_NaN();
              best_b[a] = has_nan[b * num_tokens + layout.a_position(i)] ? 0 : first_nan_b[b];
            } else {
              best_b[a] = first_argmax(s, nb, &best_score[a]);
            }
          }
        }
      }
    });
  }

  const int64_t rank_grain = std::max<int64_t>(1, kGrainElements / 8 / std::max<int64_t>(na, 1));
  parallel_chunks(batch, rank_grain, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> ranked(na);
    std::vector<uint8_t> merges(na);
    const auto before = [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    };
    for (int64_t b = begin; b < end; ++b) {
      // Descending score, NaN first (as torch.sort), ties to the lower A position: a total order on
      // (score, position), so an unstable sort of contiguous pairs gives the stable sort's result.
      for (int64_t i = 0; i < na; ++i) {
        const acc_t score = best_score[b * na + i];
        ranked[i] = {std::isnan(score) ? std::numeric_limits<acc_t>::infinity() : score, i};
      }
      // With protected tokens the unmerged stay in position order, so only the r best need sorting.
      const bool by_position = layout.protected_tokens >= 1;
      if (by_position) {
        std::partial_sort(ranked.begin(), ranked.begin() + r, ranked.end(), before);
      } else {
        std::sort(ranked.begin(), ranked.end(), before);
      }
      for (int64_t k = 0; k < r; ++k) {
        src_idx[b * r + k] = layout.a_position(ranked[k].second);
        dst_idx[b * r + k] = layout.b_position(best_b[b * na + ranked[k].second]);
      }
      if (by_position) {
        std::fill(merges.begin(), merges.end(), 0);
        for (int64_t k = 0; k < r; ++k) merges[ranked[k].second] = 1;
        for (int64_t i = 0, k = 0; i < na; ++i) {
          if (!merges[i]) unm_idx[b * nu + k++] = layout.a_position(i);
        }
      } else {
        for (int64_t k = 0; k < nu; ++k) unm_idx[b * nu + k] = layout.a_position(ranked[r + k].second);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> match(const at::Tensor& metric_in, int64_t r, int64_t protected_tokens) {
  check_float("metric", metric_in, 3);
  const int64_t batch = metric_in.size(0), num_tokens = metric_in.size(1);
  TORCH_CHECK_VALUE(r >= 0, "tome: r must be >= 0, got ", r);
  TORCH_CHECK_VALUE(protected_tokens >= 0 && protected_tokens <= num_tokens, "tome: protected must be in [0, N=",
              num_tokens, "], got ", protected_tokens);
  const Layout layout{num_tokens, protected_tokens, clamp_r(r, num_tokens, protected_tokens)};
  const at::Tensor metric = metric_in.contiguous();
  const auto index_options = metric.options().dtype(at::kLong);
  at::Tensor unm_idx = at::empty({batch, layout.num_unmerged()}, index_options);
  at::Tensor src_idx = at::empty({batch, layout.r}, index_options);
  at::Tensor dst_idx = at::empty({batch, layout.r}, index_options);
  if (batch == 0) return {unm_idx, src_idx, dst_idx};  // the tiling below divides by the batch
  dispatch_data_acc(metric.scalar_type(), acc_dtype(metric.scalar_type()), [&](auto data, auto accum) {
    match_kernel<decltype(data), decltype(accum)>(metric, layout, batch, unm_idx.mutable_data_ptr<int64_t>(),
                                                  src_idx.mutable_data_ptr<int64_t>(),
                                                  dst_idx.mutable_data_ptr<int64_t>());
  });
  return {unm_idx, src_idx, dst_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CPU, m) { m.impl("_native_match", &match); }

}  // namespace tome::cpu
