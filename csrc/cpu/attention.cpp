// Proportional attention on CPU: softmax(q k^T * scale + log size) v and its backward (spec:
// reference.attention). ATen's fused CPU flash-attention kernels take the bias as a float mask broadcast from
// [B, 1, 1, Nk], so neither the logits nor the probabilities are ever materialised. The mask is kept in the
// accumulation dtype (fp32 for half types: log(size) in bf16 would be off by up to 2^-8 relative), which
// those kernels accept; they also return the row log-sum-exp (fp32 for half types, fp64 for fp64).
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <torch/library.h>

#include <limits>

#include "common.h"

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

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& size, double scale) {
  check_qkv(q, k, v);
  const auto mask = log_size_mask(size, k);
  if (empty_attention(q, k)) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(),
                     q.options().dtype(acc_dtype(q.scalar_type())))};
  }
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), /*dropout_p=*/0.0, /*is_causal=*/false, mask,
      scale);
  // The kernel returns out 0 and lse 0 for a row whose logits are all -inf (every key has size 0: the defined
  // lse is -inf) or all NaN (a NaN query: softmax attention gives NaN). A true lse of exactly 0 is rare, so
  // such calls are recomputed with materialised logits, as reference.attention.
  if ((lse == 0).any().item<bool>()) return attention_materialised(q, k, v, mask, scale);
  // lse comes back as a [B, Nq, H] buffer viewed as [B, H, Nq]; both outputs are fresh buffers.
  return {out.contiguous(), lse.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const std::optional<at::Tensor>& size,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale) {
  check_qkv(q, k, v);
  check_shape("grad_out", grad_out, q.sizes());
  check_shape("out", out, q.sizes());
  check_shape("lse", lse, {q.size(0), q.size(1), q.size(2)});
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_dtype(q.scalar_type()), "tome: lse must be ",
              acc_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
  if (empty_attention(q, k)) {
    const auto zeros = [](const at::Tensor& t) { return at::zeros_like(t, at::MemoryFormat::Contiguous); };
    return {zeros(q), zeros(k), zeros(v)};
  }
  auto [grad_q, grad_k, grad_v] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      unit_last_stride(grad_out), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), unit_last_stride(out),
      // All-masked rows (lse -inf): any finite lse makes their probabilities exp(-inf) = 0, not NaN.
      lse.masked_fill(lse.isneginf(), 0).contiguous(), /*dropout_p=*/0.0, /*is_causal=*/false, log_size_mask(size, k),
      scale);
  return {grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CPU, m) {
  m.impl("_native_attention", &attention);
  m.impl("_native_attention_backward", &attention_backward);
}

}  // namespace tome::cpu
