// Linked against CustomBN::custom_bn with --as-needed, yet referencing no symbol of it: the
// operators are reached through the dispatcher by name only, as a TorchScript or AOT-compiled
// program would. If the linker dropped libcustom_bn, its static registrations never ran and the
// schema lookup below fails. Deliberately includes no custom_bn header.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <tuple>

namespace {

int fail(const char* what) {
  std::cerr << "registration_as_needed: " << what << "\n";
  return 1;
}

}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto forward = dispatcher.findSchema({"custom_bn::batch_norm_forward", ""});
  const auto backward = dispatcher.findSchema({"custom_bn::batch_norm_backward", ""});
  if (!forward || !backward) {
    return fail("custom_bn operators are not registered: was libcustom_bn dropped by the linker?");
  }
  if (!forward->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    return fail("custom_bn::batch_norm_forward has no CPU kernel");
  }

  using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, double);
  const auto op = forward->typed<ForwardSig>();
  const at::Tensor x = at::randn({4, 3, 5}, at::kDouble);
  const auto [y, mean, invstd] =
      op.call(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5);
  const at::Tensor expected =
      at::batch_norm(x, {}, {}, {}, {}, /*training=*/true, 0.1, 1e-5, /*cudnn_enabled=*/false);
  if (!at::allclose(y, expected, 1e-9, 1e-12)) {
    return fail("custom_bn::batch_norm_forward called through the dispatcher differs from ATen");
  }
  std::cout << "custom_bn operators registered and callable without referencing the library\n";
  return 0;
}
