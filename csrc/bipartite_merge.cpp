// _native_bipartite_merge: _native_match then _native_merge in one call, for every device the two have
// kernels for (CPU, CUDA). One dispatch from Python instead of two, and no Python between them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace tome {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bipartite_merge(
    const at::Tensor& x, const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& size,
    const at::Tensor& metric, int64_t r, int64_t protected_tokens, bool pos_mean) {
  static const auto match = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("tome::_native_match", "")
                                .typed<Triple(const at::Tensor&, int64_t, int64_t)>();
  static const auto merge =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tome::_native_merge", "")
          .typed<Triple(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  auto [unm_idx, src_idx, dst_idx] = match.call(metric, r, protected_tokens);
  auto [x_out, pos_out, size_out] = merge.call(x, pos, size, unm_idx, src_idx, dst_idx, protected_tokens, pos_mean);
  return {x_out, pos_out, size_out, unm_idx, src_idx, dst_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CompositeExplicitAutograd, m) { m.impl("_native_bipartite_merge", &bipartite_merge); }

}  // namespace tome
