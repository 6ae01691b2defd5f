// merge, merge_backward, unmerge, unmerge_backward on CPU (spec: tome_kernels/reference.py).
//
// One pass over the data each, parallel over (batch row, output token). Each output token gathers (merge,
// unmerge_backward) or scatters (merge_backward, unmerge) its own members through the inverted index
// (Groups), so there are no atomics and every sum runs in one fixed order: representative first, then the
// sources in src_idx order. Bit-identical results for any thread count.
#include <torch/library.h>

#include "common.h"

namespace tome::cpu {
namespace {

int64_t row_grain(int64_t channels) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1)); }

// out[o] = sum of w_i * in[i] over the members i of output token o, divided by size_out[o] when given
// (weighted mean); no weight means w_i = 1. A token that merged with nothing is copied, bit-exact. With
// rep_only, out[o] = in[rep(o)] (pos passthrough).
template <class scalar_t, class acc_t>
void reduce_groups(const Groups& g, const scalar_t* in, scalar_t* out, int64_t channels, const acc_t* weight,
                   const acc_t* size_out, bool rep_only) {
  const int64_t num_tokens = g.layout().num_tokens, num_out = g.num_out();
  parallel_chunks(g.batch() * num_out, row_grain(channels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(channels);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / num_out, o = t % num_out, rep = g.representative(b, o);
      const scalar_t* row = in + (b * num_tokens + rep) * channels;
      scalar_t* dst = out + t * channels;
      const int64_t *first = g.sources_begin(b, o), *last = g.sources_end(b, o);
      if (rep_only || first == last) {
        std::copy(row, row + channels, dst);
        continue;
      }
      const acc_t* w = weight == nullptr ? nullptr : weight + b * num_tokens;
      const acc_t w_rep = w == nullptr ? acc_t(1) : w[rep];
      for (int64_t c = 0; c < channels; ++c) total[c] = w_rep * static_cast<acc_t>(row[c]);
      for (const int64_t* m = first; m != last; ++m) {
        const scalar_t* member = in + (b * num_tokens + *m) * channels;
        const acc_t w_m = w == nullptr ? acc_t(1) : w[*m];
        for (int64_t c = 0; c < channels; ++c) total[c] += w_m * static_cast<acc_t>(member[c]);
      }
      if (size_out == nullptr) {
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(total[c]);
      } else {
        const acc_t s = size_out[t];
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(total[c] / s);
      }
    }
  });
}

// out[i] = in[o] for every member i of output token o, scaled by w_i / size_out[o] when size_out is given
// and o has several members (merge backward; a lone member gets a copy). With rep_only, rep(o) gets in[o]
// and the sources get zero (pos passthrough backward).
template <class scalar_t, class acc_t>
void spread_groups(const Groups& g, const scalar_t* in, scalar_t* out, int64_t channels, const acc_t* weight,
                   const acc_t* size_out, bool rep_only) {
  const int64_t num_tokens = g.layout().num_tokens, num_out = g.num_out();
  parallel_chunks(g.batch() * num_out, row_grain(channels), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / num_out, o = t % num_out, rep = g.representative(b, o);
      const scalar_t* row = in + t * channels;
      scalar_t* base = out + b * num_tokens * channels;
      const int64_t *first = g.sources_begin(b, o), *last = g.sources_end(b, o);
      if (rep_only || size_out == nullptr || first == last) {
        std::copy(row, row + channels, base + rep * channels);
        for (const int64_t* m = first; m != last; ++m) {
          scalar_t* dst = base + *m * channels;
          if (rep_only) {
            std::fill(dst, dst + channels, scalar_t(0));
          } else {
            std::copy(row, row + channels, dst);
          }
        }
        continue;
      }
      const acc_t* w = weight == nullptr ? nullptr : weight + b * num_tokens;
      const acc_t s = size_out[t];
      auto put = [&](int64_t i) {
        const acc_t share = (w == nullptr ? acc_t(1) : w[i]) / s;
        scalar_t* dst = base + i * channels;
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) * share);
      };
      put(rep);
      for (const int64_t* m = first; m != last; ++m) put(*m);
    }
  });
}

// size_out[o] = sum of the members' weights (1 each without size).
template <class acc_t>
void group_sizes(const Groups& g, const acc_t* weight, acc_t* size_out) {
  const int64_t num_tokens = g.layout().num_tokens, num_out = g.num_out();
  for (int64_t t = 0; t < g.batch() * num_out; ++t) {
    const int64_t b = t / num_out, o = t % num_out;
    const acc_t* w = weight == nullptr ? nullptr : weight + b * num_tokens;
    const int64_t *first = g.sources_begin(b, o), *last = g.sources_end(b, o);
    acc_t total = w == nullptr ? acc_t(1) : w[g.representative(b, o)];
    for (const int64_t* m = first; m != last; ++m) total += w == nullptr ? acc_t(1) : w[*m];
    size_out[t] = total;
  }
}

template <class T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// [batch, N] sizes as a contiguous tensor of the accumulation dtype (undefined when absent).
at::Tensor weights(const std::optional<at::Tensor>& size, const char* name, int64_t batch, int64_t num_tokens,
                   at::ScalarType acc) {
  if (!size.has_value()) return {};
  check_float(name, *size, 2);
  check_shape(name, *size, {batch, num_tokens});
  return size->to(acc).contiguous();
}

int64_t num_merges(const at::Tensor& src_idx) { return src_idx.dim() == 2 ? src_idx.size(1) : 0; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge(const at::Tensor& x_in, const std::optional<at::Tensor>& pos_in,
                                                     const std::optional<at::Tensor>& size, const at::Tensor& unm_idx,
                                                     const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                                     int64_t protected_tokens, bool pos_mean) {
  check_float("x", x_in, 3);
  const int64_t batch = x_in.size(0), num_tokens = x_in.size(1), channels = x_in.size(2);
  const Groups g(unm_idx, src_idx, dst_idx, batch, num_tokens, protected_tokens);
  const auto acc = acc_dtype(x_in.scalar_type());
  const at::Tensor weight = weights(size, "size", batch, num_tokens, acc);
  at::Tensor pos;
  if (pos_in.has_value()) {
    check_float("pos", *pos_in, 3);
    check_shape("pos", *pos_in, {batch, num_tokens, pos_in->size(2)});
    pos = pos_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor x_out = at::empty({batch, g.num_out(), channels}, x.options());
  at::Tensor size_out = at::empty({batch, g.num_out()}, x.options().dtype(acc));
  at::Tensor pos_out = pos.defined() ? at::empty({batch, g.num_out(), pos.size(2)}, pos.options()) : x.new_empty({0});

  dispatch_data_acc(x.scalar_type(), acc, [&](auto data, auto accum) {
    using scalar_t = decltype(data);
    using acc_t = decltype(accum);
    const acc_t* w = data_or_null<acc_t>(weight);
    group_sizes(g, w, size_out.mutable_data_ptr<acc_t>());
    reduce_groups(g, x.const_data_ptr<scalar_t>(), x_out.mutable_data_ptr<scalar_t>(), channels, w,
                  size_out.const_data_ptr<acc_t>(), false);
  });
  if (pos.defined()) {
    dispatch_data_acc(pos.scalar_type(), acc, [&](auto data, auto accum) {
      using scalar_t = decltype(data);
      using acc_t = decltype(accum);
      reduce_groups(g, pos.const_data_ptr<scalar_t>(), pos_out.mutable_data_ptr<scalar_t>(), pos.size(2),
                    data_or_null<acc_t>(weight), size_out.const_data_ptr<acc_t>(), !pos_mean);
    });
  }
  return {x_out, pos_out, size_out.to(size.has_value() ? size->scalar_type() : x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> merge_backward(const at::Tensor& grad_x_in,
                                                  const std::optional<at::Tensor>& grad_pos_in,
                                                  const std::optional<at::Tensor>& size, const at::Tensor& size_out_in,
                                                  const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                                  const at::Tensor& dst_idx, int64_t protected_tokens, bool pos_mean) {
  check_float("grad_x", grad_x_in, 3);
  const int64_t batch = grad_x_in.size(0), num_out = grad_x_in.size(1), channels = grad_x_in.size(2);
  const int64_t num_tokens = num_out + num_merges(src_idx);
  const Groups g(unm_idx, src_idx, dst_idx, batch, num_tokens, protected_tokens);
  const auto acc = acc_dtype(grad_x_in.scalar_type());
  const at::Tensor weight = weights(size, "size", batch, num_tokens, acc);
  const at::Tensor size_out = weights(size_out_in, "size_out", batch, num_out, acc);
  at::Tensor grad_pos;
  if (grad_pos_in.has_value()) {
    check_float("grad_pos", *grad_pos_in, 3);
    check_shape("grad_pos", *grad_pos_in, {batch, num_out, grad_pos_in->size(2)});
    grad_pos = grad_pos_in->contiguous();
  }
  const at::Tensor grad_x = grad_x_in.contiguous();
  at::Tensor grad_x_out = at::empty({batch, num_tokens, channels}, grad_x.options());
  at::Tensor grad_pos_out = grad_pos.defined()
                                ? at::empty({batch, num_tokens, grad_pos.size(2)}, grad_pos.options())
                                : grad_x.new_empty({0});

  dispatch_data_acc(grad_x.scalar_type(), acc, [&](auto data, auto accum) {
    using scalar_t = decltype(data);
    using acc_t = decltype(accum);
    spread_groups(g, grad_x.const_data_ptr<scalar_t>(), grad_x_out.mutable_data_ptr<scalar_t>(), channels,
                  data_or_null<acc_t>(weight), size_out.const_data_ptr<acc_t>(), false);
  });
  if (grad_pos.defined()) {
    dispatch_data_acc(grad_pos.scalar_type(), acc, [&](auto data, auto accum) {
      using scalar_t = decltype(data);
      using acc_t = decltype(accum);
      spread_groups(g, grad_pos.const_data_ptr<scalar_t>(), grad_pos_out.mutable_data_ptr<scalar_t>(),
                    grad_pos.size(2), data_or_null<acc_t>(weight), size_out.const_data_ptr<acc_t>(), !pos_mean);
    });
  }
  return {grad_x_out, grad_pos_out};
}

at::Tensor unmerge(const at::Tensor& y_in, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                   const at::Tensor& dst_idx, int64_t protected_tokens) {
  check_float("y", y_in, 3);
  const int64_t batch = y_in.size(0), channels = y_in.size(2);
  const Groups g(unm_idx, src_idx, dst_idx, batch, y_in.size(1) + num_merges(src_idx), protected_tokens);
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = at::empty({batch, g.layout().num_tokens, channels}, y.options());
  dispatch_data_acc(y.scalar_type(), acc_dtype(y.scalar_type()), [&](auto data, auto accum) {
    using scalar_t = decltype(data);
    using acc_t = decltype(accum);
    spread_groups<scalar_t, acc_t>(g, y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), channels,
                                   nullptr, nullptr, false);
  });
  return out;
}

at::Tensor unmerge_backward(const at::Tensor& grad_in, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                            const at::Tensor& dst_idx, int64_t protected_tokens) {
  check_float("grad", grad_in, 3);
  const int64_t batch = grad_in.size(0), channels = grad_in.size(2);
  const Groups g(unm_idx, src_idx, dst_idx, batch, grad_in.size(1), protected_tokens);
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({batch, g.num_out(), channels}, grad.options());
  dispatch_data_acc(grad.scalar_type(), acc_dtype(grad.scalar_type()),
                    [&](auto data, auto accum) {
                      using scalar_t = decltype(data);
                      using acc_t = decltype(accum);
                      reduce_groups<scalar_t, acc_t>(g, grad.const_data_ptr<scalar_t>(),
                                                     out.mutable_data_ptr<scalar_t>(), channels, nullptr, nullptr,
                                                     false);
                    });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tome, CPU, m) {
  m.impl("_native_merge", &merge);
  m.impl("_native_merge_backward", &merge_backward);
  m.impl("_native_unmerge", &unmerge);
  m.impl("_native_unmerge_backward", &unmerge_backward);
}

}  // namespace tome::cpu
