// SyncBatchNorm's operators (batch_norm_stats, batch_norm_backward_reduce,
// batch_norm_backward_elemt) run by the emulator through the CUDA launch sequence, checked against
// float64 ATen the way SyncBatchNorm composes them: the whole batch is split into two shards, as
// two processes hold it. Each shard's statistics are compared with at::var_mean, its sums with
// ATen's float64 sums of dz = dy * act'(z); each shard's gradients, computed from the two shards'
// sums added up and the whole batch's count (what the all-reduce hands every process), are
// concatenated and compared with float64 autograd of act(at::batch_norm(whole batch) + residual).
// The CPU operators are held to the same references.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <array>
#include <cstdio>
#include <functional>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "emulated_batch_norm.h"
#include "emulator_test_util.h"
#include "ops/sync_batch_norm.h"
#include "parity.h"

namespace custom_bn {
namespace emulator {
namespace {

using OptTensor = c10::optional<at::Tensor>;

constexpr double kEps = 1e-5;

struct SyncCase {
  std::vector<int64_t> shape;  // the whole batch
  bool channels_last = false;
  bool strided_input = false;  // every other element of a larger tensor: non-dense shards
  at::ScalarType dtype = at::kFloat;
  at::ScalarType param_dtype = at::kFloat;  // weight and bias
  bool affine = true;
  Activation activation = Activation::kIdentity;
  double activation_param = 0.0;
  bool residual = false;
  int64_t first_shard = -1;  // samples of the first shard; -1: half of them; 0: an empty shard
  EmulatedDevice device;
  size_t index = 0;  // seed and schedule

  std::string name() const {
    std::ostringstream os;
    os << activation_name(activation) << (residual ? "_residual_" : "_") << c10::toString(dtype);
    if (param_dtype != dtype) os << "_params" << c10::toString(param_dtype);
    os << "_" << shape_name(shape) << (channels_last ? "_channels_last" : "")
       << (strided_input ? "_strided_input" : "") << (affine ? "" : "_noaffine")
       << (first_shard == 0 ? "_empty_shard" : "");
    return os.str();
  }
};

void PrintTo(const SyncCase& c, std::ostream* os) { *os << c.name(); }

// A faulty SyncBatchNorm's elementwise pass: this shard's count or its own sums in place of the
// whole batch's.
struct SyncFault {
  bool local_count = false;
  bool local_sums = false;
};

at::Tensor whole_input(const SyncCase& c, at::MemoryFormat fmt) {
  const at::Tensor values = channel_varied_input(c.shape, c.dtype);
  if (!c.strided_input) return values.contiguous(fmt);
  std::vector<int64_t> wide = c.shape;
  wide.back() *= 2;
  const at::Tensor storage = at::full(wide, 123.0, values.options()).contiguous(fmt);
  at::Tensor view = storage.slice(-1, 0, wide.back(), 2);
  view.copy_(values);
  return view;
}

::testing::AssertionResult matches(const std::string& what, const at::Tensor& actual,
                                   at::ScalarType dtype, const at::Tensor& expected) {
  if (actual.scalar_type() != dtype) {
    return ::testing::AssertionFailure()
           << what << ": dtype " << actual.scalar_type() << " != expected " << dtype;
  }
  return close(what, actual, expected, tolerance_for(dtype));
}

// dy * act'(z) in float64, by autograd through ATen's activation.
at::Tensor activation_grad(const SyncCase& c, const at::Tensor& z64, const at::Tensor& dy64) {
  if (c.activation == Activation::kIdentity) return dy64;
  const at::Tensor z = z64.detach().requires_grad_(true);
  const at::Tensor y = aten_activation(c.activation, c.activation_param, z);
  return torch::autograd::grad({y}, {z}, {dy64})[0];
}

::testing::AssertionResult check_sync(const SyncCase& c, SyncFault fault = {}) {
  const int64_t dim = static_cast<int64_t>(c.shape.size());
  const auto fmt = c.channels_last ? channels_last_format(dim) : at::MemoryFormat::Contiguous;
  const at::ScalarType acc = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const std::string act = activation_name(c.activation);
  const int64_t C = c.shape[1];
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  at::manual_seed(c.index);
  const at::Tensor x = whole_input(c, fmt);
  const at::Tensor dy = at::randn(c.shape, f64).to(c.dtype).contiguous(fmt);
  // Contiguous whatever the input's layout: the operators must read it in the input's.
  const OptTensor residual =
      c.residual ? OptTensor(at::randn(c.shape, f64).to(c.dtype)) : OptTensor();
  OptTensor weight, bias;
  if (c.affine) {
    weight = (at::randn({C}, f64) * 0.5 + 1.0).to(c.param_dtype);
    bias = at::randn({C}, f64).to(c.param_dtype);
  }

  std::vector<int64_t> dims = {0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  std::vector<int64_t> channel_shape(dim, 1);
  channel_shape[1] = C;
  const at::Tensor x64 = x.to(at::kDouble), dy64 = dy.to(at::kDouble);
  const at::Tensor r64 = residual ? residual->to(at::kDouble) : at::zeros_like(x64);
  const at::Tensor w64 = c.affine ? weight->to(at::kDouble) : at::ones({C}, f64);
  const at::Tensor b64 = c.affine ? bias->to(at::kDouble) : at::zeros({C}, f64);

  // The whole batch's statistics, as SyncBatchNorm's forward merges them and hands them to both
  // backward pieces (in the accumulation dtype).
  const auto [var64, mean64] = at::var_mean(x64, dims, /*unbiased=*/false);
  const at::Tensor mean = mean64.to(acc), invstd = (var64 + kEps).rsqrt().to(acc);

  // The gradients of the whole batch: float64 autograd through ATen, no shards. (grad_residual
  // is dz, also where no residual is given.)
  const at::Tensor x_leaf = x64.clone().requires_grad_(true);
  const at::Tensor r_leaf = r64.clone().requires_grad_(true);
  const at::Tensor z_graph =
      at::batch_norm(x_leaf, w64, b64, {}, {}, /*training=*/true, 0.0, kEps, false) + r_leaf;
  const auto grads_ref =
      torch::autograd::grad({aten_activation(c.activation, c.activation_param, z_graph)},
                            {x_leaf, r_leaf}, {dy64});

  const int64_t n = c.shape[0];
  const int64_t first = c.first_shard < 0 ? n / 2 : c.first_shard;
  const std::array<std::pair<int64_t, int64_t>, 2> shards = {{{0, first}, {first, n - first}}};
  const auto shard = [&](const at::Tensor& t, int k) {
    return t.narrow(0, shards[k].first, shards[k].second);
  };
  const auto shard_opt = [&](const OptTensor& t, int k) {
    return t.has_value() ? OptTensor(shard(*t, k)) : OptTensor();
  };
  const int64_t count = x.numel() / C;

  std::ostringstream failures;
  const auto expect = [&](const ::testing::AssertionResult& r) {
    if (!r) failures << "\n  " << r.message();
  };
  const auto expect_true = [&](bool ok, const std::string& what) {
    if (!ok) failures << "\n  " << what;
  };
  try {
    dev::emu::ScopedSchedule schedule(schedule_for(c.index));
    std::array<at::Tensor, 2> sums, sums_cpu;
    for (int k = 0; k < 2; ++k) {
      const std::string of = " of shard " + std::to_string(k);
      const at::Tensor xk = shard(x, k), dyk = shard(dy, k), xk64 = shard(x64, k);
      const OptTensor rk = shard_opt(residual, k);

      // An empty shard has zero statistics (at::var_mean's would be NaN).
      at::Tensor mean_ref = at::zeros({C}, f64), var_ref = at::zeros({C}, f64);
      if (xk.numel() > 0) std::tie(var_ref, mean_ref) = at::var_mean(xk64, dims, false);
      const auto [m, v] = batch_norm_stats(c.device, xk);
      const auto [m_cpu, v_cpu] = custom_bn::batch_norm_stats(xk);
      for (const auto& [path, mk, vk] : {std::tuple{" (emulated CUDA)", m, v},
                                         std::tuple{" (CPU operator)", m_cpu, v_cpu}}) {
        expect(matches("mean" + of + path, mk, acc, mean_ref));
        expect(matches("var" + of + path, vk, acc, var_ref));
        expect_true(!mk.is_alias_of(vk), "mean and var" + of + path + " alias");
      }

      // z recomputed from the whole batch's (rounded) statistics the operators are given.
      const at::Tensor centred = xk64 - mean.to(at::kDouble).reshape(channel_shape);
      const at::Tensor z = centred * invstd.to(at::kDouble).reshape(channel_shape) *
                               w64.reshape(channel_shape) +
                           b64.reshape(channel_shape) + shard(r64, k);
      const at::Tensor dz = activation_grad(c, z, shard(dy64, k));
      const at::Tensor sums_ref = at::stack({dz.sum(dims), (dz * centred).sum(dims)});
      sums[k] = batch_norm_backward_reduce(c.device, dyk, xk, weight, bias, rk, mean, invstd, act,
                                           c.activation_param);
      sums_cpu[k] = custom_bn::batch_norm_backward_reduce(dyk, xk, weight, bias, rk, mean, invstd,
                                                          act, c.activation_param);
      expect(matches("sums" + of + " (emulated CUDA)", sums[k], acc, sums_ref));
      expect(matches("sums" + of + " (CPU operator)", sums_cpu[k], acc, sums_ref));
    }

    // What SyncBatchNorm's all-reduce hands every process.
    const at::Tensor total = sums[0] + sums[1], total_cpu = sums_cpu[0] + sums_cpu[1];
    std::vector<std::array<bool, 2>> masks = {{true, true}};
    if (c.dtype == at::kDouble) {
      // grad_input alone, and grad_residual alone (the elementwise kernel without the sums).
      masks.push_back({true, false});
      masks.push_back({false, true});
    }
    for (const auto& mask : masks) {
      std::ostringstream which;
      which << " [mask " << mask[0] << mask[1] << "]";
      std::array<std::vector<at::Tensor>, 2> grad_input, grad_residual;  // emulated, CPU
      for (int k = 0; k < 2; ++k) {
        const at::Tensor xk = shard(x, k), dyk = shard(dy, k);
        const OptTensor rk = shard_opt(residual, k);
        const at::Tensor& given = fault.local_sums ? sums[k] : total;
        const at::Tensor given_before = given.clone();
        const int64_t given_count = fault.local_count ? xk.numel() / C : count;
        const auto [dx, dr] =
            batch_norm_backward_elemt(c.device, dyk, xk, weight, bias, rk, mean, invstd, given,
                                      given_count, act, c.activation_param, mask);
        const auto [dx_cpu, dr_cpu] = custom_bn::batch_norm_backward_elemt(
            dyk, xk, weight, bias, rk, mean, invstd, total_cpu, count, act, c.activation_param,
            mask);
        expect_true(given.equal(given_before), "elemt wrote into its sums" + which.str());
        const std::string of = " of shard " + std::to_string(k) + which.str();
        for (const auto& [path, wanted, emulated, cpu, out] :
             {std::tuple{"grad_input", mask[0], dx, dx_cpu, &grad_input},
              std::tuple{"grad_residual", mask[1], dr, dr_cpu, &grad_residual}}) {
          for (const at::Tensor& t : {emulated, cpu}) {
            if (wanted) {
              // Outputs take the input's memory format (a non-dense one becomes dense; an
              // empty one counts as contiguous, as torch's is_contiguous() says).
              expect_true(t.numel() == 0 || t.is_contiguous(fmt),
                          std::string(path) + of + " is not dense in the input's memory format");
            } else {
              expect_true(t.dim() == 1 && t.numel() == 0,
                          std::string(path) + of + ": not requested, expected an empty [0] tensor");
            }
          }
          (*out)[0].push_back(emulated);
          (*out)[1].push_back(cpu);
        }
      }
      for (int path = 0; path < 2; ++path) {
        const std::string by = path == 0 ? " (emulated CUDA)" : " (CPU operator)";
        if (mask[0]) {
          expect(matches("grad_input" + which.str() + by, at::cat(grad_input[path], 0), c.dtype,
                         grads_ref[0]));
        }
        if (mask[1]) {
          expect(matches("grad_residual" + which.str() + by, at::cat(grad_residual[path], 0),
                         c.dtype, grads_ref[1]));
        }
      }
    }
  } catch (const dev::emu::EmulatorError& e) {
    return ::testing::AssertionFailure() << "emulator: " << e.what();
  }
  const std::string f = failures.str();
  if (f.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << f;
}

// Every activation (with and without a residual, contiguous even for a channels-last input), both
// layouts and an (N, C) input, in float64, float32, float16 with float parameters and bfloat16 with
// its own, on the GPU's configuration and on devices that split channels over many blocks; then,
// in float32 and bfloat16, an empty shard, non-dense shards and no affine parameters.
std::vector<SyncCase> sync_cases() {
  struct Epilogue {
    Activation activation;
    double param;
    bool residual;
  };
  const std::vector<Epilogue> epilogues = {{Activation::kIdentity, 0.0, false},
                                           {Activation::kRelu, 0.0, true},
                                           {Activation::kLeakyRelu, 0.2, false},
                                           {Activation::kElu, 1.3, true},
                                           {Activation::kSilu, 0.0, true}};
  struct Layout {
    std::vector<int64_t> shape;
    bool channels_last;
  };
  const std::vector<Layout> layouts = {
      {{6, 17, 33}, false}, {{4, 40, 3, 3}, true}, {{9, 17}, false}};
  const std::vector<std::pair<at::ScalarType, at::ScalarType>> dtypes = {
      {at::kDouble, at::kDouble},
      {at::kFloat, at::kFloat},
      {at::kHalf, at::kFloat},
      {at::kBFloat16, at::kBFloat16}};
  const std::vector<EmulatedDevice> devices = {gpu_defaults(), many_splits(), two_warp_splits(),
                                               index64()};
  std::vector<SyncCase> cases;
  const auto add = [&](const Layout& l, at::ScalarType dtype, at::ScalarType param_dtype,
                       const Epilogue& e) -> SyncCase& {
    SyncCase c;
    c.shape = l.shape;
    c.channels_last = l.channels_last;
    c.dtype = dtype;
    c.param_dtype = param_dtype;
    c.activation = e.activation;
    c.activation_param = e.param;
    c.residual = e.residual;
    c.index = 40000 + cases.size();
    c.device = devices[cases.size() % devices.size()];
    cases.push_back(c);
    return cases.back();
  };
  for (const auto& [dtype, param_dtype] : dtypes) {
    for (const Layout& l : layouts) {
      for (const Epilogue& e : epilogues) add(l, dtype, param_dtype, e);
    }
  }
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (size_t i = 0; i < 2; ++i) {
      add(layouts[i], dtype, dtype, epilogues[1]).first_shard = 0;
      add(layouts[i], dtype, dtype, epilogues[3]).strided_input = true;
      add(layouts[i], dtype, dtype, epilogues[4]).affine = false;
    }
  }
  return cases;
}

class EmulatedSyncBatchNorm : public ::testing::TestWithParam<SyncCase> {};

TEST_P(EmulatedSyncBatchNorm, ShardsMatchTheWholeBatchInFloat64) {
  EXPECT_TRUE(check_sync(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(
    Shards, EmulatedSyncBatchNorm, ::testing::ValuesIn(sync_cases()),
    [](const ::testing::TestParamInfo<SyncCase>& info) {
      return info.param.name() + "_" + std::to_string(info.index);
    });

std::vector<std::string> launched_kernels() {
  std::vector<std::string> names;
  for (const auto& r : dev::emu::launch_log()) names.push_back(r.kernel);
  return names;
}

// Each operator is one kernel of the training passes: stats the statistics kernel, reduce the
// backward's reduction, elemt the training-mode elementwise pass with no reduction before it
// (its sums are given). An empty batch launches nothing: zero statistics and sums, empty
// gradients.
TEST(EmulatedSyncLaunches, OneKernelEachAndNoneForAnEmptyBatch) {
  const EmulatedDevice d = many_splits();
  for (int64_t n : {4, 0}) {
    const at::Tensor x = channel_varied_input({n, 3, 5}, at::kFloat), dy = at::randn_like(x);
    const at::Tensor mean = at::randn({3}), invstd = at::rand({3}) + 0.5;
    const at::Tensor sums = at::randn({2, 3});
    const auto expect_launches = [&](const char* op, const char* kernel) {
      const auto names = launched_kernels();
      if (n == 0) {
        EXPECT_TRUE(names.empty()) << op << " launched " << names.size() << " kernels";
        return;
      }
      ASSERT_EQ(names.size(), 1u) << op;
      EXPECT_TRUE(names[0].starts_with(kernel)) << op << " launched " << names[0];
    };
    dev::emu::clear_launch_log();
    const auto [m, v] = batch_norm_stats(d, x);
    expect_launches("stats", "batch_norm_collect_stats_contiguous_kernel<");
    dev::emu::clear_launch_log();
    const at::Tensor s = batch_norm_backward_reduce(d, dy, x, {}, {}, {}, mean, invstd, "relu", 0);
    expect_launches("reduce", "batch_norm_backward_reduce_contiguous_kernel<");
    dev::emu::clear_launch_log();
    const auto [dx, dr] = batch_norm_backward_elemt(d, dy, x, {}, {}, {}, mean, invstd, sums, 20,
                                                    "relu", 0, {true, true});
    expect_launches("elemt", "batch_norm_backward_elementwise_contiguous_kernel<true,");
    if (n == 0) {
      EXPECT_TRUE(m.equal(at::zeros({3})) && v.equal(at::zeros({3})));
      EXPECT_TRUE(s.equal(at::zeros({2, 3})));
      EXPECT_EQ(dx.sizes(), x.sizes());
      EXPECT_EQ(dr.sizes(), x.sizes());
    }
  }
}

// Each bad call raises in the emulated CUDA operator what the CPU operator raises (the same
// class and message: the same checks in the same order), before anything is launched.
TEST(EmulatedSyncLaunches, RejectWhatTheCpuOperatorsReject) {
  const EmulatedDevice d = many_splits();
  const at::Tensor x = channel_varied_input({4, 3, 5}, at::kFloat), dy = at::randn_like(x);
  const at::Tensor mean = at::zeros({3}), invstd = at::ones({3}), sums = at::zeros({2, 3});
  const int64_t count = 20;  // this batch's
  using Reduce = std::function<at::Tensor(const at::Tensor& grad_output, const at::Tensor& input,
                                          const OptTensor& weight, const OptTensor& residual,
                                          const at::Tensor& mean, const char* activation)>;
  using Elemt = std::function<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor& sums, int64_t count, const at::Tensor& mean, const char* activation)>;
  const std::array<std::function<void(const at::Tensor&)>, 2> stats = {
      [&](const at::Tensor& input) { batch_norm_stats(d, input); },
      [&](const at::Tensor& input) { custom_bn::batch_norm_stats(input); }};
  const std::array<Reduce, 2> reduce = {
      [&](const at::Tensor& g, const at::Tensor& i, const OptTensor& w, const OptTensor& r,
          const at::Tensor& m, const char* a) {
        return batch_norm_backward_reduce(d, g, i, w, {}, r, m, invstd, a, 0.0);
      },
      [&](const at::Tensor& g, const at::Tensor& i, const OptTensor& w, const OptTensor& r,
          const at::Tensor& m, const char* a) {
        return custom_bn::batch_norm_backward_reduce(g, i, w, {}, r, m, invstd, a, 0.0);
      }};
  const std::array<Elemt, 2> elemt = {
      [&](const at::Tensor& s, int64_t n, const at::Tensor& m, const char* a) {
        return batch_norm_backward_elemt(d, dy, x, {}, {}, {}, m, invstd, s, n, a, 0.0,
                                         {true, true});
      },
      [&](const at::Tensor& s, int64_t n, const at::Tensor& m, const char* a) {
        return custom_bn::batch_norm_backward_elemt(dy, x, {}, {}, {}, m, invstd, s, n, a, 0.0,
                                                    {true, true});
      }};

  struct BadCall {
    const char* what;
    bool value_error;
    std::function<void(int path)> call;  // path 0: emulated CUDA, 1: CPU operator
  };
  const std::vector<BadCall> calls = {
      {"stats of a 1-D input", false, [&](int p) { stats[p](at::randn({5})); }},
      {"stats of an integer input", false,
       [&](int p) { stats[p](at::ones({4, 3}, at::kInt)); }},
      {"reduce with a weight of C + 1 entries", false,
       [&](int p) { reduce[p](dy, x, at::ones({4}), {}, mean, "relu"); }},
      {"reduce with a float64 mean for float input", false,
       [&](int p) { reduce[p](dy, x, {}, {}, mean.to(at::kDouble), "relu"); }},
      {"reduce with a residual of another shape", false,
       [&](int p) { reduce[p](dy, x, {}, at::zeros({4, 3, 6}), mean, "relu"); }},
      {"reduce with grad_output of another dtype", false,
       [&](int p) { reduce[p](dy.to(at::kDouble), x, {}, {}, mean, "relu"); }},
      {"reduce with an unknown activation", true,
       [&](int p) { reduce[p](dy, x, {}, {}, mean, "gelu"); }},
      {"elemt with sums of shape [2, C + 1]", false,
       [&](int p) { elemt[p](at::zeros({2, 4}), count, mean, "relu"); }},
      {"elemt with sums of shape [C]", false,
       [&](int p) { elemt[p](at::zeros({3}), count, mean, "relu"); }},
      {"elemt with integer sums", false,
       [&](int p) { elemt[p](sums.to(at::kInt), count, mean, "relu"); }},
      {"elemt with a count below this batch's", true,
       [&](int p) { elemt[p](sums, count - 1, mean, "relu"); }},
      {"elemt with a mean of C + 1 entries and a bad count (the mean is checked first)", false,
       [&](int p) { elemt[p](sums, count - 1, at::zeros({4}), "relu"); }},
      {"elemt with an unknown activation and bad sums (the activation is checked first)", true,
       [&](int p) { elemt[p](at::zeros({3}), count, mean, "gelu"); }},
  };
  for (const BadCall& bad : calls) {
    std::array<std::string, 2> message;
    for (int path = 0; path < 2; ++path) {
      const char* by = path == 0 ? "emulated CUDA" : "CPU operator";
      dev::emu::clear_launch_log();
      try {
        bad.call(path);
        ADD_FAILURE() << bad.what << ": the " << by << " did not throw";
      } catch (const c10::Error& e) {
        message[path] = e.what_without_backtrace();
        EXPECT_EQ(dynamic_cast<const c10::ValueError*>(&e) != nullptr, bad.value_error)
            << bad.what << " (" << by << "): " << message[path];
      }
      EXPECT_TRUE(dev::emu::launch_log().empty()) << bad.what << ": launched before rejecting";
    }
    EXPECT_EQ(message[0], message[1]) << bad.what;
  }
}

// The harness can fail: a SyncBatchNorm that hands the elementwise pass this shard's count, or
// this shard's own sums, instead of the whole batch's computes the gradients of two separate batch
// norms, and the comparison with the whole batch must catch it.
TEST(DeliberateBugs, SyncElemtWithLocalCountOrSumsIsCaught) {
  for (bool channels_last : {false, true}) {
    SyncCase c;
    c.shape = channels_last ? std::vector<int64_t>{4, 40, 3, 3} : std::vector<int64_t>{6, 17, 33};
    c.channels_last = channels_last;
    c.activation = Activation::kRelu;
    c.residual = true;
    c.device = two_warp_splits();
    c.index = 7;
    ASSERT_TRUE(check_sync(c)) << "the correct composition must pass: " << c.name();
    const std::vector<std::pair<const char*, SyncFault>> faults = {
        {"elemt given this shard's count", {true, false}},
        {"elemt given this shard's sums", {false, true}}};
    for (const auto& [what, fault] : faults) {
      const ::testing::AssertionResult result = check_sync(c, fault);
      EXPECT_FALSE(result) << what << " went unnoticed (" << c.name() << ")";
      const std::string message = result.message();
      std::printf("[ caught   ] %s (%s):%s\n", what, channels_last ? "channels-last" : "contiguous",
                  message.substr(0, message.find('\n', 1)).c_str());
    }
  }
}

}  // namespace
}  // namespace emulator
}  // namespace custom_bn
