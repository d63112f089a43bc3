// The operators are registered with the dispatcher, with the schemas DESIGN.md fixes, and have
// kernels for the dispatch keys this build provides.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <custom_bn/custom_bn.h>

#include <sstream>
#include <string>

namespace {

c10::OperatorHandle find_op(const char* name) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!op) throw std::runtime_error(std::string(name) + " is not registered");
  return *op;
}

std::string schema_of(const char* name) {
  std::ostringstream os;
  os << find_op(name).schema();
  return os.str();
}

TEST(Schemas, ForwardIsRegisteredWithAnnotatedMutation) {
  ASSERT_TRUE(c10::Dispatcher::singleton().findSchema({"custom_bn::batch_norm_forward", ""}))
      << "custom_bn::batch_norm_forward is not registered";
  EXPECT_EQ(schema_of("custom_bn::batch_norm_forward"),
            "custom_bn::batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, "
            "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
            "float eps) -> (Tensor, Tensor, Tensor)");
  const auto& schema = find_op("custom_bn::batch_norm_forward").schema();
  // Running stats are written in place and never aliased by an output.
  EXPECT_TRUE(schema.is_mutable({c10::SchemaArgType::input, 3}));
  EXPECT_TRUE(schema.is_mutable({c10::SchemaArgType::input, 4}));
  EXPECT_FALSE(schema.is_mutable({c10::SchemaArgType::input, 0}));
  for (size_t i = 0; i < schema.returns().size(); ++i) {
    EXPECT_FALSE(schema.returns()[i].alias_info()) << "output " << i << " aliases an input";
  }
}

TEST(Schemas, BackwardIsRegisteredWithOutputMask) {
  ASSERT_TRUE(c10::Dispatcher::singleton().findSchema({"custom_bn::batch_norm_backward", ""}))
      << "custom_bn::batch_norm_backward is not registered";
  EXPECT_EQ(schema_of("custom_bn::batch_norm_backward"),
            "custom_bn::batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
            "Tensor save_mean, Tensor save_invstd, bool training, float eps, bool[3] "
            "output_mask) -> (Tensor, Tensor, Tensor)");
  EXPECT_FALSE(find_op("custom_bn::batch_norm_backward").schema().is_mutable());
}

TEST(Schemas, KernelsForEveryBackendOfThisBuild) {
  for (const char* name : {"custom_bn::batch_norm_forward", "custom_bn::batch_norm_backward"}) {
    const auto op = find_op(name);
    EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name << ": no CPU kernel";
    // Registered once under the Autograd alias key, which covers every backend.
    EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::Autograd))
        << name << ": no Autograd kernel";
#if CUSTOM_BN_WITH_CUDA
    EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::CUDA))
        << name << ": built WITH_CUDA but no CUDA kernel is registered";
#endif
  }
}

}  // namespace
