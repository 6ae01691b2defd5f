// Proportional attention on CPU: softmax(q k^T * scale + log size) v and its backward (spec:
// reference.attention).
//
// Forward: ATen's fused CPU flash-attention kernel, with the bias as a float mask broadcast from
// [B, 1, 1, Nk], so neither the logits nor the probabilities are ever materialised. The mask is kept in the
// accumulation dtype (fp32 for half types: log(size) in bf16 would be off by up to 2^-8 relative), which the
// kernel accepts; it also returns the row log-sum-exp (fp32 for half types, fp64 for fp64). Each of its
// output rows is computed by one thread in one order: the bits do not depend on the thread count (tested).
//
// Backward: our own kernel (attention_blocks.inc), because ATen's gives other bits for other thread counts
// on some CPUs (its BLAS calls). One thread computes one (batch, head) from its q, k, v, grad_out and the
// forward's lse, query block after query block: probabilities and their gradients for a block of queries
// against every key, then grad_q of the block, and grad_k, grad_v accumulated over the blocks in order. The
// products are register-tiled loops whose every element is one chain of multiply-adds in a fixed order, so
// the bits depend on the instruction set (FMA or not: isa.h) but not on the thread count or the blocking.
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"
#include "isa.h"

namespace tome::cpu {
namespace {

// log(size) as a [B, 1, 1, Nk] mask in the accumulation dtype, or none.
std::optional<at::Tensor> log_size_mask(const std::optional<at::Tensor>& size, const at::Tensor& k) {
  if (!size.has_value()) return std::nullopt;
  check_float("size", *size, 2);
  check_shape("size", *size, {k.size(0), k.size(2)});
  check_size_values(size->contiguous(), acc_dtype(k.scalar_type()), /*allow_zero=*/true);
  const at::Tensor size_acc = size->to(acc_dtype(k.scalar_type())).contiguous();
  return size_acc.log().view({k.size(0), 1, 1, k.size(2)});
}

// The flash kernels take any strides but a unit stride in the head dimension: e.g. q, k, v sliced from one
// fused qkv projection go in without copies.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// ATen's flash CPU kernels divide by zero (SIGFPE) when heads, Nq or Nk is 0. Those calls get the defined
// result instead: no keys = every key masked = output 0, lse -inf (as the CUDA kernel), zero gradients.
bool empty_attention(const at::Tensor& q, const at::Tensor& k) { return q.size(1) == 0 || q.size(2) == 0 || k.size(2) == 0; }

std::tuple<at::Tensor, at::Tensor> attention_materialised(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& mask, double scale) {
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor logits = at::matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale);
  if (mask.has_value()) logits.add_(*mask);
  at::Tensor lse = logits.logsumexp(-1);
  // All-masked rows (lse -inf): probabilities exp(-inf - 0) = 0, so output 0.
  at::Tensor probs = logits.sub_(lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1)).exp_();
  return {at::matmul(probs, v.to(acc)).to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& mask, double scale) {
  const auto call = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return at::_scaled_dot_product_flash_attention_for_cpu(unit_last_stride(q), unit_last_stride(k),
                                                            unit_last_stride(v), /*dropout_p=*/0.0,
                                                            /*is_causal=*/false, mask, scale);
  };
  if (!at::isReducedFloatingType(q.scalar_type())) return call(q, k, v);
  try {
    return call(q, k, v);
  } catch (const c10::Error&) {
    // ATen's fp16/bf16 kernel packs its operands for AMX when the CPU has it, and refuses to when
    // ATEN_CPU_CAPABILITY holds ATen below AVX-512 ("pack_vnni2 is only supported when avx512 is
    // supported"): such calls run the kernel in fp32.
    auto [out, lse] = call(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat));
    return {out.to(q.scalar_type()), lse};
  }
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& size, double scale) {
  check_qkv(q, k, v);
  const auto mask = log_size_mask(size, k);
  if (empty_attention(q, k)) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(),
                     q.options().dtype(acc_dtype(q.scalar_type())))};
  }
  auto [out, lse] = flash_attention(q, k, v, mask, scale);
  // lse comes back as a [B, Nq, H] buffer viewed as [B, H, Nq]; both outputs become fresh contiguous buffers.
  out = out.contiguous();
  lse = lse.contiguous();
  // The kernel returns out 0 and lse 0 for a row whose logits are all -inf or all NaN. Batch rows whose
  // every key has size 0 (e.g. a padded image's masked keys) have no key to attend to: out 0 (as returned)
  // and lse -inf, set here. Any other lse of 0 (a NaN query, whose softmax is NaN, or a true lse of exactly
  // 0, which is rare) has its batch row recomputed with materialised logits, as reference.attention: only
  // those rows, so that a fully masked row costs no more than any other.
  at::Tensor redo = (lse == 0).flatten(1).any(1);
  if (mask.has_value()) {
    const at::Tensor no_keys = mask->isneginf().flatten(1).all(1);
    if (no_keys.any().item<bool>()) {
      lse.masked_fill_(no_keys.view({-1, 1, 1}), -std::numeric_limits<double>::infinity());
      redo.logical_and_(no_keys.logical_not());
    }
  }
  if (redo.any().item<bool>()) {
    const at::Tensor rows = redo.nonzero().squeeze(1);
    auto [row_out, row_lse] = attention_materialised(q.index_select(0, rows), k.index_select(0, rows),
                                                     v.index_select(0, rows),
                                                     mask.has_value() ? std::optional(mask->index_select(0, rows))
                                                                      : std::nullopt,
                                                     scale);
    out.index_copy_(0, rows, row_out);
    lse.index_copy_(0, rows, row_lse);
  }
  return {out, lse};
}

// Query blocks hold about kBlockScores scores of each of the two [queries, keys] buffers (256 KB in fp32),
// within these bounds: fewer queries per block would re-read grad_k and grad_v more often.
constexpr int64_t kBlockScores = 65536, kMinQueryBlock = 32, kMaxQueryBlock = 128;

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// One [B, H, N, D] input of any strides, read as acc_t.
template <class scalar_t, class acc_t>
struct HeadView {
  const scalar_t* data;
  int64_t stride[4];

  HeadView(const at::Tensor& t) : data(t.const_data_ptr<scalar_t>()) {
    for (int d = 0; d < 4; ++d) stride[d] = t.stride(d);
  }
  acc_t at(int64_t b, int64_t h, int64_t n, int64_t c) const {
    return static_cast<acc_t>(data[b * stride[0] + h * stride[1] + n * stride[2] + c * stride[3]]);
  }
  // dst[n * ld + c] for n < rows, c < dim, zeros for dim <= c < ld.
  void rows(int64_t b, int64_t h, int64_t count, int64_t dim, acc_t* dst, int64_t ld) const {
    for (int64_t n = 0; n < count; ++n) {
      for (int64_t c = 0; c < dim; ++c) dst[n * ld + c] = at(b, h, n, c);
      std::fill(dst + n * ld + dim, dst + (n + 1) * ld, acc_t(0));
    }
  }
  // The transpose: dst[c * ld + n] for c < dim, n < count, zeros for count <= n < ld.
  void columns(int64_t b, int64_t h, int64_t count, int64_t dim, acc_t* dst, int64_t ld) const {
    for (int64_t c = 0; c < dim; ++c) {
      for (int64_t n = 0; n < count; ++n) dst[c * ld + n] = at(b, h, n, c);
      std::fill(dst + c * ld + count, dst + (c + 1) * ld, acc_t(0));
    }
  }
};

// The backward's inputs and its contiguous [B, H, N, D] outputs.
template <class scalar_t, class acc_t>
struct AttentionGrad {
  HeadView<scalar_t, acc_t> grad_out, q, k, v, out;
  const acc_t* lse;   // [B, H, Nq], contiguous
  const acc_t* mask;  // [B, Nk] log(size), contiguous, or null
  scalar_t *grad_q, *grad_k, *grad_v;
  int64_t heads, nq, nk, dim;
  acc_t scale;

  void write_grad_q(int64_t b, int64_t h, int64_t first, int64_t rows, const acc_t* dq, int64_t ld) const {
    scalar_t* dst = grad_q + ((b * heads + h) * nq + first) * dim;
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t c = 0; c < dim; ++c) dst[n * dim + c] = static_cast<scalar_t>(dq[n * ld + c] * scale);
    }
  }
  void write_grad_kv(int64_t b, int64_t h, const acc_t* dk, const acc_t* dv, int64_t ld) const {
    const int64_t offset = (b * heads + h) * nk * dim;
    for (int64_t n = 0; n < nk; ++n) {
      for (int64_t c = 0; c < dim; ++c) {
        grad_k[offset + n * dim + c] = static_cast<scalar_t>(dk[n * ld + c] * scale);
        grad_v[offset + n * dim + c] = static_cast<scalar_t>(dv[n * ld + c]);
      }
    }
  }
};

// The kernel once per instruction set (isa.h).
namespace base {
#define TOME_VECTOR_BYTES 16
#define TOME_TILE_VECTORS 2
#define TOME_TILE_ACCUMULATORS 12
#include "attention_blocks.inc"
#undef TOME_TILE_ACCUMULATORS
#undef TOME_TILE_VECTORS
#undef TOME_VECTOR_BYTES
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define TOME_VECTOR_BYTES 32
#define TOME_TILE_VECTORS 2
#define TOME_TILE_ACCUMULATORS 12
#include "attention_blocks.inc"
#undef TOME_TILE_ACCUMULATORS
#undef TOME_TILE_VECTORS
#undef TOME_VECTOR_BYTES
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
#define TOME_VECTOR_BYTES 64
#define TOME_TILE_VECTORS 4
#define TOME_TILE_ACCUMULATORS 24
#include "attention_blocks.inc"
#undef TOME_TILE_ACCUMULATORS
#undef TOME_TILE_VECTORS
#undef TOME_VECTOR_BYTES
}  // namespace avx512
#pragma GCC pop_options
#else
namespace avx2 = base;
namespace avx512 = base;
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const std::optional<at::Tensor>& size,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale) {
  check_qkv(q, k, v);
  check_float("grad_out", grad_out, 4);
  check_float("out", out, 4);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "tome: grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  check_shape("grad_out", grad_out, q.sizes());
  check_shape("out", out, q.sizes());
  check_shape("lse", lse, {q.size(0), q.size(1), q.size(2)});
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_dtype(q.scalar_type()), "tome: lse must be ",
              acc_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
  const auto mask = log_size_mask(size, k);
  const Isa isa = cpu_isa();
  const auto fresh = [](const at::Tensor& t) { return at::empty_like(t, at::MemoryFormat::Contiguous); };
  if (empty_attention(q, k)) return {fresh(q).zero_(), fresh(k).zero_(), fresh(v).zero_()};
  at::Tensor grad_q = fresh(q), grad_k = fresh(k), grad_v = fresh(v);  // every element is written
  const at::Tensor lse_c = lse.contiguous();
  const std::optional<at::Tensor> mask_c =
      mask.has_value() ? std::optional(mask->reshape({k.size(0), k.size(2)}).contiguous()) : std::nullopt;
  dispatch_data_acc(q.scalar_type(), acc_dtype(q.scalar_type()), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const AttentionGrad<scalar_t, acc_t> g{grad_out, q, k, v, out, lse_c.const_data_ptr<acc_t>(),
                                           mask_c.has_value() ? mask_c->const_data_ptr<acc_t>() : nullptr,
                                           grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
                                           grad_v.mutable_data_ptr<scalar_t>(), q.size(1), q.size(2), k.size(2),
                                           q.size(3), static_cast<acc_t>(scale)};
    // One head per work item, each computed whole by one thread: the bits do not depend on the thread count.
    parallel_chunks(q.size(0) * q.size(1), 1, [&](int64_t begin, int64_t end) {
      if (isa == Isa::kAvx512) {
        avx512::backward_heads(g, begin, end);
      } else if (isa == Isa::kAvx2) {
        avx2::backward_heads(g, begin, end);
      } else {
        base::backward_heads(g, begin, end);
      }
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CPU, m) {
  m.impl("_native_attention", &attention);
  m.impl("_native_attention_backward", &attention_backward);
}

}  // namespace tome::cpu
