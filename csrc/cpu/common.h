// Helpers shared by the C++ CPU kernels: dtype dispatch, an exception-safe OpenMP loop, and the validated,
// inverted index triple of one ToMe step.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <vector>

#include <tome/checks.h>
#include <tome/layout.h>

namespace tome::cpu {

// fp32 accumulation for half types and fp32, fp64 for fp64 (reference._accumulate_dtype).
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "tome: ", name, " must have shape ", expected, ", got ", t.sizes());
}

// Calls f(scalar_t{}, acc_t{}) for data of dtype `data` accumulated in `acc` (fp32 or fp64): the data and
// the accumulation dtype are separate because pos may have another dtype than x. Callers have checked the
// dtypes (check_float), so the dispatch cannot fail.
template <class F>
void dispatch_data_acc(at::ScalarType data, at::ScalarType acc, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data, "tome", [&] {
    if (acc == at::kDouble) {
      f(scalar_t{}, double{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

// Token sizes (contiguous, any float dtype), checked in their own dtype before any cast, with the messages of
// tome_kernels/_validation.py (check_size_values): finite and > 0 to be merged (a weight of 0 or less has no
// mean), >= 0 for attention (log 0 = -inf masks the key); and, when they are wider than the accumulation dtype
// `acc` of the data (float64 sizes, float32 accumulation), nonzero sizes inside its normal range, so that the
// cast keeps them finite and positive.
inline void check_size_values(const at::Tensor& size, at::ScalarType acc, bool allow_zero) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, size.scalar_type(), "check_size_values", [&] {
    const scalar_t* data = size.const_data_ptr<scalar_t>();
    double low = std::numeric_limits<double>::infinity(), low_nonzero = low, high = 0;
    int64_t non_finite = 0;
    bool valid = true;
    for (int64_t i = 0; i < size.numel(); ++i) {
      const double s = static_cast<double>(data[i]);
      if (std::isnan(s) || s < low) low = std::isnan(low) ? low : s;
      if (s != 0 && s < low_nonzero) low_nonzero = s;
      if (s > high) high = s;
      non_finite += !std::isfinite(s);
      valid = valid && std::isfinite(s) && (allow_zero ? s >= 0 : s > 0);
    }
    TORCH_CHECK_VALUE(valid, "tome: size must be finite and ", allow_zero ? ">= 0" : "> 0", ", got min ", low, ", ",
                      non_finite, " non-finite");
    if (size.scalar_type() == at::kDouble && acc == at::kFloat) {
      constexpr double tiny = std::numeric_limits<float>::min(), largest = std::numeric_limits<float>::max();
      TORCH_CHECK_VALUE(high <= largest && low_nonzero >= tiny, "tome: size values must fit float32, the "
                        "accumulation dtype of float32, float16 and bfloat16 data: got min ", low_nonzero, ", max ",
                        high, ", outside [", tiny, ", ", largest, "]; pass the data as float64 to merge such sizes");
    }
  });
}

// Elements (about) one thread should get before an OpenMP fork pays off (ATen's GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

// f(begin, end) on contiguous chunks of [0, n) over torch's intra-op threads (OpenMP), serially when there
// are fewer than 2 * grain items. Chunks depend only on n and the thread count, and every kernel computes
// each output element in one fixed order, so results do not depend on the thread count. An exception in
// a chunk is rethrown after the region (a throw escaping an OpenMP region terminates the process); nested
// ATen ops run single-threaded inside it.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(grain, 1));
  if (threads <= 1 || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
  std::exception_ptr error;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
#pragma omp parallel num_threads(threads)
  {
    const int64_t count = omp_get_num_threads(), chunk = (n + count - 1) / count;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) {
      try {
        c10::ParallelGuard guard(true);
        f(begin, end);
      } catch (...) {
        if (!failed.test_and_set()) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// The index triple of one ToMe step for every batch row, checked, then described per token: the output
// token each of the N tokens ends up in (group), whether it merged with nothing, represents a merged group
// (its B token) or is a source, and the members of every merged group in ascending position (the order in
// which the reference's scatter_add sums them). The checks make every kernel memory-safe when a _native_*
// op is called directly: positions in range and of the right parity, every A token in unm_idx or src_idx
// exactly once, so the N tokens are partitioned among the output tokens (each output row is written once).
class Groups {
 public:
  enum Role : uint8_t { kAlone, kRepresentative, kSource };

  Groups(const at::Tensor& unm_idx, const at::Tensor& src_idx, const at::Tensor& dst_idx, int64_t batch,
         int64_t num_tokens, int64_t protected_tokens)
      : layout_(check_index_shapes(unm_idx, src_idx, dst_idx, batch, num_tokens, protected_tokens)), batch_(batch) {
    const at::Tensor unm_t = unm_idx.contiguous(), src_t = src_idx.contiguous(), dst_t = dst_idx.contiguous();
    const int64_t nu = layout_.num_unmerged(), r = layout_.r, nb = layout_.num_b();
    const int64_t *unm = unm_t.const_data_ptr<int64_t>(), *src = src_t.const_data_ptr<int64_t>(),
                  *dst = dst_t.const_data_ptr<int64_t>();
    std::vector<uint8_t> seen(num_tokens);
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t k = 0; k < nu + r; ++k) {
        const int64_t p = k < nu ? unm[b * nu + k] : src[b * r + k - nu];
        TORCH_CHECK_VALUE(p >= protected_tokens && p < num_tokens && p % 2 == 0 && !seen[p],
                    "tome: unm_idx and src_idx must hold every even (A) token position in [protected=",
                    protected_tokens, ", N=", num_tokens, ") once; got ", p, " in batch row ", b);
        seen[p] = 1;
      }
      for (int64_t k = 0; k < r; ++k) {
        const int64_t p = dst[b * r + k];
        TORCH_CHECK_VALUE(p >= protected_tokens && p < num_tokens && p % 2 == 1, "tome: dst_idx must hold odd (B) ",
                    "token positions in [protected=", protected_tokens, ", N=", num_tokens, "), got ", p,
                    " in batch row ", b);
      }
    }

    group_.resize(batch * num_tokens);
    role_.assign(batch * num_tokens, kAlone);
    merged_group_.resize(batch * num_tokens);
    member_offsets_.push_back(0);
    std::vector<int32_t> offsets(nb + 1);
    std::vector<int64_t> sources(r);
    for (int64_t b = 0; b < batch; ++b) {
      fill_groups(layout_, unm + b * nu, src + b * r, dst + b * r, group_.data() + b * num_tokens);
      invert_destinations(layout_, src + b * r, dst + b * r, offsets.data(), sources.data());
      for (int64_t j = 0; j < nb; ++j) {
        if (offsets[j] == offsets[j + 1]) continue;
        const auto first = static_cast<int64_t>(members_.size());
        members_.push_back(layout_.b_position(j));
        members_.insert(members_.end(), sources.begin() + offsets[j], sources.begin() + offsets[j + 1]);
        std::sort(members_.begin() + first, members_.end());
        for (auto m = members_.begin() + first; m != members_.end(); ++m) role_[b * num_tokens + *m] = kSource;
        role_[b * num_tokens + layout_.b_position(j)] = kRepresentative;
        merged_group_[b * num_tokens + layout_.b_position(j)] = static_cast<int64_t>(merged_.size());
        merged_.push_back(b * layout_.num_out() + layout_.b_output(j));
        member_offsets_.push_back(static_cast<int64_t>(members_.size()));
      }
    }
  }

  const Layout& layout() const { return layout_; }
  int64_t batch() const { return batch_; }
  int64_t num_tokens() const { return layout_.num_tokens; }
  int64_t num_out() const { return layout_.num_out(); }
  // Token n of batch row b, as t = b * N + n: the output token (b * num_out + o) it ends up in, and its role.
  int64_t output_of(int64_t t) const { return (t / layout_.num_tokens) * layout_.num_out() + group_[t]; }
  Role role(int64_t t) const { return static_cast<Role>(role_[t]); }
  // Merged group k: output token (b * num_out + o), and its members' positions n in ascending order.
  int64_t num_merged() const { return static_cast<int64_t>(merged_.size()); }
  int64_t merged_group_of(int64_t t) const { return merged_group_[t]; }  // t must be a kRepresentative
  int64_t merged_output(int64_t k) const { return merged_[k]; }
  const int64_t* members_begin(int64_t k) const { return members_.data() + member_offsets_[k]; }
  const int64_t* members_end(int64_t k) const { return members_.data() + member_offsets_[k + 1]; }

 private:
  Layout layout_;
  int64_t batch_;
  std::vector<int64_t> group_;           // [batch, N]: output token of every token
  std::vector<uint8_t> role_;            // [batch, N]: Role
  std::vector<int64_t> merged_group_;    // [batch, N]: the merged group a representative stands for
  std::vector<int64_t> merged_;          // [merged groups]: b * num_out + o
  std::vector<int64_t> member_offsets_;  // [merged groups + 1]
  std::vector<int64_t> members_;         // positions, grouped, ascending within a group
};

}  // namespace tome::cpu
