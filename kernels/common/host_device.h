#pragma once
// Functions in kernels/common are compiled by both the host compiler (CPU kernels, the CUDA
// emulator in tests/cpp) and nvcc (CUDA kernels), so they carry both qualifiers under nvcc.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CBN_HOST_DEVICE __host__ __device__
#define CBN_INLINE __forceinline__
#else
#define CBN_HOST_DEVICE
#define CBN_INLINE inline
#endif
