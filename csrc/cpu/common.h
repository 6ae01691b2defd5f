// Helpers shared by the C++ CPU kernels: dtype dispatch, an exception-safe OpenMP loop, and the validated,
// inverted index triple of one ToMe step.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <vector>

#include <tome/layout.h>

namespace tome::cpu {

// fp32 accumulation for half types and fp32, fp64 for fp64 (reference._accumulate_dtype).
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float(const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "tome: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "tome: ", name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "tome: ", name, " must have shape ", expected, ", got ", t.sizes());
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

// The index triple of one ToMe step for every batch row, checked and inverted. Output token o of row b is
// made of its representative rep(b, o) and, when o is a B token, the sources merged into it (src_idx order).
// The checks make every kernel memory-safe when a _native_* op is called directly: positions in range and
// of the right parity, and every A token in unm_idx or src_idx exactly once, so the input tokens are
// partitioned among the output tokens (each output row is written, and parallel scatters write disjoint rows).
class Groups {
 public:
  Groups(const at::Tensor& unm_idx, const at::Tensor& src_idx, const at::Tensor& dst_idx, int64_t batch,
         int64_t num_tokens, int64_t protected_tokens)
      : layout_{num_tokens, protected_tokens, src_idx.dim() == 2 ? src_idx.size(1) : 0}, batch_(batch) {
    for (const auto* t : {&unm_idx, &src_idx, &dst_idx}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == batch,
                  "tome: index tensors must be int64 [batch=", batch, ", k], got ", t->scalar_type(), " ",
                  t->sizes());
    }
    TORCH_CHECK(src_idx.sizes() == dst_idx.sizes(), "tome: src_idx and dst_idx must have one shape, got ",
                src_idx.sizes(), " and ", dst_idx.sizes());
    TORCH_CHECK(protected_tokens >= 0 && protected_tokens <= num_tokens, "tome: protected must be in [0, N=",
                num_tokens, "], got ", protected_tokens);
    TORCH_CHECK(layout_.r <= (num_tokens - protected_tokens) / 2 &&
                    unm_idx.size(1) == layout_.num_unmerged(),
                "tome: unm_idx/src_idx (", unm_idx.size(1), " + ", layout_.r, " A tokens) do not fit N=",
                num_tokens, " tokens with protected=", protected_tokens);
    unm_ = unm_idx.contiguous();
    const at::Tensor src = src_idx.contiguous(), dst = dst_idx.contiguous();
    const int64_t nu = layout_.num_unmerged(), r = layout_.r, nb = layout_.num_b();
    const int64_t *unm = unm_.data_ptr<int64_t>(), *src_p = src.data_ptr<int64_t>(), *dst_p = dst.data_ptr<int64_t>();
    std::vector<uint8_t> seen(num_tokens);
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t k = 0; k < nu + r; ++k) {
        const int64_t p = k < nu ? unm[b * nu + k] : src_p[b * r + k - nu];
        TORCH_CHECK(p >= protected_tokens && p < num_tokens && p % 2 == 0 && !seen[p],
                    "tome: unm_idx and src_idx must hold every even (A) token position in [protected=",
                    protected_tokens, ", N=", num_tokens, ") once; got ", p, " in batch row ", b);
        seen[p] = 1;
      }
      for (int64_t k = 0; k < r; ++k) {
        const int64_t p = dst_p[b * r + k];
        TORCH_CHECK(p >= protected_tokens && p < num_tokens && p % 2 == 1, "tome: dst_idx must hold odd (B) ",
                    "token positions in [protected=", protected_tokens, ", N=", num_tokens, "), got ", p,
                    " in batch row ", b);
      }
    }
    offsets_.resize(batch * (nb + 1));
    members_.resize(batch * r);
    for (int64_t b = 0; b < batch; ++b) {
      invert_destinations(layout_, src_p + b * r, dst_p + b * r, offsets_.data() + b * (nb + 1),
                          members_.data() + b * r);
    }
  }

  const Layout& layout() const { return layout_; }
  int64_t batch() const { return batch_; }
  int64_t num_out() const { return layout_.num_out(); }
  int64_t representative(int64_t b, int64_t o) const {
    return layout_.representative(o, unm_.const_data_ptr<int64_t>() + b * layout_.num_unmerged());
  }
  // Sources merged into output token o of row b: [*first, *last), empty unless o is a B token.
  const int64_t* sources_begin(int64_t b, int64_t o) const { return source(b, o, 0); }
  const int64_t* sources_end(int64_t b, int64_t o) const { return source(b, o, 1); }

 private:
  const int64_t* source(int64_t b, int64_t o, int64_t end) const {
    const int64_t first_b_out = layout_.b_output(0);
    const int64_t slot = o < first_b_out ? 0 : o - first_b_out + end;
    const int64_t offset = o < first_b_out ? 0 : offsets_[b * (layout_.num_b() + 1) + slot];
    return members_.data() + b * layout_.r + offset;
  }

  Layout layout_;
  int64_t batch_;
  at::Tensor unm_;
  std::vector<int32_t> offsets_;  // [batch, num_b + 1]
  std::vector<int64_t> members_;  // [batch, r]
};

}  // namespace tome::cpu
