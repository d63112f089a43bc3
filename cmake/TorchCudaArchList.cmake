# custom_bn_torch_cuda_arch_list(<cmake-architectures> <out-var>)
#
# Translates CMake's CUDA_ARCHITECTURES syntax into Torch's TORCH_CUDA_ARCH_LIST syntax, because
# Torch's CMake config discards CMAKE_CUDA_ARCHITECTURES and generates -gencode flags from
# TORCH_CUDA_ARCH_LIST only.
#   80 / 90a      -> 8.0+PTX / 9.0a+PTX (CMake's plain entry means SASS and PTX)
#   80-real       -> 8.0                (SASS only)
#   80-virtual    -> 8.0+PTX            (Torch has no PTX-only form; SASS comes along)
function(custom_bn_torch_cuda_arch_list cmake_archs out_var)
  set(result "")
  foreach(arch IN LISTS cmake_archs)
    if(NOT arch MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
      message(FATAL_ERROR
        "custom_bn: CMAKE_CUDA_ARCHITECTURES entry '${arch}' is not supported; use numeric "
        "entries such as 80, 90a or 86-real (got '${cmake_archs}')")
    endif()
    set(entry "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(NOT CMAKE_MATCH_4 STREQUAL "-real")
      string(APPEND entry "+PTX")
    endif()
    list(APPEND result "${entry}")
  endforeach()
  set(${out_var} "${result}" PARENT_SCOPE)
endfunction()
