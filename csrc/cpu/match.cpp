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
//
// Windowed matching (reference.window_match) replaces steps 1-2 by a pass over the windows (normalise the
// window's tokens, score each A slot against the window's B slots) and ranks as step 3, the unmerged A tokens
// in position order. Unlisted A tokens score -inf: they rank last, and r never exceeds the listed count.
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

template <class acc_t>
struct RankScratch {  // per thread, reused across batch rows
  std::vector<std::pair<acc_t, int64_t>> ranked;
  std::vector<uint8_t> merges;
};

// Rank one batch row: stable descending sort of the A tokens' best scores (`best_score`, `best_b` [nA]: score
// and B slot; ties -> lower A position); the first r are the sources, the rest unmerged (re-sorted by
// position when `by_position`). Writes the row's unm_idx [nA - r], src_idx [r], dst_idx [r].
template <class acc_t>
void rank_row(const Layout& layout, bool by_position, const acc_t* best_score, const int64_t* best_b,
              RankScratch<acc_t>& scratch, int64_t* unm_idx, int64_t* src_idx, int64_t* dst_idx) {
  const int64_t na = layout.num_a(), r = layout.r;
  auto& ranked = scratch.ranked;
  ranked.resize(na);
  // Descending score, NaN first (as torch.sort), ties to the lower A position: a total order on
  // (score, position), so an unstable sort of contiguous pairs gives the stable sort's result.
  const auto before = [](const auto& x, const auto& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  };
  for (int64_t i = 0; i < na; ++i) {
    ranked[i] = {std::isnan(best_score[i]) ? std::numeric_limits<acc_t>::infinity() : best_score[i], i};
  }
  // With the unmerged in position order, only the r best need sorting.
  if (by_position) {
    std::partial_sort(ranked.begin(), ranked.begin() + r, ranked.end(), before);
  } else {
    std::sort(ranked.begin(), ranked.end(), before);
  }
  for (int64_t k = 0; k < r; ++k) {
    src_idx[k] = layout.a_position(ranked[k].second);
    dst_idx[k] = layout.b_position(best_b[ranked[k].second]);
  }
  if (by_position) {
    scratch.merges.assign(na, 0);
    for (int64_t k = 0; k < r; ++k) scratch.merges[ranked[k].second] = 1;
    for (int64_t i = 0, k = 0; i < na; ++i) {
      if (!scratch.merges[i]) unm_idx[k++] = layout.a_position(i);
    }
  } else {
    for (int64_t k = 0; k < na - r; ++k) unm_idx[k] = layout.a_position(ranked[r + k].second);
  }
}

// One match call: the three stages as member functions over shared state, run by one of two drivers.
template <class scalar_t, class acc_t>
class Matcher {
 public:
  Matcher(const at::Tensor& metric, const Layout& layout, int64_t batch, int64_t* unm_idx, int64_t* src_idx,
          int64_t* dst_idx)
      : layout_(layout), batch_(batch), num_tokens_(layout.num_tokens), channels_(metric.size(2)),
        na_(layout.num_a()), nb_(layout.num_b()), r_(layout.r), nu_(layout.num_unmerged()),
        rows_(num_tokens_ - layout.protected_tokens), metric_(metric.const_data_ptr<scalar_t>()),
        options_(metric.options().dtype(c10::CppTypeToScalarType<acc_t>::value)),
        unm_idx_(unm_idx), src_idx_(src_idx), dst_idx_(dst_idx),
        normalise_row_(use_avx2() ? avx2::normalise_row<scalar_t, acc_t> : base::normalise_row<scalar_t, acc_t>),
        first_argmax_(use_avx2() ? avx2::first_argmax<acc_t> : base::first_argmax<acc_t>),
        has_nan_(batch * num_tokens_, 0), first_nan_b_(batch, -1), best_score_(batch * na_, acc_t(0)),
        best_b_(batch * na_, 0) {
    // Tiles: a band of A rows of `rows_per_tile_` batch rows against all their B rows (see the file comment).
    const int64_t max_band = std::max<int64_t>(1, kBandScores / nb_);
    bands_ = (na_ + max_band - 1) / max_band;
    band_ = (na_ + bands_ - 1) / bands_;
    rows_per_tile_ = bands_ > 1 ? 1 : std::clamp<int64_t>(kTileScores / (na_ * nb_), 1, batch);
    row_groups_ = (batch + rows_per_tile_ - 1) / rows_per_tile_;
  }

  // Whether tiles hold whole batch rows (ViT) rather than bands of one long row (DETR).
  bool whole_rows() const { return bands_ == 1; }

  // Stage 1, normalise: non-protected tokens [begin, end), flattened over batch rows, into `normalised`
  // [batch rows from first_row on, N, C] (protected rows left unset: never read), noting which hold a NaN.
  void normalise_tokens(int64_t begin, int64_t end, at::Tensor& normalised, int64_t first_row) {
    acc_t* out = normalised.mutable_data_ptr<acc_t>();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = (i / rows_) * num_tokens_ + layout_.protected_tokens + i % rows_;
      has_nan_[n] = normalise_row_(metric_ + n * channels_, out + (n - first_row * num_tokens_) * channels_,
                                   channels_);
    }
  }

  // As torch.max: a score row with a NaN has the maximum NaN at its first NaN, which is column 0 when the A
  // token holds a NaN, else the first B token that does (-1: none of batch row b's B tokens holds a NaN).
  void find_first_nan(int64_t b) {
    for (int64_t j = nb_ - 1; j >= 0; --j) {
      if (has_nan_[b * num_tokens_ + layout_.b_position(j)]) first_nan_b_[b] = j;
    }
  }

  at::Tensor new_score_buffer() const { return at::empty({rows_per_tile_ * band_ * nb_}, options_); }
  at::Tensor new_tile_tokens() const { return at::empty({rows_per_tile_, num_tokens_, channels_}, options_); }

  // Stage 2, score tile `item` by at::bmm_out into `buffer` (single-threaded inside the OpenMP region), then
  // a max/argmax per A row. Strided views of the normalised tokens (row stride 2C) go to BLAS as they are: no
  // de-interleaving copy.
  void score_tile(int64_t item, at::Tensor& buffer, const at::Tensor& normalised, int64_t first_row) {
    const int64_t b0 = (item / bands_) * rows_per_tile_, count_rows = std::min(rows_per_tile_, batch_ - b0);
    const int64_t first = (item % bands_) * band_, count = std::min(band_, na_ - first);
    const at::Tensor tile_rows = normalised.narrow(0, b0 - first_row, count_rows);
    at::Tensor scores = buffer.narrow(0, 0, count_rows * count * nb_).view({count_rows, count, nb_});
    at::bmm_out(scores, tile_rows.slice(1, layout_.first_a(), num_tokens_, 2).narrow(1, first, count),
                tile_rows.slice(1, layout_.first_b(), num_tokens_, 2).transpose(1, 2));
    const acc_t* s = scores.const_data_ptr<acc_t>();
    for (int64_t b = b0; b < b0 + count_rows; ++b) {
      for (int64_t i = first; i < first + count; ++i, s += nb_) {
        const int64_t a = b * na_ + i;
        const bool a_nan = has_nan_[b * num_tokens_ + layout_.a_position(i)];
        if (a_nan || first_nan_b_[b] >= 0) {
          best_score_[a] = std::numeric_limits<acc_t>::quiet_NaN();
          best_b_[a] = a_nan ? 0 : first_nan_b_[b];
        } else {
          best_b_[a] = first_argmax_(s, nb_, &best_score_[a]);
        }
      }
    }
  }

  // Stage 3, rank batch row b (the free rank_row).
  void rank_row(int64_t b, RankScratch<acc_t>& scratch) {
    tome::cpu::rank_row(layout_, layout_.protected_tokens >= 1, best_score_.data() + b * na_,
                        best_b_.data() + b * na_, scratch, unm_idx_ + b * nu_, src_idx_ + b * r_, dst_idx_ + b * r_);
  }

  // Driver for tiles of whole batch rows (ViT): each tile goes through the three stages at once, in one
  // parallel region (no barrier between stages, no serial ranking, its rows still in cache), with its
  // normalised tokens in a per-thread, L2-sized buffer instead of a [batch, N, C] tensor.
  void run_whole_rows() {
    const int64_t grain =
        std::max<int64_t>(1, 8 * kGrainElements / (rows_per_tile_ * na_ * nb_ * channels_ + 1));
    parallel_chunks(row_groups_, grain, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = new_score_buffer(), tile_tokens = new_tile_tokens();
      RankScratch<acc_t> scratch;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b0 = item * rows_per_tile_, b1 = std::min(batch_, b0 + rows_per_tile_);
        normalise_tokens(b0 * rows_, b1 * rows_, tile_tokens, b0);
        for (int64_t b = b0; b < b1; ++b) find_first_nan(b);
        score_tile(item, buffer, tile_tokens, b0);
        for (int64_t b = b0; b < b1; ++b) rank_row(b, scratch);
      }
    });
  }

  // Driver for long rows (DETR): a stage at a time, each parallel over its own items.
  void run_by_stage() {
    at::Tensor normalised = at::empty({batch_, num_tokens_, channels_}, options_);
    parallel_chunks(batch_ * rows_, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels_, 1)),
                    [&](int64_t begin, int64_t end) { normalise_tokens(begin, end, normalised, 0); });
    for (int64_t b = 0; b < batch_; ++b) find_first_nan(b);
    const int64_t tile_grain = std::max<int64_t>(1, 8 * kGrainElements / (band_ * nb_ * channels_ + 1));
    parallel_chunks(row_groups_ * bands_, tile_grain, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = new_score_buffer();
      for (int64_t item = begin; item < end; ++item) score_tile(item, buffer, normalised, 0);
    });
    const int64_t rank_grain = std::max<int64_t>(1, kGrainElements / 8 / std::max<int64_t>(na_, 1));
    parallel_chunks(batch_, rank_grain, [&](int64_t begin, int64_t end) {
      RankScratch<acc_t> scratch;
      for (int64_t b = begin; b < end; ++b) rank_row(b, scratch);
    });
  }

 private:
  using NormaliseRow = bool (*)(const scalar_t*, acc_t*, int64_t);
  using FirstArgmax = int64_t (*)(const acc_t*, int64_t, acc_t*);

  const Layout layout_;
  const int64_t batch_, num_tokens_, channels_, na_, nb_, r_, nu_;
  const int64_t rows_;  // non-protected tokens per batch row
  const scalar_t* metric_;
  const at::TensorOptions options_;
  int64_t *unm_idx_, *src_idx_, *dst_idx_;
  const NormaliseRow normalise_row_;
  const FirstArgmax first_argmax_;
  int64_t bands_, band_;  // bands per batch row, A rows per band
  int64_t rows_per_tile_, row_groups_;  // batch rows per tile, tiles of batch rows
  std::vector<uint8_t> has_nan_;      // [batch, N]
  std::vector<int64_t> first_nan_b_;  // [batch]
  std::vector<acc_t> best_score_;     // [batch, nA]
  std::vector<int64_t> best_b_;       // [batch, nA]
};

// The A tokens in order when nothing merges (no scores needed).
void fill_unmerged_in_order(const Layout& layout, int64_t batch, int64_t* unm_idx) {
  const int64_t na = layout.num_a();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < na; ++k) unm_idx[b * na + k] = layout.a_position(k);
  }
}

// The outputs of a match of `layout` (allocated here), the calls with nothing to rank (an empty batch: the
// tiling divides by it; r = 0), and the dtype dispatch: fill(data, accum, unm_idx, src_idx, dst_idx) gets the
// rest. The op layer sends neither an empty batch nor r = 0; direct calls may.
template <class Fill>
std::tuple<at::Tensor, at::Tensor, at::Tensor> match_outputs(const at::Tensor& metric, const Layout& layout,
                                                             const Fill& fill) {
  const int64_t batch = metric.size(0);
  const auto index_options = metric.options().dtype(at::kLong);
  at::Tensor unm_idx = at::empty({batch, layout.num_unmerged()}, index_options);
  at::Tensor src_idx = at::empty({batch, layout.r}, index_options);
  at::Tensor dst_idx = at::empty({batch, layout.r}, index_options);
  if (batch == 0) return {unm_idx, src_idx, dst_idx};
  if (layout.r == 0) {
    fill_unmerged_in_order(layout, batch, unm_idx.mutable_data_ptr<int64_t>());
    return {unm_idx, src_idx, dst_idx};
  }
  dispatch_data_acc(metric.scalar_type(), acc_dtype(metric.scalar_type()), [&](auto data, auto accum) {
    fill(data, accum, unm_idx.mutable_data_ptr<int64_t>(), src_idx.mutable_data_ptr<int64_t>(),
         dst_idx.mutable_data_ptr<int64_t>());
  });
  return {unm_idx, src_idx, dst_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> match(const at::Tensor& metric_in, int64_t r, int64_t protected_tokens) {
  check_float("metric", metric_in, 3);
  const Layout layout = match_layout(metric_in.size(1), r, protected_tokens);
  const at::Tensor metric = metric_in.contiguous();
  return match_outputs(metric, layout, [&](auto data, auto accum, int64_t* unm_idx, int64_t* src_idx,
                                           int64_t* dst_idx) {
    Matcher<decltype(data), decltype(accum)> matcher(metric, layout, metric.size(0), unm_idx, src_idx, dst_idx);
    if (matcher.whole_rows()) {
      matcher.run_whole_rows();
    } else {
      matcher.run_by_stage();
    }
  });
}

// The values of a window table (as _validation.check_window_values): positions in [0, N), even in the even
// (A) slots and odd in the odd (B) slots, no A position twice.
void check_window_values(const int64_t* windows, int64_t count, const Layout& layout) {
  const int64_t num_tokens = layout.num_tokens;
  const auto [low, high] = std::minmax_element(windows, windows + count);
  TORCH_CHECK_VALUE(*low >= 0 && *high < num_tokens, "tome: windows must hold token positions in [0, N=",
                    num_tokens, "), got values in [", *low, ", ", *high, "]");
  for (int64_t k = 0; k < count; ++k) {
    TORCH_CHECK_VALUE(windows[k] % 2 == k % 2, "tome: windows must hold even (A) positions in its even slots and "
                      "odd (B) positions in its odd slots");
  }
  std::vector<uint8_t> listed(layout.num_a(), 0);
  for (int64_t k = 0; k < count; k += 2) {
    TORCH_CHECK_VALUE(!listed[windows[k] / 2]++, "tome: windows must list each A (even) position at most once");
  }
}

// Best B of every listed A token within its window, then rank_row per batch row.
template <class scalar_t, class acc_t>
void match_windows(const at::Tensor& metric, const int64_t* windows, int64_t num_windows, int64_t width,
                   const Layout& layout, int64_t batch, int64_t* unm_idx, int64_t* src_idx, int64_t* dst_idx) {
  const int64_t num_tokens = layout.num_tokens, channels = metric.size(2), na = layout.num_a(), half = width / 2;
  const scalar_t* data = metric.const_data_ptr<scalar_t>();
  const auto normalise_row = use_avx2() ? avx2::normalise_row<scalar_t, acc_t> : base::normalise_row<scalar_t, acc_t>;
  const auto dot = use_avx2() ? avx2::dot<acc_t> : base::dot<acc_t>;
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> best_score(batch * na, -std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> best_b(batch * na, 0);
  const int64_t window_work = (width + half * half) * std::max<int64_t>(channels, 1);
  parallel_chunks(batch * num_windows, std::max<int64_t>(1, kGrainElements / window_work), [&](int64_t begin,
                                                                                              int64_t end) {
    std::vector<acc_t> unit(width * channels);
    std::vector<uint8_t> has_nan(width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_windows;
      const int64_t* slots = windows + (item % num_windows) * width;
      for (int64_t s = 0; s < width; ++s) {
        has_nan[s] = normalise_row(data + (b * num_tokens + slots[s]) * channels, unit.data() + s * channels,
                                   channels);
      }
      for (int64_t i = 0; i < half; ++i) {
        // As torch.max over the window's B slots: the first maximum, or the first NaN score.
        acc_t best = 0;
        int64_t best_j = -1;
        for (int64_t j = 0; j < half && !(best_j >= 0 && std::isnan(best)); ++j) {
          const acc_t score = has_nan[2 * i] || has_nan[2 * j + 1]
                                  ? kNaN
                                  : dot(unit.data() + 2 * i * channels, unit.data() + (2 * j + 1) * channels,
                                        channels);
          if (best_j < 0 || score > best || std::isnan(score)) {
            best = score;
            best_j = j;
          }
        }
        const int64_t a = b * na + slots[2 * i] / 2;
        best_score[a] = best;
        best_b[a] = layout.b_slot(slots[2 * best_j + 1]);
      }
    }
  });
  parallel_chunks(batch, std::max<int64_t>(1, kGrainElements / 8 / std::max<int64_t>(na, 1)),
                  [&](int64_t begin, int64_t end) {
                    RankScratch<acc_t> scratch;
                    for (int64_t b = begin; b < end; ++b) {
                      rank_row(layout, true, best_score.data() + b * na, best_b.data() + b * na, scratch,
                               unm_idx + b * layout.num_unmerged(), src_idx + b * layout.r, dst_idx + b * layout.r);
                    }
                  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_match(const at::Tensor& metric_in, const at::Tensor& windows_in,
                                                            int64_t r) {
  check_float("metric", metric_in, 3);
  TORCH_CHECK_VALUE(windows_in.device() == metric_in.device(), "tome: tensors must be on one device, got metric ",
                    metric_in.device(), ", windows ", windows_in.device());
  const Layout layout = window_match_layout(metric_in.size(1), windows_in, r);
  const at::Tensor metric = metric_in.contiguous(), windows = windows_in.contiguous();
  check_window_values(windows.const_data_ptr<int64_t>(), windows.numel(), layout);
  return match_outputs(metric, layout, [&](auto data, auto accum, int64_t* unm_idx, int64_t* src_idx,
                                           int64_t* dst_idx) {
    match_windows<decltype(data), decltype(accum)>(metric, windows.const_data_ptr<int64_t>(), windows.size(0),
                                                   windows.size(1), layout, metric.size(0), unm_idx, src_idx, dst_idx);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CPU, m) {
  m.impl("_native_match", &match);
  m.impl("_native_window_match", &window_match);
}

}  // namespace tome::cpu
