// merge, merge_backward, unmerge, unmerge_backward (reference.py) on CUDA, deterministic and atomic-free.
//
// make_plan inverts the index triple once per call, one thread per entry (no shared cursor, no atomics):
//   group [batch, N]          output token of every input token (reference.groups), -1 if not covered;
//   offsets [batch, nB + 1]   and members [batch, r]: the sources of B token j are
//                             members[offsets[j] .. offsets[j + 1]) in src_idx order (layout.h).
// Then every output row is produced by one warp that reads its inputs (a gather, no scatter):
//   gather_kernel, one warp per output token: merge (size-weighted mean / representative copy) and
//                  unmerge_backward (sum of the members), summed in a fixed order: representative first,
//                  then sources in src_idx order;
//   spread_kernel, one warp per input token: unmerge (copy of its output token) and merge_backward.
// A token merged with nothing is copied bit-exactly. Rows move in 16-byte packs when the channel count and
// the pointers allow it.
#include "common.cuh"

namespace tome::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

struct Plan {
  Layout layout;
  int64_t batch;
  at::Tensor unm_idx, group, offsets, members;
};

__global__ void plan_kernel(const int64_t* unm_idx, const int64_t* src_idx, const int64_t* dst_idx, Layout layout,
                            int64_t per_row, int64_t batch, int32_t* group, int32_t* offsets, int32_t* members) {
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (thread >= batch * per_row) return;
  const int64_t b = thread / per_row, t = thread % per_row;
  const int64_t r = layout.r, num_b = layout.num_b(), num_unmerged = layout.num_unmerged();
  const int64_t* src = src_idx + b * r;
  const int64_t* dst = dst_idx + b * r;
  int32_t* row_group = group + b * layout.num_tokens;
  if (t < layout.num_out()) {
    const int64_t pos = layout.representative(t, unm_idx + b * num_unmerged);
    const int64_t u = t - layout.protected_tokens;
    CUDA_KERNEL_ASSERT_MSG(u < 0 || u >= num_unmerged || layout.is_a_position(pos),
                           "tome: unm_idx holds a position that is not a non-protected even (A) token");
    row_group[pos] = static_cast<int32_t>(t);
  }
  if (t < r) {
    CUDA_KERNEL_ASSERT_MSG(layout.is_a_position(src[t]), "tome: src_idx holds a position that is not an A token");
    CUDA_KERNEL_ASSERT_MSG(layout.is_b_position(dst[t]), "tome: dst_idx holds a position that is not a B token");
    row_group[src[t]] = static_cast<int32_t>(layout.b_output_of_position(dst[t]));
    members[b * r + member_index(layout, dst, t)] = static_cast<int32_t>(src[t]);
  }
  if (t <= num_b) offsets[b * (num_b + 1) + t] = static_cast<int32_t>(destination_offset(layout, dst, t));
}

// The plan of the layout the ops apply (Layout::effective: r == 0 leaves every token in place).
Plan make_plan(const at::Tensor& unm_idx, const at::Tensor& src_idx, const at::Tensor& dst_idx, const Layout& checked,
               int64_t batch) {
  TORCH_CHECK_VALUE(checked.num_tokens <= std::numeric_limits<int32_t>::max(), "tome: N=", checked.num_tokens,
                    " tokens is too many");
  const Layout layout = checked.effective();
  const auto int_options = unm_idx.options().dtype(at::kInt);
  Plan plan{layout, batch, unm_idx.contiguous(), at::full({batch, layout.num_tokens}, -1, int_options),
            at::empty({batch, layout.num_b() + 1}, int_options), at::empty({batch, layout.r}, int_options)};
  const at::Tensor src = src_idx.contiguous(), dst = dst_idx.contiguous();
  const int64_t per_row = std::max(layout.num_out(), layout.num_b() + 1);
  launch(plan_kernel, ceil_div(batch * per_row, kThreads), kThreads, 0, plan.unm_idx.const_data_ptr<int64_t>(),
         src.const_data_ptr<int64_t>(), dst.const_data_ptr<int64_t>(), layout, per_row, batch,
         plan.group.data_ptr<int32_t>(), plan.offsets.data_ptr<int32_t>(), plan.members.data_ptr<int32_t>());
  return plan;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// 16-byte packs when every row start is 16-byte aligned, else single elements.
template <typename scalar_t>
constexpr int kPackWidth = 16 / sizeof(scalar_t);

template <typename scalar_t>
bool packable(int64_t channels, std::initializer_list<const at::Tensor*> tensors) {
  if (channels % kPackWidth<scalar_t> != 0) return false;
  for (const at::Tensor* t : tensors)
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  return true;
}

enum class Gather { kMean, kSum, kRepresentative };

// out[o] for one output token per warp. kMean: sum(w_i x_i) / sum(w_i) over the members (and the weight
// total into size_out when given); kSum: sum(x_i); kRepresentative: x[representative].
template <typename scalar_t, int VEC, Gather MODE>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const scalar_t* in, scalar_t* out, int64_t channels, const acc_t<scalar_t>* size,
                  acc_t<scalar_t>* size_out, const int64_t* unm_idx, const int32_t* offsets, const int32_t* members,
                  Layout layout, int64_t batch) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_out = layout.num_out(), num_tokens = layout.num_tokens, packs = channels / VEC;
  if (warp >= batch * num_out) return;  // whole warps
  const int64_t b = warp / num_out, o = warp % num_out;
  const int64_t rep = layout.representative(o, unm_idx + b * layout.num_unmerged());
  const int64_t j = layout.b_of_output(o);
  int64_t begin = 0, end = 0;
  if (MODE != Gather::kRepresentative && j >= 0) {
    begin = offsets[b * (layout.num_b() + 1) + j];
    end = offsets[b * (layout.num_b() + 1) + j + 1];
  }
  const int32_t* row_members = members + b * layout.r;
  const P* rows = reinterpret_cast<const P*>(in + b * num_tokens * channels);
  P* out_row = reinterpret_cast<P*>(out + (b * num_out + o) * channels);
  const acc* row_size = size == nullptr ? nullptr : size + b * num_tokens;
  const auto weight = [&](int64_t pos) { return row_size == nullptr ? acc(1) : row_size[pos]; };

  if (begin == end) {
    for (int64_t p = lane; p < packs; p += kWarpSize) out_row[p] = rows[rep * packs + p];
    if (size_out != nullptr && lane == 0) size_out[b * num_out + o] = weight(rep);
    return;
  }
  acc total = weight(rep);
  for (int64_t m = begin; m < end; ++m) total += weight(row_members[m]);
  for (int64_t p = lane; p < packs; p += kWarpSize) {
    acc sum[VEC];
    const P first = rows[rep * packs + p];
    const acc w = weight(rep);
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] = static_cast<acc>(first.v[v]) * w;
    for (int64_t m = begin; m < end; ++m) {
      const int64_t pos = row_members[m];
      const P x = rows[pos * packs + p];
      const acc wm = weight(pos);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[v] += static_cast<acc>(x.v[v]) * wm;
    }
    P result;
#pragma unroll
    for (int v = 0; v < VEC; ++v) result.v[v] = static_cast<scalar_t>(MODE == Gather::kMean ? sum[v] / total : sum[v]);
    out_row[p] = result;
  }
  if (size_out != nullptr && lane == 0) size_out[b * num_out + o] = total;
}

enum class Spread { kCopy, kShare, kRepresentative };

// out[i] for one input token i per warp, from its output token o = group[i]. kCopy: in[o]; kShare:
// in[o] * w_i / size_out[o] (in[o] itself when o merged nothing); kRepresentative: in[o] for the token
// representing o, zero for a source.
template <typename scalar_t, int VEC, Spread MODE>
__global__ void __launch_bounds__(kThreads)
    spread_kernel(const scalar_t* in, scalar_t* out, int64_t channels, const acc_t<scalar_t>* size,
                  const acc_t<scalar_t>* size_out, const int32_t* group, const int32_t* offsets, Layout layout,
                  int64_t batch) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_out = layout.num_out(), num_tokens = layout.num_tokens, packs = channels / VEC;
  if (warp >= batch * num_tokens) return;  // whole warps
  const int64_t b = warp / num_tokens, i = warp % num_tokens;
  const int64_t o = group[b * num_tokens + i];
  CUDA_KERNEL_ASSERT_MSG(o >= 0, "tome: an A token is in neither unm_idx nor src_idx");
  const int64_t j = layout.b_of_output(o);
  const P* in_row = reinterpret_cast<const P*>(in + (b * num_out + o) * channels);
  P* out_row = reinterpret_cast<P*>(out + (b * num_tokens + i) * channels);

  bool copy = true;  // else kRepresentative writes zeros, kShare scales
  if (MODE == Spread::kRepresentative) {
    copy = !(j >= 0 && layout.is_a_position(i));
  } else if (MODE == Spread::kShare && j >= 0) {
    const int32_t* row_offsets = offsets + b * (layout.num_b() + 1);
    copy = row_offsets[j] == row_offsets[j + 1];
  }
  if (copy) {
    for (int64_t p = lane; p < packs; p += kWarpSize) out_row[p] = in_row[p];
    return;
  }
  if (MODE == Spread::kRepresentative) {  // a source: zeros, whatever the gradient holds (inf, NaN)
    const P zero{};
    for (int64_t p = lane; p < packs; p += kWarpSize) out_row[p] = zero;
    return;
  }
  const acc share = (size == nullptr ? acc(1) : size[b * num_tokens + i]) / size_out[b * num_out + o];
  for (int64_t p = lane; p < packs; p += kWarpSize) {
    const P g = in_row[p];
    P result;
#pragma unroll
    for (int v = 0; v < VEC; ++v) result.v[v] = static_cast<scalar_t>(static_cast<acc>(g.v[v]) * share);
    out_row[p] = result;
  }
}

// in [batch, N, C] -> out [batch, N - r, C]. size: the weights [batch, N] (any float dtype) or none;
// size_out: where kMean writes the weight totals ([batch, N - r], in in's accumulation dtype) or null.
template <Gather MODE>
void gather(const at::Tensor& in, const at::Tensor& out, const std::optional<at::Tensor>& size, at::Tensor* size_out,
            const Plan& plan) {
  const int64_t channels = in.size(2);
  TOME_DISPATCH_FLOATS(in.scalar_type(), "tome_gather_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto weights = size_as(size, "size", in, plan.layout.num_tokens, acc_dtype(in.scalar_type()));
    TOME_BOOL_SWITCH(packable<scalar_t>(channels, {&in, &out}), PACKED, [&] {
      constexpr int VEC = PACKED ? kPackWidth<scalar_t> : 1;
      launch(gather_kernel<scalar_t, VEC, MODE>, ceil_div(plan.batch * plan.layout.num_out(), kWarpsPerBlock),
             kThreads, 0, in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), channels,
             data_or_null<acc>(weights), size_out == nullptr ? nullptr : size_out->data_ptr<acc>(),
             plan.unm_idx.const_data_ptr<int64_t>(), plan.offsets.const_data_ptr<int32_t>(),
             plan.members.const_data_ptr<int32_t>(), plan.layout, plan.batch);
    });
  });
}

// in [batch, N - r, C] -> out [batch, N, C]. size [batch, N] and size_out [batch, N - r] (kShare only).
template <Spread MODE>
void spread(const at::Tensor& in, const at::Tensor& out, const std::optional<at::Tensor>& size,
            const std::optional<at::Tensor>& size_out, const Plan& plan) {
  const int64_t channels = in.size(2);
  TOME_DISPATCH_FLOATS(in.scalar_type(), "tome_spread_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto dtype = acc_dtype(in.scalar_type());
    const auto weights = size_as(size, "size", in, plan.layout.num_tokens, dtype);
    const auto totals = size_as(size_out, "size_out", in, plan.layout.num_out(), dtype);
    TOME_BOOL_SWITCH(packable<scalar_t>(channels, {&in, &out}), PACKED, [&] {
      constexpr int VEC = PACKED ? kPackWidth<scalar_t> : 1;
      launch(spread_kernel<scalar_t, VEC, MODE>, ceil_div(plan.batch * plan.layout.num_tokens, kWarpsPerBlock),
             kThreads, 0, in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), channels,
             data_or_null<acc>(weights), data_or_null<acc>(totals), plan.group.const_data_ptr<int32_t>(),
             plan.offsets.const_data_ptr<int32_t>(), plan.layout, plan.batch);
    });
  });
}

// A [batch, rows, C] tensor on `like`'s device, as a contiguous tensor.
at::Tensor tokens(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t rows) {
  check_float(t, name, 3);
  check_device(t, name, like);
  TORCH_CHECK_VALUE(t.size(0) == like.size(0) && t.size(1) == rows, "tome: ", name, " must be [batch=", like.size(0),
                    ", ", rows, ", C], got shape ", t.sizes());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge(const at::Tensor& x_in, const std::optional<at::Tensor>& pos_in,
                                                     const std::optional<at::Tensor>& size, const at::Tensor& unm_idx,
                                                     const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                                     int64_t protected_tokens, bool pos_mean) {
  check_float(x_in, "x", 3);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), num_tokens = x.size(1);
  const Layout layout = check_indices(unm_idx, src_idx, dst_idx, x, num_tokens, protected_tokens);
  const Plan plan = make_plan(unm_idx, src_idx, dst_idx, layout, batch);

  const at::Tensor x_out = at::empty({batch, layout.num_out(), x.size(2)}, x.options());
  at::Tensor size_out = at::empty({batch, layout.num_out()}, x.options().dtype(acc_dtype(x.scalar_type())));
  gather<Gather::kMean>(x, x_out, size, &size_out, plan);
  at::Tensor pos_out = x.new_empty({0});
  if (pos_in.has_value()) {
    const at::Tensor pos = tokens(*pos_in, "pos", x, num_tokens);
    pos_out = at::empty({batch, layout.num_out(), pos.size(2)}, pos.options());
    if (pos_mean) {
      gather<Gather::kMean>(pos, pos_out, size, nullptr, plan);
    } else {
      gather<Gather::kRepresentative>(pos, pos_out, std::nullopt, nullptr, plan);
    }
  }
  return {x_out, pos_out, size_out.to(size.has_value() ? size->scalar_type() : x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> merge_backward(const at::Tensor& grad_x_in,
                                                  const std::optional<at::Tensor>& grad_pos_in,
                                                  const std::optional<at::Tensor>& size, const at::Tensor& size_out,
                                                  const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                                  const at::Tensor& dst_idx, int64_t protected_tokens, bool pos_mean) {
  check_float(grad_x_in, "grad_x", 3);
  const c10::cuda::CUDAGuard guard(grad_x_in.device());
  const at::Tensor grad_x = grad_x_in.contiguous();
  const int64_t batch = grad_x.size(0), num_out = grad_x.size(1);
  const int64_t num_tokens = num_out + num_merges(src_idx);
  const Layout layout = check_indices(unm_idx, src_idx, dst_idx, grad_x, num_tokens, protected_tokens);
  const Plan plan = make_plan(unm_idx, src_idx, dst_idx, layout, batch);

  const at::Tensor grad_x_out = at::empty({batch, num_tokens, grad_x.size(2)}, grad_x.options());
  spread<Spread::kShare>(grad_x, grad_x_out, size, size_out, plan);
  at::Tensor grad_pos_out = grad_x.new_empty({0});
  if (grad_pos_in.has_value()) {
    const at::Tensor grad_pos = tokens(*grad_pos_in, "grad_pos", grad_x, num_out);
    grad_pos_out = at::empty({batch, num_tokens, grad_pos.size(2)}, grad_pos.options());
    if (pos_mean) {
      spread<Spread::kShare>(grad_pos, grad_pos_out, size, size_out, plan);
    } else {
      spread<Spread::kRepresentative>(grad_pos, grad_pos_out, std::nullopt, std::nullopt, plan);
    }
  }
  return {grad_x_out, grad_pos_out};
}

at::Tensor unmerge(const at::Tensor& y_in, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                   const at::Tensor& dst_idx, int64_t protected_tokens) {
  check_float(y_in, "y", 3);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const int64_t batch = y.size(0), num_tokens = y.size(1) + num_merges(src_idx);
  const Layout layout = check_indices(unm_idx, src_idx, dst_idx, y, num_tokens, protected_tokens);
  const Plan plan = make_plan(unm_idx, src_idx, dst_idx, layout, batch);
  const at::Tensor out = at::empty({batch, num_tokens, y.size(2)}, y.options());
  spread<Spread::kCopy>(y, out, std::nullopt, std::nullopt, plan);
  return out;
}

at::Tensor unmerge_backward(const at::Tensor& grad_in, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                            const at::Tensor& dst_idx, int64_t protected_tokens) {
  check_float(grad_in, "grad", 3);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = grad.size(0), num_tokens = grad.size(1);
  const Layout layout = check_indices(unm_idx, src_idx, dst_idx, grad, num_tokens, protected_tokens);
  const Plan plan = make_plan(unm_idx, src_idx, dst_idx, layout, batch);
  const at::Tensor out = at::empty({batch, layout.num_out(), grad.size(2)}, grad.options());
  gather<Gather::kSum>(grad, out, std::nullopt, nullptr, plan);
  return out;
}

}  // namespace
}  // namespace tome::cuda

TORCH_LIBRARY_IMPL(tome, CUDA, m) {
  m.impl("_native_merge", &tome::cuda::merge);
  m.impl("_native_merge_backward", &tome::cuda::merge_backward);
  m.impl("_native_unmerge", &tome::cuda::unmerge);
  m.impl("_native_unmerge_backward", &tome::cuda::unmerge_backward);
}
