#pragma once
// The emulator backend of the launch sequence in kernels/cuda/batch_norm_launch.h: CPU tensors,
// kernels run by the CPU emulator with exactly the launch configurations that sequence computes.
// The device it pretends to be (multiprocessor count, launch-heuristic knobs) is a test choice.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "cuda/launch_config.h"
#include "cuda_emulator.h"

namespace custom_bn {
namespace emulator {

struct EmulatedDevice {
  int num_sms = 132;           // an H100 SXM
  cuda_launch::Tuning tuning;  // the launchers' defaults unless a test shrinks them
};

// "batch_norm_transform_contiguous_kernel<float, float, float, int>" from the signature of a
// function templated on `auto kernel` (GCC and Clang spell it "kernel = [&]ns::name<args>").
inline std::string kernel_name_from_signature(std::string_view signature) {
  const size_t at = signature.find("kernel = ");
  if (at == std::string_view::npos) return std::string(signature);
  std::string_view rest = signature.substr(at + 9);
  if (!rest.empty() && rest.front() == '&') rest.remove_prefix(1);
  size_t end = 0;
  for (int depth = 0; end < rest.size(); ++end) {
    const char ch = rest[end];
    if (ch == '<') ++depth;
    if (ch == '>') --depth;
    if (depth == 0 && (ch == ';' || ch == ']' || ch == ',')) break;
  }
  const std::string_view name = rest.substr(0, end);
  const size_t scope = name.substr(0, name.find('<')).rfind("::");
  return std::string(scope == std::string_view::npos ? name : name.substr(scope + 2));
}

// "batch_norm_transform_contiguous_kernel" from the above.
inline std::string bare_kernel_name(std::string_view name) {
  return std::string(name.substr(0, name.find('<')));
}

template <auto kernel>
const std::string& kernel_name() {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  return name;
}

class EmulatorBackend {
 public:
  struct DeviceGuard {
    explicit DeviceGuard(const c10::Device& device) {
      TORCH_CHECK(device.is_cpu(),
                  "the CUDA emulator runs kernels on CPU tensors, got a tensor on ", device);
    }
  };

  explicit EmulatorBackend(const EmulatedDevice& device) : device_(device) {}

  int num_sms() const { return device_.num_sms; }
  const cuda_launch::Tuning& tuning() const { return device_.tuning; }

  template <auto kernel, typename... Args>
  void launch(const cuda_launch::LaunchConfig& cfg, Args... args) const {
    dev::emu::run_grid(kernel_name<kernel>(), {cfg.grid_x, cfg.grid_y},
                       {cfg.block_x, cfg.block_y}, cfg.shared_bytes,
                       [&] { kernel(args...); });
  }

 private:
  EmulatedDevice device_;
};

}  // namespace emulator
}  // namespace custom_bn
