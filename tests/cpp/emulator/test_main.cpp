// Entry point of the emulated kernel tests.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // at::empty then fills floating tensors with NaN: an element a kernel never writes (an output
  // or a workspace slot) poisons the comparison instead of passing by luck.
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
  at::globalContext().setDeterministicFillUninitializedMemory(true);
  // The references are tiny; ATen's parallel regions would only cost time on a small machine.
  at::set_num_threads(1);
  return RUN_ALL_TESTS();
}
