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
// When tiles hold whole batch rows (ViT), each tile runs the three steps at once in one parallel region;
// long rows (DETR) run them a step at a time.
// Tiles depend on the shapes only, not on the thread count, so results are bit-identical for any thread count.
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "common.h"
#include "isa.h"

namespace tome::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
// Bands are large because each BLAS call packs all nB B rows again (DETR: 550 x 256): 512 KB of fp32 scores,
// half an L2. Batch-row tiles stay smaller so that ViT-sized batches still split into many work items.
constexpr int64_t kBandScores = 131072;
constexpr int64_t kTileScores = 32768;

// The row helpers, compiled for the x86-64 baseline (or the native target elsewhere) and, on x86-64, also
// for AVX2, chosen at run time (isa.h). The build is ISO C++ (-ffp-contract=off: no FMA contraction) and the
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

bool use_avx2() { return cpu_isa() >= Isa::kAvx2; }
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
  const int64_t rows = num_tokens - layout.protected_tokens;  // non-protected tokens per batch row

  // Stage 1, normalise: tokens into `normalised` [batch rows from first_row on, N, C] (protected rows left
  // unset: never read), which hold a NaN, and per batch row the first B token that does. As torch.max: a
  // score row with a NaN has the maximum NaN at its first NaN, which is column 0 when the A token holds a
  // NaN, else the first B token that does (-1: none of the row's B tokens holds a NaN).
  std::vector<uint8_t> has_nan(batch * num_tokens, 0);
  std::vector<int64_t> first_nan_b(batch, -1);
  const scalar_t* metric_data = metric.const_data_ptr<scalar_t>();
  // Non-protected tokens [begin, end), flattened over batch rows.
  const auto normalise_tokens = [&](int64_t begin, int64_t end, at::Tensor& normalised, int64_t first_row) {
    acc_t* out = normalised.mutable_data_ptr<acc_t>();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = (i / rows) * num_tokens + layout.protected_tokens + i % rows;
      has_nan[n] = normalise_row(metric_data + n * channels, out + (n - first_row * num_tokens) * channels, channels);
    }
  };
  const auto find_first_nan = [&](int64_t b) {
    for (int64_t j = nb - 1; j >= 0; --j) {
      if (has_nan[b * num_tokens + layout.b_position(j)]) first_nan_b[b] = j;
    }
  };

  // Stage 2, score: a tile is a band of A rows of `rows_per_tile` batch rows against all their B rows, by
  // at::bmm_out into a per-thread buffer (single-threaded inside the OpenMP region), then a max/argmax per
  // A row. Strided views of the normalised tokens (row stride 2C) go to BLAS as they are: no
  // de-interleaving copy.
  std::vector<acc_t> best_score(batch * na, acc_t(0));
  std::vector<int64_t> best_b(batch * na, 0);
  const int64_t max_band = std::max<int64_t>(1, kBandScores / nb);
  const int64_t bands = (na + max_band - 1) / max_band, band = (na + bands - 1) / bands;  // A rows per tile
  const int64_t rows_per_tile = bands > 1 ? 1 : std::clamp<int64_t>(kTileScores / (na * nb), 1, batch);
  const int64_t groups = (batch + rows_per_tile - 1) / rows_per_tile;
  const auto new_buffer = [&] { return at::empty({rows_per_tile * band * nb}, options); };
  const auto score_tile = [&](int64_t item, at::Tensor& buffer, const at::Tensor& normalised, int64_t first_row) {
    const int64_t b0 = (item / bands) * rows_per_tile, count_rows = std::min(rows_per_tile, batch - b0);
    const int64_t first = (item % bands) * band, count = std::min(band, na - first);
    const at::Tensor tile_rows = normalised.narrow(0, b0 - first_row, count_rows);
    at::Tensor scores = buffer.narrow(0, 0, count_rows * count * nb).view({count_rows, count, nb});
    at::bmm_out(scores, tile_rows.slice(1, layout.first_a(), num_tokens, 2).narrow(1, first, count),
                tile_rows.slice(1, layout.first_b(), num_tokens, 2).transpose(1, 2));
    const acc_t* s = scores.const_data_ptr<acc_t>();
    for (int64_t b = b0; b < b0 + count_rows; ++b) {
      for (int64_t i = first; i < first + count; ++i, s += nb) {
        const int64_t a = b * na + i;
        const bool a_nan = has_nan[b * num_tokens + layout.a_position(i)];
        if (a_nan || first_nan_b[b] >= 0) {
          best_score[a] = std::numeric_limits<acc_t>::quiet_NaN();
          best_b[a] = a_nan ? 0 : first_nan_b[b];
        } else {
          best_b[a] = first_argmax(s, nb, &best_score[a]);
        }
      }
    }
  };

  // Stage 3, rank one batch row: stable descending sort of the best scores (ties -> lower A position); the
  // first r are the sources, the rest unmerged (re-sorted by position when protected >= 1).
  struct Scratch {
    std::vector<std::pair<acc_t, int64_t>> ranked;
    std::vector<uint8_t> merges;
  };
  const auto rank_row = [&](int64_t b, Scratch& scratch) {
    auto& ranked = scratch.ranked;
    ranked.resize(na);
    // Descending score, NaN first (as torch.sort), ties to the lower A position: a total order on
    // (score, position), so an unstable sort of contiguous pairs gives the stable sort's result.
    const auto before = [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    };
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
      scratch.merges.assign(na, 0);
      for (int64_t k = 0; k < r; ++k) scratch.merges[ranked[k].second] = 1;
      for (int64_t i = 0, k = 0; i < na; ++i) {
        if (!scratch.merges[i]) unm_idx[b * nu + k++] = layout.a_position(i);
      }
    } else {
      for (int64_t k = 0; k < nu; ++k) unm_idx[b * nu + k] = layout.a_position(ranked[r + k].second);
    }
  };

  if (bands == 1) {
    // Tiles hold whole batch rows: each tile goes through the three stages at once, in one parallel region
    // (no barrier between stages, no serial ranking, its rows still in cache): ~10% faster at ViT-B batch 32.
    // The normalised tokens live in a per-thread tile buffer (L2-sized) instead of a [batch, N, C] tensor:
    // 1.6 MB less to allocate and to pass through the caches per call at ViT-B batch 32.
    const int64_t tile_grain = std::max<int64_t>(1, 8 * kGrainElements / (rows_per_tile * na * nb * channels + 1));
    parallel_chunks(groups, tile_grain, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = new_buffer();
      at::Tensor tile_tokens = at::empty({rows_per_tile, num_tokens, channels}, options);
      Scratch scratch;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b0 = item * rows_per_tile, b1 = std::min(batch, b0 + rows_per_tile);
        normalise_tokens(b0 * rows, b1 * rows, tile_tokens, b0);
        for (int64_t b = b0; b < b1; ++b) find_first_nan(b);
        score_tile(item, buffer, tile_tokens, b0);
        for (int64_t b = b0; b < b1; ++b) rank_row(b, scratch);
      }
    });
    return;
  }
  // Long rows (DETR): a stage at a time, each parallel over its own items.
  at::Tensor normalised = at::empty({batch, num_tokens, channels}, options);
  parallel_chunks(batch * rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1)),
                  [&](int64_t begin, int64_t end) { normalise_tokens(begin, end, normalised, 0); });
  for (int64_t b = 0; b < batch; ++b) find_first_nan(b);
  const int64_t tile_grain = std::max<int64_t>(1, 8 * kGrainElements / (band * nb * channels + 1));
  parallel_chunks(groups * bands, tile_grain, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = new_buffer();
    for (int64_t item = begin; item < end; ++item) score_tile(item, buffer, normalised, 0);
  });
  const int64_t rank_grain = std::max<int64_t>(1, kGrainElements / 8 / std::max<int64_t>(na, 1));
  parallel_chunks(batch, rank_grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t b = begin; b < end; ++b) rank_row(b, scratch);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> match(const at::Tensor& metric_in, int64_t r, int64_t protected_tokens) {
  check_float("metric", metric_in, 3);
  const int64_t batch = metric_in.size(0);
  const Layout layout = match_layout(metric_in.size(1), r, protected_tokens);
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
