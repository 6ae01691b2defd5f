// Host-side argument checks shared by the C++ CPU and CUDA kernels: one clear ValueError / TypeError naming
// the argument (TORCH_CHECK_VALUE / _TYPE), before any kernel runs. The messages are those of
// tome_kernels/_validation.py, which checks the same before any backend runs: these repeat them for direct
// calls of the torch.ops.tome._native_* ops (docs/ARCHITECTURE.md: which layer checks what).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#include <tome/layout.h>

namespace tome {

// A float16 / bfloat16 / float32 / float64 tensor of `dim` dimensions.
inline void check_float(const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "tome: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "tome: ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

// q [B, H, Nq, D], k and v [B, H, Nk, D], of one float dtype.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float("q", q, 4);
  check_float("k", k, 4);
  check_float("v", v, 4);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "tome: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(
      k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
      "tome: attention shapes must be q [B, H, Nq, D], k and v [B, H, Nk, D], got q ", q.sizes(), ", k ", k.sizes(),
      ", v ", v.sizes());
}

// `protected` leading tokens of N, in [0, N].
inline void check_protected(int64_t protected_tokens, int64_t num_tokens) {
  TORCH_CHECK_VALUE(protected_tokens >= 0 && protected_tokens <= num_tokens, "tome: protected must be in [0, N=",
                    num_tokens, "], got ", protected_tokens);
}

// The layout of a match of `num_tokens` tokens: r >= 0 (clamped to the merges that fit), protected checked.
inline Layout match_layout(int64_t num_tokens, int64_t r, int64_t protected_tokens) {
  TORCH_CHECK_VALUE(r >= 0, "tome: r must be >= 0, got ", r);
  check_protected(protected_tokens, num_tokens);
  return Layout{num_tokens, protected_tokens, clamp_r(r, num_tokens, protected_tokens)};
}

// The layout of a windowed match (protected = 0) with the window table `windows` (int64 [W, S], S even): r >= 0,
// clamped by window_r. The values (positions) need the data: each backend checks them itself or leaves them
// to the Python layer.
inline Layout window_match_layout(int64_t num_tokens, const at::Tensor& windows, int64_t r) {
  TORCH_CHECK_VALUE(windows.scalar_type() == at::kLong && windows.dim() == 2 && windows.size(1) % 2 == 0,
                    "tome: windows must be an int64 [num_windows, even width] tensor of token positions, got ",
                    windows.scalar_type(), " shape ", windows.sizes());
  TORCH_CHECK_VALUE(r >= 0, "tome: r must be >= 0, got ", r);
  return Layout{num_tokens, 0, window_r(r, num_tokens, windows.size(0), windows.size(1))};
}

// The shapes of an index triple for `num_tokens` input tokens in `batch` rows, and its layout (r =
// src_idx.size(1)). Each backend checks the values itself (cpu: Groups; cuda: on the device).
inline Layout check_index_shapes(const at::Tensor& unm_idx, const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                 int64_t batch, int64_t num_tokens, int64_t protected_tokens) {
  for (const auto& [t, name] : {std::pair{&unm_idx, "unm_idx"}, {&src_idx, "src_idx"}, {&dst_idx, "dst_idx"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == batch, "tome: ", name,
                      " must be an int64 [batch=", batch, ", k] tensor, got ", t->scalar_type(), " shape ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(src_idx.sizes() == dst_idx.sizes(), "tome: src_idx and dst_idx must have one shape, got ",
                    src_idx.sizes(), " and ", dst_idx.sizes());
  check_protected(protected_tokens, num_tokens);
  const Layout layout{num_tokens, protected_tokens, src_idx.size(1)};
  TORCH_CHECK_VALUE(layout.r <= (num_tokens - protected_tokens) / 2 && unm_idx.size(1) == layout.num_unmerged(),
                    "tome: unm_idx/src_idx (", unm_idx.size(1), " + ", layout.r, " A tokens) do not fit N=",
                    num_tokens, " tokens with protected=", protected_tokens);
  return layout;
}

}  // namespace tome
