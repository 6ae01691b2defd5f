// merge, merge_backward, unmerge, unmerge_backward on CPU (spec: tome_kernels/reference.py).
//
// The N-token side is visited in token order, parallel over (batch row, token): merge reads it and
// unmerge writes it sequentially, which measured 1.5x faster than visiting the output tokens (whose rows
// interleave the A and B positions). Tokens that merged with nothing are copied (bit-exact); a merged group
// is summed by the thread that reaches its representative, over its members in ascending position (the
// order of the reference's scatter_add): no atomics, and the same bits for any thread count.
#include <torch/library.h>

#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "isa.h"

namespace tome::cpu {
namespace {

int64_t row_grain(int64_t channels) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1)); }

// Outputs larger than this are written with non-temporal stores: they cannot stay cached for the next op
// anyway, and a plain store first reads every destination line (read-for-ownership), so copying rows of a
// large tensor cost 2x a memcpy of it (which streams above a similar size). 3/4 of a 16 MB L3 share.
constexpr int64_t kStreamBytes = 12 << 20;

#if defined(__x86_64__) && defined(__GNUC__)
// The body of a streamed row copy with 32-byte stores (two per 64-byte line): the merge at ViT-B batch 32
// ran 1.1-1.15x faster than with 16-byte stores (median, 2-core EPYC), stores being what limits it.
__attribute__((target("avx"))) void stream_bytes_avx(char* dst, const char* src, int64_t bytes) {
  const int64_t head = std::min<int64_t>(bytes, (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 32 <= bytes; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, bytes - i);
}

bool use_avx() { return cpu_isa() >= Isa::kAvx2; }  // isa.h
#endif

// The copy of one row; with `stream`, the aligned body goes through non-temporal stores (callers fence
// before the output is read: stream_fence).
template <class scalar_t>
void copy_row(const scalar_t* from, scalar_t* to, int64_t channels, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    auto* dst = reinterpret_cast<char*>(to);
    const auto* src = reinterpret_cast<const char*>(from);
    const int64_t bytes = channels * static_cast<int64_t>(sizeof(scalar_t));
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx()) return stream_bytes_avx(dst, src, bytes);
#endif
    const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
    std::memcpy(dst, src, head);
    int64_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    }
    std::memcpy(dst + i, src + i, bytes - i);
    return;
  }
#endif
  std::copy(from, from + channels, to);
}

// Orders a thread's non-temporal stores before the end of its parallel chunk.
inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#endif
}

bool streams(int64_t rows, int64_t channels, size_t element_size) {
  return rows * channels * static_cast<int64_t>(element_size) > kStreamBytes;
}

// out[o] = sum of w_n * in[n] over the members n of output token o, divided by size_out[o] when given
// (weighted mean); no weight means w_n = 1. With rep_only, out[o] = in[representative of o] (pos passthrough).
// One parallel pass: the thread whose chunk holds a group's representative (its B token, just streamed,
// so hot in cache) sums the group; sources elsewhere are only read.
template <class scalar_t, class acc_t>
void reduce_groups(const Groups& g, const scalar_t* in, scalar_t* out, int64_t channels, const acc_t* weight,
                   const acc_t* size_out, bool rep_only) {
  const int64_t num_tokens = g.num_tokens();
  const bool stream = streams(g.batch() * g.num_out(), channels, sizeof(scalar_t));
  parallel_chunks(g.batch() * num_tokens, row_grain(channels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(rep_only ? 0 : channels);
    std::vector<scalar_t> group_row(rep_only ? 0 : channels);
    for (int64_t t = begin; t < end; ++t) {
      const auto role = g.role(t);
      if (role == Groups::kAlone || (rep_only && role == Groups::kRepresentative)) {
        copy_row(in + t * channels, out + g.output_of(t) * channels, channels, stream);
      }
      if (rep_only || role != Groups::kRepresentative) continue;
      const int64_t k = g.merged_group_of(t), base = t - t % num_tokens;
      for (const int64_t* m = g.members_begin(k); m != g.members_end(k); ++m) {
        const scalar_t* row = in + (base + *m) * channels;
        const acc_t w = weight == nullptr ? acc_t(1) : weight[base + *m];
        if (m == g.members_begin(k)) {
          for (int64_t c = 0; c < channels; ++c) total[c] = w * static_cast<acc_t>(row[c]);
        } else {
          for (int64_t c = 0; c < channels; ++c) total[c] += w * static_cast<acc_t>(row[c]);
        }
      }
      const int64_t o = g.merged_output(k);
      if (size_out == nullptr) {
        for (int64_t c = 0; c < channels; ++c) group_row[c] = static_cast<scalar_t>(total[c]);
      } else {
        const acc_t s = size_out[o];
        for (int64_t c = 0; c < channels; ++c) group_row[c] = static_cast<scalar_t>(total[c] / s);
      }
      // Through a row in L1, so that the output row is streamed too: a plain store into it would first read
      // it from memory (read-for-ownership).
      copy_row(group_row.data(), out + o * channels, channels, stream);
    }
    stream_fence(stream);
  });
}

// out[n] = in[o] for every token n of output token o, times w_n / size_out[o] when size_out is given and n
// belongs to a merged group (merge backward); unmerge copies. With rep_only, sources get zero (pos
// passthrough backward).
template <class scalar_t, class acc_t>
void spread_groups(const Groups& g, const scalar_t* in, scalar_t* out, int64_t channels, const acc_t* weight,
                   const acc_t* size_out, bool rep_only) {
  const bool stream = streams(g.batch() * g.num_tokens(), channels, sizeof(scalar_t));
  parallel_chunks(g.batch() * g.num_tokens(), row_grain(channels), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto role = g.role(t);
      const int64_t o = g.output_of(t);
      const scalar_t* row = in + o * channels;
      scalar_t* dst = out + t * channels;
      if (rep_only && role == Groups::kSource) {
        std::fill(dst, dst + channels, scalar_t(0));
      } else if (role == Groups::kAlone || rep_only || size_out == nullptr) {
        copy_row(row, dst, channels, stream);
      } else {
        const acc_t share = (weight == nullptr ? acc_t(1) : weight[t]) / size_out[o];
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) * share);
      }
    }
    stream_fence(stream);
  });
}

// size_out[o] = sum of the members' weights (1 each without size), in the order reduce_groups uses.
template <class acc_t>
void group_sizes(const Groups& g, const acc_t* weight, acc_t* size_out) {
  for (int64_t t = 0; t < g.batch() * g.num_tokens(); ++t) {
    if (g.role(t) == Groups::kAlone) size_out[g.output_of(t)] = weight == nullptr ? acc_t(1) : weight[t];
  }
  const int64_t num_tokens = g.num_tokens(), num_out = g.num_out();
  for (int64_t k = 0; k < g.num_merged(); ++k) {
    const int64_t o = g.merged_output(k), base = (o / num_out) * num_tokens;
    acc_t total = 0;
    for (const int64_t* m = g.members_begin(k); m != g.members_end(k); ++m) {
      total += weight == nullptr ? acc_t(1) : weight[base + *m];
    }
    size_out[o] = total;
  }
}

template <class T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// [batch, N] sizes as a contiguous tensor of the accumulation dtype (undefined when absent); with
// `check_values`, their values are checked first, in their own dtype.
at::Tensor weights(const std::optional<at::Tensor>& size, const char* name, int64_t batch, int64_t num_tokens,
                   at::ScalarType acc, bool check_values = false) {
  if (!size.has_value()) return {};
  check_float(name, *size, 2);
  check_shape(name, *size, {batch, num_tokens});
  if (check_values) check_size_values(size->contiguous(), acc, /*allow_zero=*/false);
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
  const at::Tensor weight = weights(size, "size", batch, num_tokens, acc, /*check_values=*/true);
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
