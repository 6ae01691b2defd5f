// Bipartite soft matching (reference.match) on CUDA.
//
// 1. norm_kernel: max(||x||, 1e-12) of every token (one warp per token).
// 2. best_partner_kernel: tiled dot products of normalised A rows against normalised B rows with a running
//    row max / argmax in registers; the [nA, nB] score matrix is never stored. Where batch x A tiles is small
//    (DETR: 2 x 9 blocks), the B tokens are split across blocks too (up to ~kTargetBlocks blocks), and
//    combine_kernel keeps each A token's best over the splits (ties: the lower split, i.e. the lower B index).
// 3. rank_kernel: the stable descending rank of each A token's best score, rank_i = #{j : s_j > s_i or
//    (s_j == s_i and j < i)}: O(nA) per thread, O(nA^2) per row. That is deterministic, has no size limit
//    and costs less than step 2 (O(nA * nB * C)), so a sort would not pay for itself at ToMe's token
//    counts. Ranks below r give src_idx / dst_idx directly; with protected == 0 the rest is unm_idx in
//    rank order.
// 4. unmerged_order_kernel (protected >= 1): unmerged A tokens in ascending position, slot = number of
//    unmerged A tokens before it.
// With r == 0 nothing is ranked: unm_idx is every A token in ascending position (reference.py).
//
// Windowed matching (reference.window_match) replaces step 2 by window_partner_kernel (one warp per listed A
// token against the B slots of its window); A tokens no window lists keep a best score of -inf, so they rank
// after every listed one and never merge (r <= the listed count). unm_idx is always in ascending position
// (step 4).
#include <algorithm>

#include "common.cuh"

namespace tome::cuda {
namespace {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
constexpr int kMatchTile = 64;      // A rows and B rows per block
constexpr int kMatchDepth = 16;     // channels per shared-memory stage
constexpr int kMatchThreads = 256;  // 16 x 16 threads, each owning 4 x 4 scores
constexpr int kRankThreads = 256;
constexpr int64_t kTargetBlocks = 264;  // B splits stop at two waves of a 132-SM GPU

// Descending best-score order with NaN above every number (as torch.max and torch.sort): a total order,
// so the ranks are a permutation and the indices stay in range even for a NaN metric.
template <typename T>
__device__ __forceinline__ bool score_above(T a, T b) {
  return a > b || (isnan(a) && !isnan(b));
}

template <typename T>
__device__ __forceinline__ bool score_equal(T a, T b) {
  return a == b || (isnan(a) && isnan(b));
}

template <typename T>
__device__ __forceinline__ bool ranks_before(T score_j, int64_t j, T score_i, int64_t i) {
  return score_above(score_j, score_i) || (score_equal(score_j, score_i) && j < i);
}

template <typename scalar_t>
__global__ void norm_kernel(const scalar_t* metric, int64_t rows, int64_t channels, acc_t<scalar_t>* norm) {
  using acc = acc_t<scalar_t>;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps
  acc sum = 0;
  for (int64_t c = lane; c < channels; c += kWarpSize) {
    const acc value = static_cast<acc>(metric[row * channels + c]);
    sum += value * value;
  }
  sum = warp_sum(sum);
  if (lane == 0) norm[row] = max(sqrt(sum), static_cast<acc>(kNormEps));
}

// metric[pos, c] / norm[pos] of token `pos` of one batch row, 0 when outside the tile's valid range.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> normalised(const scalar_t* rows, const acc_t<scalar_t>* norm,
                                                      int64_t pos, int64_t c, int64_t channels, bool valid) {
  return valid ? static_cast<acc_t<scalar_t>>(rows[pos * channels + c]) / norm[pos] : acc_t<scalar_t>(0);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMatchThreads)
    best_partner_kernel(const scalar_t* metric, const acc_t<scalar_t>* norm, Layout layout, int64_t channels,
                        int64_t a_tiles, int64_t splits, int64_t b_per_split, acc_t<scalar_t>* best_score,
                        int32_t* best_b) {
  using acc = acc_t<scalar_t>;
  constexpr int kSide = 16;                 // threads along each tile side
  constexpr int kPer = kMatchTile / kSide;  // 4 rows x 4 columns per thread
  static_assert(kSide * kSide == kMatchThreads && kMatchTile % kSide == 0);
  // Channel-major tiles: a warp reads 2 distinct A entries (broadcast) and 16 consecutive B entries.
  __shared__ acc a_tile[kMatchDepth][kMatchTile + 1];
  __shared__ acc b_tile[kMatchDepth][kMatchTile + 1];

  const int64_t batch = blockIdx.x / (a_tiles * splits);
  const int64_t split = blockIdx.x / a_tiles % splits;
  const int64_t a0 = (blockIdx.x % a_tiles) * kMatchTile;
  const int64_t num_a = layout.num_a();
  const int64_t b_begin = split * b_per_split, num_b = std::min(layout.num_b(), b_begin + b_per_split);
  const scalar_t* rows = metric + batch * layout.num_tokens * channels;
  const acc* row_norm = norm + batch * layout.num_tokens;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;

  acc best[kPer];
  int32_t best_j[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    best[i] = -std::numeric_limits<acc>::infinity();
    best_j[i] = 0;
  }

  for (int64_t b0 = b_begin; b0 < num_b; b0 += kMatchTile) {
    acc dot[kPer][kPer] = {};
    for (int64_t c0 = 0; c0 < channels; c0 += kMatchDepth) {
      for (int e = threadIdx.x; e < kMatchTile * kMatchDepth; e += kMatchThreads) {
        const int row = e / kMatchDepth, k = e % kMatchDepth;
        const int64_t c = c0 + k;
        a_tile[k][row] = normalised(rows, row_norm, layout.a_position(a0 + row), c, channels,
                                    a0 + row < num_a && c < channels);
        b_tile[k][row] = normalised(rows, row_norm, layout.b_position(b0 + row), c, channels,
                                    b0 + row < num_b && c < channels);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kMatchDepth; ++k) {
        acc a_frag[kPer], b_frag[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          a_frag[i] = a_tile[k][ty + kSide * i];
          b_frag[i] = b_tile[k][tx + kSide * i];
        }
#pragma unroll
        for (int i = 0; i < kPer; ++i)
#pragma unroll
          for (int j = 0; j < kPer; ++j) dot[i][j] += a_frag[i] * b_frag[j];
      }
      __syncthreads();
    }
    // Columns arrive in ascending order per thread, so a strict comparison keeps the first maximum.
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t col = b0 + tx + kSide * j;
        if (col < num_b && score_above(dot[i][j], best[i])) {
          best[i] = dot[i][j];
          best_j[i] = static_cast<int32_t>(col);
        }
      }
  }

  // Combine the 16 threads of each row (one half-warp); ties go to the lower B index.
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int offset = kSide / 2; offset > 0; offset /= 2) {
      const acc other = __shfl_xor_sync(kFullMask, best[i], offset);
      const int32_t other_j = __shfl_xor_sync(kFullMask, best_j[i], offset);
      if (score_above(other, best[i]) || (score_equal(other, best[i]) && other_j < best_j[i])) {
        best[i] = other;
        best_j[i] = other_j;
      }
    }
    const int64_t a = a0 + ty + kSide * i;
    if (tx == 0 && a < num_a) {
      best_score[(batch * splits + split) * num_a + a] = best[i];
      best_b[(batch * splits + split) * num_a + a] = best_j[i];
    }
  }
}

// best over the B splits of [batch, splits, num_a] partial results; a later split wins only when strictly above.
template <typename acc>
__global__ void combine_kernel(const acc* split_score, const int32_t* split_b, int64_t num_a, int64_t splits,
                               int64_t items, acc* best_score, int32_t* best_b) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (item >= items) return;
  const int64_t batch = item / num_a, a = item % num_a;
  const int64_t first = batch * splits * num_a + a;
  acc best = split_score[first];
  int32_t partner = split_b[first];
  for (int64_t split = 1; split < splits; ++split) {
    const acc score = split_score[first + split * num_a];
    if (score_above(score, best)) {
      best = score;
      partner = split_b[first + split * num_a];
    }
  }
  best_score[item] = best;
  best_b[item] = partner;
}

// One warp per (batch row, listed A token): cosine similarity with each B slot of its window in slot order, so
// the strict comparison keeps the first maximum (and the first NaN, as torch.max). All lanes hold the same sum.
template <typename scalar_t>
__global__ void window_partner_kernel(const scalar_t* metric, const acc_t<scalar_t>* norm, const int64_t* windows,
                                      Layout layout, int64_t channels, int64_t num_windows, int64_t width,
                                      int64_t items, acc_t<scalar_t>* best_score, int32_t* best_b) {
  using acc = acc_t<scalar_t>;
  const int64_t item = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (item >= items) return;  // whole warps
  const int64_t a_slots = num_windows * (width / 2);
  const int64_t batch = item / a_slots, a_slot = item % a_slots;
  const int64_t* window = windows + a_slot / (width / 2) * width;
  const int64_t a_pos = window[2 * (a_slot % (width / 2))];
  CUDA_KERNEL_ASSERT_MSG(layout.is_a_position(a_pos), "tome: windows holds a position that is not an A token");
  const scalar_t* rows = metric + batch * layout.num_tokens * channels;
  const acc* row_norm = norm + batch * layout.num_tokens;
  acc best = -std::numeric_limits<acc>::infinity();
  int64_t best_pos = window[1];
  for (int64_t j = 1; j < width; j += 2) {
    const int64_t b_pos = window[j];
    CUDA_KERNEL_ASSERT_MSG(layout.is_b_position(b_pos), "tome: windows holds a position that is not a B token");
    acc dot = 0;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      dot += normalised(rows, row_norm, a_pos, c, channels, true) *
             normalised(rows, row_norm, b_pos, c, channels, true);
    }
    dot = warp_sum(dot);
    if (score_above(dot, best)) {
      best = dot;
      best_pos = b_pos;
    }
  }
  if (lane == 0) {
    const int64_t a = (a_pos - layout.first_a()) / 2;
    best_score[batch * layout.num_a() + a] = best;
    best_b[batch * layout.num_a() + a] = static_cast<int32_t>(layout.b_slot(best_pos));
  }
}

// unm_in_rank_order: write the unmerged A tokens too, in rank order (protected == 0 of bipartite matching);
// otherwise unmerged_order_kernel writes them in ascending position.
template <typename acc>
__global__ void rank_kernel(const acc* best_score, const int32_t* best_b, Layout layout, int64_t tiles,
                            bool unm_in_rank_order, int32_t* rank, int64_t* unm_idx, int64_t* src_idx,
                            int64_t* dst_idx) {
  const int64_t batch = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  const int64_t num_a = layout.num_a(), r = layout.r;
  if (i >= num_a) return;
  const acc* scores = best_score + batch * num_a;
  const acc score = scores[i];
  int64_t rank_i = 0;
  for (int64_t j = 0; j < num_a; ++j) rank_i += ranks_before(scores[j], j, score, i);  // warp-wide broadcast loads
  rank[batch * num_a + i] = static_cast<int32_t>(rank_i);
  if (rank_i < r) {
    src_idx[batch * r + rank_i] = layout.a_position(i);
    dst_idx[batch * r + rank_i] = layout.b_position(best_b[batch * num_a + i]);
  } else if (unm_in_rank_order) {
    unm_idx[batch * layout.num_unmerged() + rank_i - r] = layout.a_position(i);
  }
}

__global__ void unmerged_order_kernel(const int32_t* rank, Layout layout, int64_t tiles, int64_t* unm_idx) {
  const int64_t batch = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  const int64_t num_a = layout.num_a(), r = layout.r;
  if (i >= num_a) return;
  const int32_t* row_rank = rank + batch * num_a;
  if (row_rank[i] < r) return;
  int64_t slot = 0;
  for (int64_t j = 0; j < i; ++j) slot += row_rank[j] >= r;
  unm_idx[batch * layout.num_unmerged() + slot] = layout.a_position(i);
}

// The stages every match shares: outputs, the no-merge case, norms and ranking. find_best(scalar_t{}, norm,
// best_score, best_b) launches what fills best_score [batch, nA] and best_b (B index) [batch, nA] in between.
template <typename FindBest>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ranked_match(const at::Tensor& metric_in, const Layout& layout,
                                                            bool unm_in_rank_order, FindBest find_best) {
  const int64_t batch = metric_in.size(0), num_tokens = metric_in.size(1), channels = metric_in.size(2);
  TORCH_CHECK_VALUE(num_tokens <= std::numeric_limits<int32_t>::max(), "tome: N=", num_tokens, " tokens is too many");
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const at::Tensor metric = metric_in.contiguous();
  const int64_t num_a = layout.num_a();

  const auto long_options = metric.options().dtype(at::kLong);
  at::Tensor unm_idx = at::empty({batch, layout.num_unmerged()}, long_options);
  at::Tensor src_idx = at::empty({batch, layout.r}, long_options);
  at::Tensor dst_idx = at::empty({batch, layout.r}, long_options);
  if (batch == 0 || num_a == 0) return {unm_idx, src_idx, dst_idx};
  if (layout.r == 0) {  // no merges: every A token stays, in ascending position
    unm_idx.copy_(at::arange(layout.first_a(), num_tokens, 2, long_options).expand({batch, num_a}));
    return {unm_idx, src_idx, dst_idx};
  }

  const auto acc_options = metric.options().dtype(acc_dtype(metric.scalar_type()));
  const auto int_options = metric.options().dtype(at::kInt);
  const at::Tensor norm = at::empty({batch, num_tokens}, acc_options);
  const at::Tensor best_score = at::empty({batch, num_a}, acc_options);
  const at::Tensor best_b = at::empty({batch, num_a}, int_options);
  const at::Tensor rank = at::empty({batch, num_a}, int_options);
  const int64_t rank_tiles = ceil_div(num_a, kRankThreads);

  TOME_DISPATCH_FLOATS(metric.scalar_type(), "tome_match_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int kNormThreads = 256;
    launch(norm_kernel<scalar_t>, ceil_div(batch * num_tokens, kNormThreads / kWarpSize), kNormThreads, 0,
           metric.const_data_ptr<scalar_t>(), batch * num_tokens, channels, norm.data_ptr<acc>());
    find_best(scalar_t{}, metric, norm, best_score, best_b);
    launch(rank_kernel<acc>, batch * rank_tiles, kRankThreads, 0, best_score.const_data_ptr<acc>(),
           best_b.const_data_ptr<int32_t>(), layout, rank_tiles, unm_in_rank_order, rank.data_ptr<int32_t>(),
           unm_idx.data_ptr<int64_t>(), src_idx.data_ptr<int64_t>(), dst_idx.data_ptr<int64_t>());
  });
  if (!unm_in_rank_order) {
    launch(unmerged_order_kernel, batch * rank_tiles, kRankThreads, 0, rank.const_data_ptr<int32_t>(), layout,
           rank_tiles, unm_idx.data_ptr<int64_t>());
  }
  return {unm_idx, src_idx, dst_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> match(const at::Tensor& metric_in, int64_t r,
                                                     int64_t protected_tokens) {
  check_float(metric_in, "metric", 3);
  const Layout layout = match_layout(metric_in.size(1), r, protected_tokens);
  const auto find_best = [&](auto scalar, const at::Tensor& metric, const at::Tensor& norm,
                             const at::Tensor& best_score, const at::Tensor& best_b) {
    using scalar_t = decltype(scalar);
    using acc = acc_t<scalar_t>;
    const int64_t batch = metric.size(0), channels = metric.size(2), num_a = layout.num_a();
    const int64_t a_tiles = ceil_div(num_a, kMatchTile);
    const int64_t b_tiles = std::max(ceil_div(layout.num_b(), kMatchTile), int64_t{1});
    const int64_t wanted = std::min(ceil_div(kTargetBlocks, batch * a_tiles), b_tiles);
    const int64_t b_per_split = ceil_div(b_tiles, wanted) * kMatchTile;
    const int64_t splits = std::max(ceil_div(layout.num_b(), b_per_split), int64_t{1});
    const at::Tensor split_score = splits > 1 ? at::empty({batch, splits, num_a}, best_score.options()) : best_score;
    const at::Tensor split_b = splits > 1 ? at::empty({batch, splits, num_a}, best_b.options()) : best_b;
    launch(best_partner_kernel<scalar_t>, batch * a_tiles * splits, kMatchThreads, 0,
           metric.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc>(), layout, channels, a_tiles, splits,
           b_per_split, split_score.data_ptr<acc>(), split_b.data_ptr<int32_t>());
    if (splits > 1) {
      launch(combine_kernel<acc>, ceil_div(batch * num_a, kRankThreads), kRankThreads, 0,
             split_score.const_data_ptr<acc>(), split_b.const_data_ptr<int32_t>(), num_a, splits, batch * num_a,
             best_score.data_ptr<acc>(), best_b.data_ptr<int32_t>());
    }
  };
  return ranked_match(metric_in, layout, protected_tokens == 0, find_best);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_match(const at::Tensor& metric_in, const at::Tensor& windows_in,
                                                            int64_t r) {
  check_float(metric_in, "metric", 3);
  check_device(windows_in, "windows", metric_in);
  const Layout layout = window_match_layout(metric_in.size(1), windows_in, r);
  const at::Tensor windows = windows_in.contiguous();
  const auto find_best = [&](auto scalar, const at::Tensor& metric, const at::Tensor& norm,
                             const at::Tensor& best_score, const at::Tensor& best_b) {
    using scalar_t = decltype(scalar);
    using acc = acc_t<scalar_t>;
    // Unlisted A tokens rank last; B index 0 keeps dst_idx a B position even for a table that repeats an A
    // position (unchecked on the GPU), where an unlisted A token could rank below r.
    best_score.fill_(-std::numeric_limits<double>::infinity());
    best_b.zero_();
    const int64_t num_windows = windows.size(0), width = windows.size(1);
    const int64_t items = metric.size(0) * num_windows * (width / 2);
    constexpr int kWindowThreads = 256;
    launch(window_partner_kernel<scalar_t>, ceil_div(items, kWindowThreads / kWarpSize), kWindowThreads, 0,
           metric.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc>(), windows.const_data_ptr<int64_t>(), layout,
           metric.size(2), num_windows, width, items, best_score.data_ptr<acc>(), best_b.data_ptr<int32_t>());
  };
  return ranked_match(metric_in, layout, false, find_best);
}

}  // namespace
}  // namespace tome::cuda

TORCH_LIBRARY_IMPL(tome, CUDA, m) {
  m.impl("_native_match", &tome::cuda::match);
  m.impl("_native_window_match", &tome::cuda::window_match);
}
