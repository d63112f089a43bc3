#pragma once
// How every backend sees the input: a channel-major view of n samples, c channels and hw values
// per sample and channel, in one of two layouts. Plain C++ (no ATen): the CPU kernels, the CUDA
// launch configuration and the emulated kernel tests share it.
#include <cstdint>

namespace custom_bn {

enum class Layout {
  kContiguous,    // channel c is n runs of hw contiguous values
  kChannelsLast,  // n * hw rows of c contiguous values
};

struct Geometry {
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 1;
  Layout layout = Layout::kContiguous;

  int64_t count() const { return n * hw; }  // values per channel
  int64_t rows() const { return n * hw; }   // rows of the channels-last layout
};

// With hw == 1 a contiguous (N, C, 1, ...) tensor already is N rows of C channels, which the
// channels-last paths process with every thread / vector lane busy.
inline Layout choose_layout(bool channels_last_format, int64_t hw) {
  return channels_last_format || hw == 1 ? Layout::kChannelsLast : Layout::kContiguous;
}

}  // namespace custom_bn
