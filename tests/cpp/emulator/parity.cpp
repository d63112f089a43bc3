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

// Tolerance of a result of the given dtype against ATen's float64 one, elementwise:
//   |actual - ref| <= atol + rtol * scale,
// where scale is the magnitude of the terms whose rounding makes up the error (ErrorScales),
// not |ref|: an ill-conditioned element (a channel whose mean is large against its spread, so
// that y = x*alpha + beta cancels digits) may legitimately lose more than |ref| allows. rtol is
// a multiple of the dtype's unit roundoff u, atol the dtype's smallest subnormal (the rounding
// error of a result that underflows). There is no fallback: the CPU kernel's results must meet
// the same bound as the emulated ones.
//
//   dtype     u       rtol             what the multiple covers: the worst seen over these cases
//                                      and 600 more random ones (float32 sums of 12800 terms)
//   float64   2^-53   256 u ~ 2.8e-14  the reference itself: ATen's float64 mean of a channel
//                                      of 12800 values is off by up to ~94 u of mean|x|
//   float32   2^-24   128 u ~ 7.6e-6   the CPU kernel's channels-last statistics, up to ~62 u
//                                      (running_var); the emulated CUDA kernels stay under ~6 u
//   float16   2^-11     2 u ~ 9.8e-4   one rounding to the dtype (<= 1 u of scale >= |ref|);
//   bfloat16  2^-8      2 u ~ 7.8e-3   the float arithmetic before it adds < 0.02 u
struct BoundTolerance {
  double rtol;
  double atol;
};

BoundTolerance bound_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {256 * std::ldexp(1.0, -53), std::ldexp(1.0, -1074)};
    case at::kFloat: return {128 * std::ldexp(1.0, -24), std::ldexp(1.0, -149)};
    case at::kHalf: return {2 * std::ldexp(1.0, -11), std::ldexp(1.0, -24)};
    case at::kBFloat16: return {2 * std::ldexp(1.0, -8), std::ldexp(1.0, -133)};
    default: TORCH_CHECK(false, "check_parity: no tolerance for ", dtype);
  }
}

// Per-element error scales of every result, in float64 from the float64 reference values.
// A sum's scale is the sum of its terms' magnitudes (not |sum|), a mean's the mean of them; a
// difference x - mean carries the mean's error, so its scale is |x| + mean|x|; a coefficient
// computed from the statistics (invstd, alpha) carries their relative error r_inv. In
// evaluation the statistics are given, not computed, and only rounded.
struct ErrorScales {
  at::Tensor mean, invstd, running_mean, running_var;  // [C]
  at::Tensor output;                                   // like the input
  at::Tensor grad_input;                               // like the input
  at::Tensor grad_weight, grad_bias;                   // [C]
};

ErrorScales error_scales(const at::Tensor& x64, const at::Tensor& dy64, const OptTensor& w64,
                         const OptTensor& b64, const OptTensor& rm64, const OptTensor& rv64,
                         const ParityCase& c) {
  std::vector<int64_t> reduce_dims = {0};
  for (int64_t d = 2; d < x64.dim(); ++d) reduce_dims.push_back(d);
  std::vector<int64_t> channel_shape(x64.dim(), 1);
  channel_shape[1] = x64.size(1);
  const auto per_channel = [&](const at::Tensor& t) { return t.reshape(channel_shape); };
  const auto mean_of = [&](const at::Tensor& t) { return t.mean(reduce_dims, true); };
  const double n = static_cast<double>(x64.numel() / std::max<int64_t>(1, x64.size(1)));

  at::Tensor mean, var, mean_abs, var_scale;
  if (c.training) {
    mean = mean_of(x64);
    var = mean_of((x64 - mean).square());
    mean_abs = mean_of(x64.abs());
    // The terms (x - mean)^2, each difference off by the mean's error (~ u mean|x|).
    var_scale = var + mean_of((x64 - mean).abs()) * mean_abs;
  } else {
    mean = per_channel(*rm64);
    var = per_channel(*rv64);
    mean_abs = mean.abs();
    var_scale = var;
  }
  const at::Tensor invstd = (var + c.eps).rsqrt();
  const at::Tensor r_inv = 1 + var_scale / (var + c.eps);  // relative error scale of invstd
  const at::Tensor w = w64.has_value() ? per_channel(w64->abs()) : at::ones_like(invstd);
  const at::Tensor b = b64.has_value() ? per_channel(b64->abs()) : at::zeros_like(invstd);
  const at::Tensor centred = x64 - mean;
  const at::Tensor xhat = centred * invstd;
  const at::Tensor xhat_scale = invstd * (x64.abs() + mean_abs + centred.abs() * r_inv);
  const at::Tensor alpha = invstd * w;

  ErrorScales s;
  s.mean = mean_abs.flatten();
  s.invstd = (invstd * r_inv).flatten();
  if (c.running_stats) {
    const double m = c.momentum;
    s.running_mean = (1 - m) * rm64->abs() + (c.training ? m * s.mean : at::zeros_like(s.mean));
    s.running_var = (1 - m) * rv64->abs() +
                    (c.training ? m * n / std::max(1.0, n - 1) * var_scale.flatten()
                                : at::zeros_like(s.mean));
  }
  s.output = w * xhat_scale + b;
  if (c.training) {
    const at::Tensor mean_dy = mean_of(dy64), mean_dy_xhat = mean_of(dy64 * xhat);
    s.grad_input =
        alpha * ((dy64.abs() + mean_dy.abs() + xhat.abs() * mean_dy_xhat.abs()) * r_inv +
                 mean_of(dy64.abs()) + xhat_scale * mean_dy_xhat.abs() +
                 xhat.abs() * mean_of(dy64.abs() * xhat_scale));
  } else {
    s.grad_input = alpha * dy64.abs() * r_inv;
  }
  s.grad_weight = (dy64.abs() * xhat_scale).sum(reduce_dims);
  s.grad_bias = dy64.abs().sum(reduce_dims);
  return s;
}

// actual has the expected dtype and shape and is within that dtype's bound_tolerance of the
// float64 reference, elementwise; on failure the message names the worst element and by how
// many times it exceeds its bound.
::testing::AssertionResult within_bound(const std::string& what, const at::Tensor& actual,
                                        at::ScalarType dtype, const at::Tensor& ref,
                                        const at::Tensor& scale) {
  if (!actual.defined()) return ::testing::AssertionFailure() << what << ": undefined";
  if (actual.scalar_type() != dtype) {
    return ::testing::AssertionFailure()
           << what << ": dtype " << actual.scalar_type() << " != expected " << dtype;
  }
  if (actual.sizes() != ref.sizes()) {
    return ::testing::AssertionFailure()
           << what << ": shape " << actual.sizes() << " != expected " << ref.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const BoundTolerance tol = bound_tolerance(dtype);
  const at::Tensor a = actual.to(at::kDouble).contiguous().flatten();
  const at::Tensor r = ref.to(at::kDouble).contiguous().flatten();
  const at::Tensor bound = tol.atol + tol.rtol * scale.contiguous().flatten();
  // In units of the bound, so that the worst element is the one furthest beyond its own.
  const at::Tensor excess = ((a - r).abs() / bound).nan_to_num(1e300, 1e300);
  const at::Tensor bad = excess.gt(1).logical_or(a.isnan()).logical_or(r.isnan());
  if (!bad.any().item<bool>()) return ::testing::AssertionSuccess();
  const int64_t worst = excess.argmax().item<int64_t>();
  const double error = (a[worst] - r[worst]).abs().item<double>();
  std::ostringstream os;
  os << what << ": " << bad.sum().item<int64_t>() << " of " << a.numel()
     << " values beyond atol + rtol * scale (rtol " << tol.rtol << ", atol " << tol.atol
     << "); worst at flat index " << worst << ": " << a[worst].item<double>() << " vs float64 "
     << r[worst].item<double>();
  if (!std::isnan(error)) {
    os << ", error " << error << " = " << error / bound[worst].item<double>()
       << " x its bound " << bound[worst].item<double>();
  }
  return ::testing::AssertionFailure() << os.str();
}

// The emulated result and the CPU kernel's, each against ATen's float64 one.
::testing::AssertionResult agree(const std::string& what, const at::Tensor& emulated,
                                 const at::Tensor& cpu, at::ScalarType dtype,
                                 const at::Tensor& ref, const at::Tensor& scale) {
  const auto emu_ok = within_bound(what + " (emulated CUDA)", emulated, dtype, ref, scale);
  const auto cpu_ok = within_bound(what + " (CPU kernel)", cpu, dtype, ref, scale);
  if (emu_ok && cpu_ok) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << (emu_ok ? "" : emu_ok.message()) << (emu_ok || cpu_ok ? "" : "\n  ")
     << (cpu_ok ? "" : cpu_ok.message());
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

  const at::ScalarType acc_dtype = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Without weight the parameter gradients take the accumulation dtype (csrc/checks.h).
  const at::ScalarType grad_param_dtype = c.affine ? c.param_dtype : acc_dtype;
  Checker check;
  try {
    dev::emu::ScopedSchedule schedule(c.schedule);
    const at::Tensor x64 = x.to(at::kDouble), dy64 = dy.to(at::kDouble);
    const OptTensor w64 = to_double(weight), b64 = to_double(bias);
    // Before the forward: ATen's updates the float64 running stats in place.
    const ErrorScales scale = error_scales(x64, dy64, w64, b64, to_double(running_mean),
                                           to_double(running_var), c);

    // Forward: emulated CUDA, CPU kernel, ATen float64; each with its own running stats.
    OptTensor rm_emu = clone_like(running_mean), rv_emu = clone_like(running_var);
    OptTensor rm_cpu = clone_like(running_mean), rv_cpu = clone_like(running_var);
    OptTensor rm_ref = to_double(running_mean), rv_ref = to_double(running_var);
    const auto [y, mean, invstd] = batch_norm_forward(c.device, x, weight, bias, rm_emu, rv_emu,
                                                      c.training, c.momentum, c.eps);
    const auto [y_cpu, mean_cpu, invstd_cpu] = custom_bn::batch_norm_forward(
        x, weight, bias, rm_cpu, rv_cpu, c.training, c.momentum, c.eps);
    auto [y_ref, mean_ref, invstd_ref] =
        at::native_batch_norm(x64, w64, b64, rm_ref, rv_ref, c.training, c.momentum, c.eps);
    if (!c.training) {
      mean_ref = *rm_ref;
      invstd_ref = (*rv_ref + c.eps).rsqrt();
    }

    check.expect(agree("output", y, y_cpu, c.dtype, y_ref, scale.output));
    check.expect_true(y.strides() == y_cpu.strides(),
                      "output strides differ from the CPU kernel's");
    check.expect(agree("save_mean", mean, mean_cpu, acc_dtype, mean_ref, scale.mean));
    check.expect(agree("save_invstd", invstd, invstd_cpu, acc_dtype, invstd_ref, scale.invstd));
    if (c.running_stats) {
      check.expect(agree("running_mean", *rm_emu, *rm_cpu, c.param_dtype, *rm_ref,
                         scale.running_mean));
      check.expect(agree("running_var", *rv_emu, *rv_cpu, c.param_dtype, *rv_ref,
                         scale.running_var));
    }

    // Backward, from each path's own saved statistics.
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
        check.expect(agree("grad_input" + which.str(), dx, dx_cpu, c.dtype, dx_ref,
                           scale.grad_input));
        check.expect_true(dx.strides() == x.strides(),
                          "grad_input strides differ from the input's" + which.str());
      }
      if (mask[1]) {
        check.expect(agree("grad_weight" + which.str(), dw, dw_cpu, grad_param_dtype, dw_ref,
                           scale.grad_weight));
      }
      if (mask[2]) {
        check.expect(agree("grad_bias" + which.str(), db, db_cpu, grad_param_dtype, db_ref,
                           scale.grad_bias));
      }
    }
  } catch (const dev::emu::EmulatorError& e) {
    return ::testing::AssertionFailure() << "emulator: " << e.what();
  }
  return check.result();
}

}  // namespace emulator
}  // namespace custom_bn
