# The CPU kernels (kernels/cpu/*_kernel.cpp), compiled once per instruction-set level of
# kernels/cpu/cpu_capabilities.txt (setup.py reads the same file), and OpenMP for the whole
# library: at::parallel_for is ATen's inline OpenMP code, serial unless compiled with it.

# The OpenMP runtime that libtorch loads itself: linking that one rather than the compiler's
# keeps a single OpenMP thread pool in the process.
function(custom_bn_torch_openmp_library out)
  get_filename_component(_lib_dir "${TORCH_LIBRARY}" DIRECTORY)
  file(GLOB _found "${_lib_dir}/libgomp*.so*")
  if(_found)
    list(GET _found 0 _lib)
    set(${out} "${_lib}" PARENT_SCOPE)
  else()
    find_package(OpenMP REQUIRED COMPONENTS CXX)
    set(${out} OpenMP::OpenMP_CXX PARENT_SCOPE)
  endif()
endfunction()

function(custom_bn_add_cpu_capabilities target)
  custom_bn_torch_openmp_library(_openmp)
  message(STATUS "custom_bn: OpenMP runtime ${_openmp}")
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  target_link_libraries(${target} PRIVATE "${_openmp}")

  set(_txt "${PROJECT_SOURCE_DIR}/kernels/cpu/cpu_capabilities.txt")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_txt}")
  # Lines that are neither comments nor blank, in order (setup.py parses the file the same way).
  file(STRINGS "${_txt}" _levels REGEX "^[^#]*[A-Za-z0-9]")
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(_x86 1)
  else()
    list(GET _levels 0 _levels)  # the portable level only
    set(_x86 0)
  endif()
  target_compile_definitions(${target} PRIVATE CUSTOM_BN_CPU_X86=${_x86})
  file(GLOB _per_isa_sources CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/kernels/cpu/*_kernel.cpp")
  set(_names "")
  foreach(_line IN LISTS _levels)
    separate_arguments(_flags UNIX_COMMAND "${_line}")
    list(POP_FRONT _flags _level)
    set(_objects ${target}_cpu_${_level})
    add_library(${_objects} OBJECT ${_per_isa_sources})
    set_target_properties(${_objects} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    target_include_directories(${_objects} PRIVATE
      "${PROJECT_SOURCE_DIR}/csrc" "${PROJECT_SOURCE_DIR}/kernels")
    # An object library links nothing: this only takes torch's headers, definitions and flags.
    target_link_libraries(${_objects} PRIVATE torch)
    target_compile_definitions(${_objects} PRIVATE CPU_CAPABILITY=${_level} CPU_CAPABILITY_${_level})
    target_compile_options(${_objects} PRIVATE -fopenmp ${_flags})
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${_objects}>)
    list(APPEND _names ${_level})
  endforeach()
  message(STATUS "custom_bn: CPU kernels for ${_names}, chosen at run time")
endfunction()
