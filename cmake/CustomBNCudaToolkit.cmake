# custom_bn_locate_cuda_toolkit()
#
# Run before find_package(Torch). A CUDA build of LibTorch (the pip wheel) enables the CUDA
# language and looks for the CUDA toolkit inside its own config, even when the consumer compiles
# no CUDA code. Its FindCUDA takes the toolkit root to be the parent of the first `nvcc` on PATH,
# which is wrong when that nvcc is a wrapper script outside the toolkit (/usr/local/bin/nvcc ->
# /usr/local/cuda-13.0/bin/nvcc on this machine); Torch then stops with "Your installed Caffe2
# version uses CUDA but I cannot find the CUDA libraries". CMake's own compiler detection asks
# nvcc where its toolkit is, so hand that answer to FindCUDA.
#
# A macro, because enable_language() must run at directory scope.
macro(custom_bn_locate_cuda_toolkit)
  if(NOT CMAKE_CUDA_COMPILER_LOADED)
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      enable_language(CUDA)
    endif()
  endif()
  if(NOT CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH
        "CUDA toolkit used by Torch's CMake config")
  endif()
endmacro()
