// A CPU stand-in for the CUDA runtime, so the csrc/cuda kernels run (as host C++) on machines without a
// GPU. Test-only: cuda_emulation/__init__.py rewrites a handful of lines of the .cu sources to use it.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread. A fiber runs until it reaches
// a barrier (__syncthreads, __syncwarp, or either half of a warp shuffle) or returns; the scheduler resumes
// fibers in a shuffled order (so a missing barrier shows up as a wrong result) and releases a barrier once
// every live thread of the block / warp waits on it. It reports, instead of hanging or guessing:
//   * divergent barriers (part of a block at __syncthreads, another part at a warp barrier or exited),
//   * shuffles with exited lanes (undefined on a GPU), block sizes that are not whole warps.
// Dynamic shared memory and every at::empty output are filled with NaN / 0xff bytes, so a value that a
// kernel reads before writing, or an output it never writes, shows up in the comparison with the reference.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's device math, as overloads (fmax: NaN-ignoring like fmaxf).
using std::exp;
using std::isnan;
using std::log;
using std::sqrt;
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

namespace emu {

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned current = 0;
  std::function<void()> body;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> lanes;  // one 8-byte slot per thread for shuffles
};

inline Block* block = nullptr;
inline std::mt19937 schedule_rng(12345);

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("cuda emulation: " + what); }

inline void wait(State state) {
  Fiber& fiber = block->fibers[block->current];
  fiber.state = state;
  swapcontext(&fiber.context, &block->scheduler);
}

inline void trampoline() {
  block->body();
  block->fibers[block->current].state = State::kDone;  // uc_link returns to the scheduler
}

inline unsigned char* shared_memory() { return block->shared.data(); }

template <typename T>
T exchange(T value, unsigned source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned warp_base = threadIdx.x / kWarp * kWarp;
  std::memcpy(&block->lanes[threadIdx.x], &value, sizeof(T));
  wait(State::kWarpBarrier);
  T result;
  std::memcpy(&result, &block->lanes[warp_base + source_lane % kWarp], sizeof(T));
  wait(State::kWarpBarrier);  // nobody overwrites a slot before every lane has read
  return result;
}

// Releases the barriers every live thread has reached; false when nothing can move (a deadlock).
inline bool release(unsigned threads) {
  std::vector<unsigned> live;
  for (unsigned t = 0; t < threads; ++t)
    if (block->fibers[t].state != State::kDone) live.push_back(t);
  if (!live.empty() && std::all_of(live.begin(), live.end(),
                                   [](unsigned t) { return block->fibers[t].state == State::kBlockBarrier; })) {
    for (unsigned t : live) block->fibers[t].state = State::kReady;
    return true;
  }
  bool released = false;
  for (unsigned w = 0; w < threads; w += kWarp) {
    int waiting = 0, done = 0;
    for (unsigned t = w; t < w + kWarp; ++t) {
      waiting += block->fibers[t].state == State::kWarpBarrier;
      done += block->fibers[t].state == State::kDone;
    }
    if (waiting == 0) continue;
    if (done > 0) fail("a warp shuffle or __syncwarp with exited lanes in warp " + std::to_string(w / kWarp));
    if (waiting == kWarp) {
      for (unsigned t = w; t < w + kWarp; ++t) block->fibers[t].state = State::kReady;
      released = true;
    }
  }
  return released;
}

template <typename Kernel, typename... Args>
void run(Kernel kernel, unsigned grid, int threads, size_t shared_bytes, Args... args) {
  if (threads <= 0 || threads % kWarp != 0) fail("block size " + std::to_string(threads) + " is not whole warps");
  Block state;
  state.fibers.resize(threads);
  for (Fiber& fiber : state.fibers) fiber.stack.reset(new char[kStackBytes]);
  state.lanes.resize(threads);
  state.body = [&] { kernel(args...); };
  Block* previous = block;
  block = &state;
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  gridDim = {grid, 1, 1};
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    state.shared.assign(shared_bytes + 16, 0xff);
    for (Fiber& fiber : state.fibers) {
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &state.scheduler;
      makecontext(&fiber.context, trampoline, 0);
      fiber.state = State::kReady;
    }
    while (true) {
      std::shuffle(order.begin(), order.end(), schedule_rng);
      for (unsigned t : order) {
        if (state.fibers[t].state != State::kReady) continue;
        state.current = t;
        threadIdx = {t, 0, 0};
        swapcontext(&state.scheduler, &state.fibers[t].context);
      }
      if (std::all_of(state.fibers.begin(), state.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; }))
        break;
      if (!release(threads)) fail("deadlock: threads wait on different barriers in block " + std::to_string(b));
    }
  }
  block = previous;
}

// Outputs start as NaN (floats) / all-ones bytes (integers), so unwritten elements cannot pass a comparison.
inline at::Tensor poisoned(at::Tensor t) {
  return t.is_floating_point() ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t.fill_(-1);
}
inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions options) { return poisoned(at::empty(size, options)); }
inline at::Tensor empty_like(const at::Tensor& t) { return poisoned(at::empty_like(t)); }

}  // namespace emu

// The CUDA runtime and c10/cuda calls the host code makes.
template <typename T>
T __shfl_sync(unsigned mask, T value, int lane) {
  if (mask != 0xffffffffu) emu::fail("partial shuffle masks are not emulated");
  return emu::exchange(value, static_cast<unsigned>(lane));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int offset) {
  if (mask != 0xffffffffu) emu::fail("partial shuffle masks are not emulated");
  return emu::exchange(value, (threadIdx.x % emu::kWarp) ^ static_cast<unsigned>(offset));
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::State::kWarpBarrier); }
inline void __syncthreads() { emu::wait(emu::State::kBlockBarrier); }

using cudaError_t = int;
enum EmulatedAttribute { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaGetDevice(int* device) { return *device = 0; }
inline cudaError_t cudaDeviceGetAttribute(int* value, EmulatedAttribute, int) {
  *value = 227 * 1024;  // H100
  return 0;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, EmulatedAttribute, int) {
  return 0;
}
#define C10_CUDA_CHECK(EXPR) (void)(EXPR)
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
