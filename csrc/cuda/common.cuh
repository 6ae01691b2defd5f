// Shared by the CUDA kernels: argument checks, dispatch and launch helpers, warp reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include <tome/checks.h>
#include <tome/layout.h>

namespace tome::cuda {

// Turns a runtime bool into a constexpr one for the lambda body (flash-attention's static_switch.h idiom).
#define TOME_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                         \
    if (COND) {                                 \
      constexpr bool CONST_NAME = true;         \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr bool CONST_NAME = false;        \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64 (the reference's promote_types(dtype, float32)).
#define TOME_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = max(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// ---------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------
inline void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda(), "tome: ", name, " must be a CUDA tensor, got ", t.device());
  tome::check_float(name, t, dim);
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), "tome: ", name, " must be on ", like.device(), ", got ",
                    t.device());
}

// r, the number of merges an index triple describes.
inline int64_t num_merges(const at::Tensor& src_idx) {
  TORCH_CHECK_VALUE(src_idx.dim() == 2, "tome: src_idx must be [batch, r], got shape ", src_idx.sizes());
  return src_idx.size(1);
}

// Checks an index triple for `num_tokens` input tokens and returns its layout (r = src_idx.size(1)).
// Values are checked on the device by make_plan (merge.cu) and, on request, by the Python layer.
inline Layout check_indices(const at::Tensor& unm_idx, const at::Tensor& src_idx, const at::Tensor& dst_idx,
                            const at::Tensor& like, int64_t num_tokens, int64_t protected_tokens) {
  for (const auto& [t, name] : {std::pair{&unm_idx, "unm_idx"}, {&src_idx, "src_idx"}, {&dst_idx, "dst_idx"}}) {
    check_device(*t, name, like);
  }
  return check_index_shapes(unm_idx, src_idx, dst_idx, like.size(0), num_tokens, protected_tokens);
}

// size [batch, num_tokens] (or none) as a contiguous tensor of `dtype`.
inline std::optional<at::Tensor> size_as(const std::optional<at::Tensor>& size, const char* name,
                                         const at::Tensor& like, int64_t num_tokens, at::ScalarType dtype) {
  if (!size.has_value()) return std::nullopt;
  check_float(*size, name, 2);
  check_device(*size, name, like);
  TORCH_CHECK_VALUE(size->size(0) == like.size(0) && size->size(1) == num_tokens, "tome: ", name, " must be [batch=",
                    like.size(0), ", N=", num_tokens, "], got shape ", size->sizes());
  return size->to(dtype).contiguous();
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// 1-D grid of `blocks` blocks (every kernel flattens batch and tiles into blockIdx.x: no 65535 limit).
inline unsigned grid_size(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "tome: ", blocks,
                    " thread blocks exceed the grid limit");
  return static_cast<unsigned>(blocks);
}

// Launches on the current stream; dynamic shared memory past the 48 KiB default is opted into.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, int threads, size_t shared_bytes, Args... args) {
  if (blocks == 0) return;
  if (shared_bytes > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(shared_bytes <= static_cast<size_t>(limit), "tome: a kernel needs ", shared_bytes,
                      " bytes of shared memory, the device allows ", limit, " (reduce the head dim or use fp32)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  kernel<<<grid_size(blocks), threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tome::cuda
