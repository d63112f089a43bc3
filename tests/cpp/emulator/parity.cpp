#include "parity.h"

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <tuple>

#include "emulated_batch_norm.h"
#include "emulator_test_util.h"
#include "ops/batch_norm.h"

namespace custom_bn {
namespace emulator {

EmulatedDevice gpu_defaults() { return EmulatedDevice{}; }

EmulatedDevice many_splits() {
  EmulatedDevice d;
  d.num_sms = 64;
  d.tuning.threads = 32;
  d.tuning.reduce_items_per_thread = 1;
  d.tuning.elementwise_items_per_thread = 1;
  return d;
}

EmulatedDevice two_warp_splits() {
  EmulatedDevice d;
  d.num_sms = 16;
  d.tuning.threads = 64;
  d.tuning.reduce_items_per_thread = 2;
  d.tuning.elementwise_items_per_thread = 2;
  return d;
}

EmulatedDevice wide_blocks() {
  EmulatedDevice d;
  d.num_sms = 8;
  d.tuning.threads = 1024;
  d.tuning.reduce_items_per_thread = 1;
  d.tuning.elementwise_items_per_thread = 1;
  return d;
}

EmulatedDevice index64() {
  EmulatedDevice d = two_warp_splits();
  d.tuning.max_numel_32bit_index = 0;
  return d;
}

std::string ParityCase::name() const {
  std::ostringstream os;
  os << c10::toString(dtype);
  if (param_dtype != dtype) os << "_params" << c10::toString(param_dtype);
  os << "_" << shape_name(shape) << (channels_last ? "_channels_last" : "")
     << (training ? "_train" : "_eval") << (affine ? "" : "_noaffine")
     << (running_stats ? "" : "_norunning") << (strided_channel_tensors ? "_strided" : "");
  return os.str();
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

OptTensor to_double(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->to(at::kDouble)) : OptTensor();
}

OptTensor clone_like(const OptTensor& t) {
  if (!t.has_value()) return t;
  // Keep the stride of a strided view: the kernels must honour it.
  at::Tensor storage = at::empty({t->size(0), t->stride(0)}, t->options());
  at::Tensor view = storage.select(1, 0);
  view.copy_(*t);
  return view;
}

// Per-channel values of a given dtype; stride 2 when asked.
at::Tensor channel_tensor(const at::Tensor& values, at::ScalarType dtype, bool strided) {
  if (!strided) return values.to(dtype);
  at::Tensor storage = at::empty({values.size(0), 2}, values.options().dtype(dtype));
  storage.select(1, 1).fill_(123.0);  // neighbours a wrong stride would read or clobber
  at::Tensor view = storage.select(1, 0);
  view.copy_(values);
  return view;
}

class Checker {
 public:
  void expect(::testing::AssertionResult r) {
    if (!r) failures_ << "\n  " << r.message();
  }
  void expect_true(bool ok, const std::string& what) {
    if (!ok) failures_ << "\n  " << what;
  }
  ::testing::AssertionResult result() const {
    const std::string f = failures_.str();
    if (f.empty()) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << f;
  }

 private:
  std::ostringstream failures_;
};

// The emulated result agrees with the CPU kernel's and with ATen's float64 one within the
// dtype's tolerance. Below float64 an ill-conditioned value (a channel of three values whose
// mean is large against their spread: the folded forward y = x*alpha + beta then cancels
// digits) may miss that, and passes if it is at most four times as far from float64 as
// the CPU kernel's, which runs the same algorithm. (The Python suite allows twice; across the
// hundreds of random cases here the error ratio of two float implementations scatters more,
// while an indexing or synchronization bug is off by orders of magnitude or leaves NaN.)
::testing::AssertionResult agree(const std::string& what, const at::Tensor& actual,
                                 const at::Tensor& cpu, const at::Tensor& ref, Tolerance tol,
                                 bool no_worse_than_cpu) {
  const auto vs_cpu = close(what + " vs CPU kernel", actual, cpu, tol);
  const auto vs_ref = close(what + " vs ATen float64", actual, ref, tol);
  if (vs_cpu && vs_ref) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << (vs_cpu ? "" : vs_cpu.message()) << (vs_cpu || vs_ref ? "" : "\n  ")
     << (vs_ref ? "" : vs_ref.message());
  if (no_worse_than_cpu && actual.sizes() == ref.sizes() && actual.numel() > 0 &&
      !actual.isnan().any().item<bool>()) {
    const at::Tensor r = ref.to(at::kDouble);
    const double ours = (actual.to(at::kDouble) - r).abs().max().item<double>();
    const double theirs = (cpu.to(at::kDouble) - r).abs().max().item<double>();
    const double scale = std::max(1.0, r.abs().max().item<double>());
    if (ours <= 4 * theirs + tol.atol * 1e-2 * scale) return ::testing::AssertionSuccess();
    os << "\n  " << what << ": max error vs float64 " << ours
       << " exceeds four times the CPU kernel's " << theirs;
  }
  return ::testing::AssertionFailure() << os.str();
}

}  // namespace

::testing::AssertionResult check_parity(const ParityCase& c) {
  at::manual_seed(c.seed);
  const int64_t C = c.shape[1];
  const auto fmt = c.channels_last ? channels_last_format(static_cast<int64_t>(c.shape.size()))
                                   : at::MemoryFormat::Contiguous;
  const at::Tensor x = channel_varied_input(c.shape, c.dtype).contiguous(fmt);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  OptTensor weight, bias, running_mean, running_var;
  if (c.affine) {
    weight = channel_tensor(at::randn({C}, f64) * 0.5 + 1.0, c.param_dtype,
                            c.strided_channel_tensors);
    bias = channel_tensor(at::randn({C}, f64), c.param_dtype, c.strided_channel_tensors);
  }
  if (c.running_stats) {
    running_mean = channel_tensor(at::randn({C}, f64), c.param_dtype, c.strided_channel_tensors);
    running_var = channel_tensor(at::rand({C}, f64) + 0.5, c.param_dtype, c.strided_channel_tensors);
  }
  const at::Tensor dy = at::randn(c.shape, f64).to(c.dtype).contiguous(fmt);

  const Tolerance tol = tolerance_for(c.dtype);
  const Tolerance acc_tol = tolerance_for(c.dtype == at::kDouble ? at::kDouble : at::kFloat);
  const Tolerance param_tol = tolerance_for(c.param_dtype);
  Checker check;
  try {
    dev::emu::ScopedSchedule schedule(c.schedule);

    // Forward: emulated CUDA, CPU kernel, ATen float64; each with its own running stats.
    OptTensor rm_emu = clone_like(running_mean), rv_emu = clone_like(running_var);
    OptTensor rm_cpu = clone_like(running_mean), rv_cpu = clone_like(running_var);
    OptTensor rm_ref = to_double(running_mean), rv_ref = to_double(running_var);
    const auto [y, mean, invstd] = batch_norm_forward(c.device, x, weight, bias, rm_emu, rv_emu,
                                                      c.training, c.momentum, c.eps);
    const auto [y_cpu, mean_cpu, invstd_cpu] = custom_bn::batch_norm_forward(
        x, weight, bias, rm_cpu, rv_cpu, c.training, c.momentum, c.eps);
    const at::Tensor x64 = x.to(at::kDouble);
    const OptTensor w64 = to_double(weight), b64 = to_double(bias);
    auto [y_ref, mean_ref, invstd_ref] =
        at::native_batch_norm(x64, w64, b64, rm_ref, rv_ref, c.training, c.momentum, c.eps);
    if (!c.training) {
      mean_ref = *rm_ref;
      invstd_ref = (*rv_ref + c.eps).rsqrt();
    }

    const bool lenient = c.dtype != at::kDouble;
    check.expect(agree("output", y, y_cpu, y_ref, tol, lenient));
    check.expect_true(y.strides() == y_cpu.strides(),
                      "output strides differ from the CPU kernel's");
    check.expect(agree("save_mean", mean, mean_cpu, mean_ref, acc_tol, lenient));
    check.expect(agree("save_invstd", invstd, invstd_cpu, invstd_ref, acc_tol, lenient));
    if (c.running_stats) {
      check.expect(agree("running_mean", *rm_emu, *rm_cpu, *rm_ref, param_tol, lenient));
      check.expect(agree("running_var", *rv_emu, *rv_cpu, *rv_ref, param_tol, lenient));
    }

    // Backward, from each path's own saved statistics.
    const at::Tensor dy64 = dy.to(at::kDouble);
    for (const auto& mask : c.masks) {
      std::ostringstream which;
      which << " [mask " << mask[0] << mask[1] << mask[2] << "]";
      const auto [dx, dw, db] =
          batch_norm_backward(c.device, dy, x, weight, mean, invstd, c.training, mask);
      const auto [dx_cpu, dw_cpu, db_cpu] = custom_bn::batch_norm_backward(
          dy, x, weight, mean_cpu, invstd_cpu, c.training, c.eps, mask);
      const auto [dx_ref, dw_ref, db_ref] = at::native_batch_norm_backward(
          dy64, x64, w64, rm_ref, rv_ref, c.training ? OptTensor(mean_ref) : OptTensor(),
          c.training ? OptTensor(invstd_ref) : OptTensor(), c.training, c.eps, mask);
      if (mask[0]) {
        check.expect(agree("grad_input" + which.str(), dx, dx_cpu, dx_ref, tol, lenient));
        check.expect_true(dx.strides() == x.strides(),
                          "grad_input strides differ from the input's" + which.str());
      }
      if (mask[1]) {
        check.expect(agree("grad_weight" + which.str(), dw, dw_cpu, dw_ref, param_tol, lenient));
      }
      if (mask[2]) {
        check.expect(agree("grad_bias" + which.str(), db, db_cpu, db_ref, param_tol, lenient));
      }
    }
  } catch (const dev::emu::EmulatorError& e) {
    return ::testing::AssertionFailure() << "emulator: " << e.what();
  }
  return check.result();
}

}  // namespace emulator
}  // namespace custom_bn
