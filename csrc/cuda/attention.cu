// Proportional attention softmax(q k^T * scale + log size) v (reference.attention / attention_backward) on
// CUDA: a plain tiled online-softmax kernel in fp32 (fp64 for fp64), correctness before speed (no tensor
// cores). One warp owns kRowsPerWarp rows; the block shares 32-row tiles of the other operand in shared
// memory, one tile row per lane:
//   forward: a warp per query row, key/value tiles: lane j scores key j, the warp keeps the running max,
//            sum and output (lane c owns channels c, c + 32, ...). Writes out and lse.
//   dq:      a warp per query row, key/value tiles: ds = p (dO . v - delta) * scale, dq += ds k. Writes
//            delta = rowsum(dO * out) for the dk/dv kernel.
//   dk, dv:  a warp per key row, query/dO tiles: dv += p dO, dk += ds q.
// Each gradient row is owned by one warp, so there are no atomics and the result is deterministic.
#include "common.cuh"

namespace tome::cuda {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarpSize;
constexpr int kRowsPerBlock = kAttnWarps * kRowsPerWarp;
constexpr int kMaxHeadDim = 256;
constexpr int kChunks = kMaxHeadDim / kWarpSize;  // channels per lane

// Tile row stride: odd, so the 32 lanes reading one tile row each hit 32 distinct banks.
__host__ __device__ __forceinline__ int tile_stride(int head_dim) { return head_dim | 1; }

// Shared memory of a kernel: two 32-row tiles, `row_arrays` per-warp row buffers, `scalars` per-tile values.
template <typename acc>
size_t shared_bytes(int head_dim, int row_arrays, int scalars) {
  return (2 * kWarpSize * tile_stride(head_dim) + row_arrays * kRowsPerBlock * head_dim + scalars) * sizeof(acc);
}

template <typename acc>
__device__ __forceinline__ acc* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char shared_memory[];
  return reinterpret_cast<acc*>(shared_memory);
}

// tile[row][d] = src[row0 + row][d] for 32 rows, zero past `rows` (the whole block loads).
template <typename scalar_t, typename acc>
__device__ void load_tile(acc* tile, const scalar_t* src, int64_t row0, int64_t rows, int head_dim) {
  const int stride = tile_stride(head_dim);
  for (int e = threadIdx.x; e < kWarpSize * head_dim; e += blockDim.x) {
    const int row = e / head_dim, d = e % head_dim;
    tile[row * stride + d] = row0 + row < rows ? static_cast<acc>(src[(row0 + row) * head_dim + d]) : acc(0);
  }
}

// dst[d] = src[row][d], zero past `rows` (the calling warp loads).
template <typename scalar_t, typename acc>
__device__ void load_row(acc* dst, const scalar_t* src, int64_t row, int64_t rows, int head_dim, int lane) {
  for (int d = lane; d < head_dim; d += kWarpSize)
    dst[d] = row < rows ? static_cast<acc>(src[row * head_dim + d]) : acc(0);
}

template <typename acc>
__device__ __forceinline__ acc dot(const acc* a, const acc* b, int head_dim) {
  acc sum = 0;
  for (int d = 0; d < head_dim; ++d) sum += a[d] * b[d];
  return sum;
}

// out[t] (channel lane + 32 t) += sum over lanes j of coef(lane j) * tile[j][lane + 32 t].
template <typename acc>
__device__ __forceinline__ void accumulate(acc (&out)[kChunks], acc coef, const acc* tile, int head_dim, int lane) {
  const int stride = tile_stride(head_dim);
  for (int j = 0; j < kWarpSize; ++j) {
    const acc c = __shfl_sync(kFullMask, coef, j);
#pragma unroll
    for (int t = 0; t < kChunks; ++t) {
      const int d = lane + t * kWarpSize;
      if (d < head_dim) out[t] += c * tile[j * stride + d];
    }
  }
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ void store_row(scalar_t* dst, const acc (&row)[kChunks], acc factor, int head_dim,
                                          int lane) {
#pragma unroll
  for (int t = 0; t < kChunks; ++t) {
    const int d = lane + t * kWarpSize;
    if (d < head_dim) dst[d] = static_cast<scalar_t>(row[t] * factor);
  }
}

// log size of key `key` (0 without sizes), -inf past the last key so padded keys get zero probability.
template <typename acc>
__device__ __forceinline__ acc key_bias(const acc* key_size, int64_t key, int64_t num_keys) {
  if (key >= num_keys) return -std::numeric_limits<acc>::infinity();
  return key_size == nullptr ? acc(0) : log(key_size[key]);
}

// A row whose logits are all -inf (no keys) has lse = -inf and zero probabilities: +inf makes exp(s - lse)
// 0 instead of NaN. Padded rows use +inf as well.
template <typename acc>
__device__ __forceinline__ acc backward_lse(const acc* lse, int64_t row, int64_t rows) {
  constexpr acc kInf = std::numeric_limits<acc>::infinity();
  return row < rows && lse[row] != -kInf ? lse[row] : kInf;
}

// The block's batch * heads + head, its batch, and the first of the calling warp's rows.
struct Head {
  int64_t bh, batch, first_row;
};

__device__ __forceinline__ Head block_head(int64_t heads, int64_t row_blocks) {
  const int64_t bh = blockIdx.x / row_blocks;
  const int64_t first_row = (blockIdx.x % row_blocks) * kRowsPerBlock + (threadIdx.x / kWarpSize) * kRowsPerWarp;
  return {bh, bh / heads, first_row};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kAttnThreads)
    attention_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const acc_t<scalar_t>* size,
                     scalar_t* out, acc_t<scalar_t>* lse, int64_t heads, int64_t nq, int64_t nk, int head_dim,
                     acc_t<scalar_t> scale, int64_t row_blocks) {
  using acc = acc_t<scalar_t>;
  constexpr acc kInf = std::numeric_limits<acc>::infinity();
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int stride = tile_stride(head_dim);
  acc* k_tile = dynamic_shared<acc>();
  acc* v_tile = k_tile + kWarpSize * stride;
  acc* bias = v_tile + kWarpSize * stride;
  acc* q_rows = bias + kWarpSize + warp * kRowsPerWarp * head_dim;
  const Head h = block_head(heads, row_blocks);
  q += h.bh * nq * head_dim;
  k += h.bh * nk * head_dim;
  v += h.bh * nk * head_dim;
  const acc* key_size = size == nullptr ? nullptr : size + h.batch * nk;

  acc m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    load_row(q_rows + rr * head_dim, q, h.first_row + rr, nq, head_dim, lane);
    m[rr] = -kInf;
    l[rr] = 0;
#pragma unroll
    for (int t = 0; t < kChunks; ++t) o[rr][t] = 0;
  }

  for (int64_t k0 = 0; k0 < nk; k0 += kWarpSize) {
    __syncthreads();  // the previous tiles are consumed (and, the first time, q_rows are written)
    load_tile(k_tile, k, k0, nk, head_dim);
    load_tile(v_tile, v, k0, nk, head_dim);
    if (threadIdx.x < kWarpSize) bias[threadIdx.x] = key_bias(key_size, k0 + threadIdx.x, nk);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const acc s = dot(q_rows + rr * head_dim, k_tile + lane * stride, head_dim) * scale + bias[lane];
      const acc m_new = max(m[rr], warp_max(s));
      const acc ref = m_new == -kInf ? acc(0) : m_new;  // no finite logit yet: exp() gives 0, not NaN
      const acc p = exp(s - ref), alpha = exp(m[rr] - ref);
      l[rr] = l[rr] * alpha + warp_sum(p);
#pragma unroll
      for (int t = 0; t < kChunks; ++t) o[rr][t] *= alpha;
      accumulate(o[rr], p, v_tile, head_dim, lane);
      m[rr] = m_new;
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t row = h.first_row + rr;
    if (row >= nq) continue;
    // No keys (or only zero sizes): out = 0, lse = -inf.
    store_row(out + (h.bh * nq + row) * head_dim, o[rr], l[rr] > 0 ? 1 / l[rr] : acc(0), head_dim, lane);
    if (lane == 0) lse[h.bh * nq + row] = l[rr] > 0 ? m[rr] + log(l[rr]) : -kInf;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kAttnThreads)
    attention_dq_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                        const acc_t<scalar_t>* size, const scalar_t* out, const acc_t<scalar_t>* lse,
                        scalar_t* grad_q, acc_t<scalar_t>* delta, int64_t heads, int64_t nq, int64_t nk,
                        int head_dim, acc_t<scalar_t> scale, int64_t row_blocks) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int stride = tile_stride(head_dim);
  acc* k_tile = dynamic_shared<acc>();
  acc* v_tile = k_tile + kWarpSize * stride;
  acc* bias = v_tile + kWarpSize * stride;
  acc* q_rows = bias + kWarpSize + warp * kRowsPerWarp * head_dim;
  acc* do_rows = q_rows + kRowsPerBlock * head_dim;
  const Head h = block_head(heads, row_blocks);
  const int64_t q_offset = h.bh * nq * head_dim;
  k += h.bh * nk * head_dim;
  v += h.bh * nk * head_dim;
  const acc* key_size = size == nullptr ? nullptr : size + h.batch * nk;

  acc row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], dq[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t row = h.first_row + rr;
    load_row(q_rows + rr * head_dim, q + q_offset, row, nq, head_dim, lane);
    load_row(do_rows + rr * head_dim, grad_out + q_offset, row, nq, head_dim, lane);
    acc partial = 0;
    for (int d = lane; d < head_dim && row < nq; d += kWarpSize)
      partial += do_rows[rr * head_dim + d] * static_cast<acc>(out[q_offset + row * head_dim + d]);
    row_delta[rr] = warp_sum(partial);
    if (lane == 0 && row < nq) delta[h.bh * nq + row] = row_delta[rr];
    row_lse[rr] = backward_lse(lse + h.bh * nq, row, nq);
#pragma unroll
    for (int t = 0; t < kChunks; ++t) dq[rr][t] = 0;
  }

  for (int64_t k0 = 0; k0 < nk; k0 += kWarpSize) {
    __syncthreads();
    load_tile(k_tile, k, k0, nk, head_dim);
    load_tile(v_tile, v, k0, nk, head_dim);
    if (threadIdx.x < kWarpSize) bias[threadIdx.x] = key_bias(key_size, k0 + threadIdx.x, nk);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const acc s = dot(q_rows + rr * head_dim, k_tile + lane * stride, head_dim) * scale + bias[lane];
      const acc p = exp(s - row_lse[rr]);
      const acc dp = dot(do_rows + rr * head_dim, v_tile + lane * stride, head_dim);
      accumulate(dq[rr], p * (dp - row_delta[rr]) * scale, k_tile, head_dim, lane);
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t row = h.first_row + rr;
    if (row < nq) store_row(grad_q + q_offset + row * head_dim, dq[rr], acc(1), head_dim, lane);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kAttnThreads)
    attention_dkdv_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const acc_t<scalar_t>* size, const acc_t<scalar_t>* lse, const acc_t<scalar_t>* delta,
                          scalar_t* grad_k, scalar_t* grad_v, int64_t heads, int64_t nq, int64_t nk, int head_dim,
                          acc_t<scalar_t> scale, int64_t row_blocks) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int stride = tile_stride(head_dim);
  acc* q_tile = dynamic_shared<acc>();
  acc* do_tile = q_tile + kWarpSize * stride;
  acc* tile_lse = do_tile + kWarpSize * stride;
  acc* tile_delta = tile_lse + kWarpSize;
  acc* k_rows = tile_delta + kWarpSize + warp * kRowsPerWarp * head_dim;
  acc* v_rows = k_rows + kRowsPerBlock * head_dim;
  const Head h = block_head(heads, row_blocks);
  const int64_t k_offset = h.bh * nk * head_dim;
  q += h.bh * nq * head_dim;
  grad_out += h.bh * nq * head_dim;
  lse += h.bh * nq;
  delta += h.bh * nq;
  const acc* key_size = size == nullptr ? nullptr : size + h.batch * nk;

  acc row_bias[kRowsPerWarp], dk[kRowsPerWarp][kChunks], dv[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t row = h.first_row + rr;
    load_row(k_rows + rr * head_dim, k + k_offset, row, nk, head_dim, lane);
    load_row(v_rows + rr * head_dim, v + k_offset, row, nk, head_dim, lane);
    row_bias[rr] = key_bias(key_size, row, nk);
#pragma unroll
    for (int t = 0; t < kChunks; ++t) dk[rr][t] = dv[rr][t] = 0;
  }

  for (int64_t q0 = 0; q0 < nq; q0 += kWarpSize) {
    __syncthreads();
    load_tile(q_tile, q, q0, nq, head_dim);
    load_tile(do_tile, grad_out, q0, nq, head_dim);
    if (threadIdx.x < kWarpSize) {
      const int64_t query = q0 + threadIdx.x;
      tile_lse[threadIdx.x] = backward_lse(lse, query, nq);
      tile_delta[threadIdx.x] = query < nq ? delta[query] : acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const acc s = dot(k_rows + rr * head_dim, q_tile + lane * stride, head_dim) * scale + row_bias[rr];
      const acc p = exp(s - tile_lse[lane]);
      const acc dp = dot(v_rows + rr * head_dim, do_tile + lane * stride, head_dim);
      accumulate(dv[rr], p, do_tile, head_dim, lane);
      accumulate(dk[rr], p * (dp - tile_delta[lane]) * scale, q_tile, head_dim, lane);
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t row = h.first_row + rr;
    if (row >= nk) continue;
    store_row(grad_k + k_offset + row * head_dim, dk[rr], acc(1), head_dim, lane);
    store_row(grad_v + k_offset + row * head_dim, dv[rr], acc(1), head_dim, lane);
  }
}

struct Shapes {
  int64_t batch, heads, nq, nk;
  int head_dim;
};

Shapes check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float(q, "q", 4);
  check_float(k, "k", 4);
  check_float(v, "v", 4);
  check_device(k, "k", q);
  check_device(v, "v", q);
  tome::check_qkv(q, k, v);
  TORCH_CHECK_VALUE(q.size(3) <= kMaxHeadDim, "tome: the CUDA attention takes head dims up to ", kMaxHeadDim, ", got ",
                    q.size(3));
  return {q.size(0), q.size(1), q.size(2), k.size(2), static_cast<int>(q.size(3))};
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_device(t, name, like);
  TORCH_CHECK_VALUE(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "tome: ", name, " must be ",
                    like.scalar_type(), " ", like.sizes(), ", got ", t.scalar_type(), " ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                             const std::optional<at::Tensor>& size, double scale) {
  const Shapes s = check_attention(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto acc_type = acc_dtype(q.scalar_type());
  const auto key_size = size_as(size, "size", q, s.nk, acc_type);
  const at::Tensor out = at::empty_like(q);
  const at::Tensor lse = at::empty({s.batch, s.heads, s.nq}, q.options().dtype(acc_type));
  TOME_DISPATCH_FLOATS(q.scalar_type(), "tome_attention_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t row_blocks = ceil_div(s.nq, kRowsPerBlock);
    launch(attention_kernel<scalar_t>, s.batch * s.heads * row_blocks, kAttnThreads,
           shared_bytes<acc>(s.head_dim, 1, kWarpSize), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
           v.const_data_ptr<scalar_t>(), data_or_null<acc>(key_size), out.data_ptr<scalar_t>(), lse.data_ptr<acc>(),
           s.heads, s.nq, s.nk, s.head_dim, static_cast<acc>(scale), row_blocks);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& size, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  const Shapes s = check_attention(q_in, k_in, v_in);
  check_like(grad_out_in, "grad_out", q_in);
  check_like(out_in, "out", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto acc_type = acc_dtype(q_in.scalar_type());
  check_device(lse_in, "lse", q_in);
  const auto lse_shape = q_in.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(lse_in.scalar_type() == acc_type && lse_in.sizes() == lse_shape, "tome: lse must be ", acc_type,
                    " [B, H, Nq] = ", lse_shape, ", got ", lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const auto key_size = size_as(size, "size", q, s.nk, acc_type);
  const at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  const at::Tensor delta = at::empty({s.batch, s.heads, s.nq}, q.options().dtype(acc_type));
  TOME_DISPATCH_FLOATS(q.scalar_type(), "tome_attention_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t q_blocks = ceil_div(s.nq, kRowsPerBlock), k_blocks = ceil_div(s.nk, kRowsPerBlock);
    const size_t bytes = shared_bytes<acc>(s.head_dim, 2, 2 * kWarpSize);  // dk/dv's layout, the larger
    // The dk/dv kernel reads delta, which the dq kernel writes first on the same stream.
    launch(attention_dq_kernel<scalar_t>, s.batch * s.heads * q_blocks, kAttnThreads, bytes,
           grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
           v.const_data_ptr<scalar_t>(), data_or_null<acc>(key_size), out.const_data_ptr<scalar_t>(),
           lse.const_data_ptr<acc>(), grad_q.data_ptr<scalar_t>(), delta.data_ptr<acc>(), s.heads, s.nq, s.nk,
           s.head_dim, static_cast<acc>(scale), q_blocks);
    launch(attention_dkdv_kernel<scalar_t>, s.batch * s.heads * k_blocks, kAttnThreads, bytes,
           grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
           v.const_data_ptr<scalar_t>(), data_or_null<acc>(key_size), lse.const_data_ptr<acc>(),
           delta.const_data_ptr<acc>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), s.heads, s.nq,
           s.nk, s.head_dim, static_cast<acc>(scale), k_blocks);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace tome::cuda

TORCH_LIBRARY_IMPL(tome, CUDA, m) {
  m.impl("_native_attention", &tome::cuda::attention);
  m.impl("_native_attention_backward", &tome::cuda::attention_backward);
}
