#pragma once
// The only way kernel bodies in kernels/cuda/*.cuh touch the hardware: thread and block
// indices, barriers, warp shuffles, atomics, shared memory, fences and fast math. Under nvcc
// each primitive is the CUDA intrinsic; under a host compiler the same kernel bodies are run by
// the CPU emulator of tests/cpp/emulator, so a kernel that used an intrinsic directly could not
// be tested on a machine without a GPU.
//
// Contract of the emulator header (tests/cpp/emulator/cuda_emulator.h, included when
// CUSTOM_BN_CUDA_EMULATOR is defined and found on the include path as "cuda_emulator.h"): it
// must provide, in namespace custom_bn::dev, the same functions as the nvcc branch below, callable
// with the same arguments (it may add defaulted ones, e.g. the call site), and the macro
// CBN_STATIC_SHARED(type, name, count), which declares `name` as an array-like object of `count`
// values of `type` shared by the threads of one block (subscriptable as name[i]).
//
// CBN_KERNEL_NAMESPACE names an inline namespace around the kernel bodies that differs between
// the two builds, so an emulated kernel (an ordinary host function) never has the mangled name
// of the nvcc host stub of the same kernel: a test executable that links a CUDA-enabled
// libcustom_bn cannot have one resolve to the other.
//
// Index accessors return int: block and grid sizes fit, and signed indices avoid mixing
// unsigned arithmetic into the kernels' index_t (int32_t or int64_t) computations.

#if defined(__CUDACC__)

// Qualifiers. A kernel is __global__; device helpers are always inlined so that the thin
// wrappers cost nothing.
#define CBN_KERNEL __global__
#define CBN_DEVICE __device__ __forceinline__
#define CBN_KERNEL_NAMESPACE device

// Static shared memory. The storage must be trivially constructible (nvcc rejects __shared__
// objects with constructors), so declare plain arrays of arithmetic types here and keep
// structured scratch in dynamic shared memory.
#define CBN_STATIC_SHARED(type, name, count) __shared__ type name[count]

namespace custom_bn {
namespace dev {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

CBN_DEVICE int thread_idx_x() { return static_cast<int>(threadIdx.x); }
CBN_DEVICE int thread_idx_y() { return static_cast<int>(threadIdx.y); }
CBN_DEVICE int block_idx_x() { return static_cast<int>(blockIdx.x); }
CBN_DEVICE int block_idx_y() { return static_cast<int>(blockIdx.y); }
CBN_DEVICE int block_dim_x() { return static_cast<int>(blockDim.x); }
CBN_DEVICE int block_dim_y() { return static_cast<int>(blockDim.y); }
CBN_DEVICE int grid_dim_x() { return static_cast<int>(gridDim.x); }
CBN_DEVICE int grid_dim_y() { return static_cast<int>(gridDim.y); }

CBN_DEVICE void sync_threads() { __syncthreads(); }
CBN_DEVICE void sync_warp(unsigned mask) { __syncwarp(mask); }

// Orders this thread's global-memory writes before its later writes as seen by every block;
// what makes a partial result visible to the block that finishes a last-block-done reduction.
CBN_DEVICE void thread_fence() { __threadfence(); }

template <typename T>
CBN_DEVICE T shfl_xor(unsigned mask, T value, int lane_mask) {
  return __shfl_xor_sync(mask, value, lane_mask, kWarpSize);
}

template <typename T>
CBN_DEVICE T shfl_down(unsigned mask, T value, unsigned delta) {
  return __shfl_down_sync(mask, value, delta, kWarpSize);
}

// Return the value stored before the addition, like atomicAdd.
CBN_DEVICE float atomic_add(float* address, float value) { return atomicAdd(address, value); }
CBN_DEVICE double atomic_add(double* address, double value) { return atomicAdd(address, value); }
CBN_DEVICE int atomic_add(int* address, int value) { return atomicAdd(address, value); }
CBN_DEVICE unsigned atomic_add(unsigned* address, unsigned value) {
  return atomicAdd(address, value);
}

// The block's dynamic shared memory (the third launch parameter), viewed as T. One extern
// declaration of a single type serves every instantiation; 16-byte alignment covers double and
// the vector types a kernel may place there.
template <typename T>
CBN_DEVICE T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char cbn_dynamic_shared_memory[];
  return reinterpret_cast<T*>(cbn_dynamic_shared_memory);
}

CBN_DEVICE float rsqrt(float x) { return ::rsqrtf(x); }
CBN_DEVICE double rsqrt(double x) { return ::rsqrt(x); }
CBN_DEVICE float sqrt(float x) { return ::sqrtf(x); }
CBN_DEVICE double sqrt(double x) { return ::sqrt(x); }

}  // namespace dev
}  // namespace custom_bn

#elif defined(CUSTOM_BN_CUDA_EMULATOR)

// Host compiler running the kernels on the CPU: kernels and helpers are ordinary inline
// functions, and the emulator supplies the primitives (see the contract above).
#define CBN_KERNEL inline
#define CBN_DEVICE inline
#define CBN_KERNEL_NAMESPACE emulated
#include "cuda_emulator.h"

#else

#error "kernels/cuda/device_primitives.cuh: compile CUDA kernel bodies with nvcc, or define CUSTOM_BN_CUDA_EMULATOR and put the emulator header (tests/cpp/emulator/cuda_emulator.h) on the include path to run them on the CPU"

#endif

namespace custom_bn {
namespace dev {

// Derived from the primitives above, so both backends get them for free. A warp is 32
// consecutive linear thread indices (x fastest), as on the hardware.
CBN_DEVICE int linear_thread_idx() { return thread_idx_y() * block_dim_x() + thread_idx_x(); }
CBN_DEVICE int block_threads() { return block_dim_x() * block_dim_y(); }
CBN_DEVICE int lane_idx() { return linear_thread_idx() % kWarpSize; }
CBN_DEVICE int warp_idx() { return linear_thread_idx() / kWarpSize; }

}  // namespace dev
}  // namespace custom_bn
