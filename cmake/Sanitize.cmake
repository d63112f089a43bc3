# CUSTOM_BN_SANITIZE=ON builds every target of this project (libcustom_bn with its per-ISA CPU
# kernel objects, the GoogleTest suite, the emulated CUDA kernel suite) with AddressSanitizer and
# UndefinedBehaviorSanitizer. Prebuilt dependencies (libtorch, libgomp, libgtest) stay
# uninstrumented; ASan still sees their heap through its malloc/new interceptors.
# `make test-sanitize` configures build/sanitize with it and runs ctest with the runtime options
# and suppressions of tests/sanitize/.
#
# Included by the top-level CMakeLists.txt after WITH_CUDA is known and before any target exists:
# directory-scoped options reach only targets created after them.
option(CUSTOM_BN_SANITIZE
       "Build custom_bn's own targets with -fsanitize=address,undefined (needs WITH_CUDA=OFF)" OFF)

if(CUSTOM_BN_SANITIZE)
  if(WITH_CUDA)
    # nvcc objects cannot be ASan-instrumented, and the CUDA kernel bodies are checked on the host
    # through the emulator suite instead.
    message(FATAL_ERROR "custom_bn: CUSTOM_BN_SANITIZE=ON needs WITH_CUDA=OFF")
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "^(GNU|Clang)$")
    message(FATAL_ERROR "custom_bn: CUSTOM_BN_SANITIZE=ON needs GCC or Clang, "
                        "not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  # -fno-sanitize-recover=undefined: undefined behaviour ends the test process with an error
  # instead of printing a line and carrying on to a pass. Frame pointers give LeakSanitizer's
  # and ASan's malloc stacks (fast unwinder) their callers.
  set(_custom_bn_sanitize_flags
      -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:${_custom_bn_sanitize_flags}>")
  add_link_options(-fsanitize=address,undefined)
  message(STATUS "custom_bn: AddressSanitizer + UndefinedBehaviorSanitizer on")
endif()
