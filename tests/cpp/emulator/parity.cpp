#include "parity.h"

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/csrc/autograd/autograd.h>

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

dev::emu::Schedule schedule_for(size_t i) {
  dev::emu::Schedule s;
  s.order = static_cast<dev::emu::ThreadOrder>(i % 3);
  s.resident_blocks = 1 + static_cast<int>(i % 4);
  s.shuffle_blocks = i % 2 == 0;
  if (i % 5 == 0) {
    s.stall_probability = 0.05;
    s.stall_rounds = 8;
  }
  s.laggers = i % 7 == 0 ? 1 : 0;
  s.seed = 1000 + i;
  return s;
}

at::Tensor aten_activation(Activation a, double param, const at::Tensor& z) {
  switch (a) {
    case Activation::kIdentity: return z;
    case Activation::kRelu: return at::relu(z);
    case Activation::kLeakyRelu: return at::leaky_relu(z, param);
    case Activation::kElu: return at::elu(z, param);
    case Activation::kSilu: return at::silu(z);
  }
  TORCH_CHECK(false, "aten_activation: ", activation_name(a));
}

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::kIdentity: return "identity";
    case Activation::kRelu: return "relu";
    case Activation::kLeakyRelu: return "leaky_relu";
    case Activation::kElu: return "elu";
    case Activation::kSilu: return "silu";
  }
  return "unknown";
}

std::string ParityCase::name() const {
  std::ostringstream os;
  if (fused) os << "fused_" << activation_name(activation) << (residual ? "_residual_" : "_");
  if (inplace) {
    os << "inplace_" << activation_name(activation);
    if (activation != Activation::kIdentity) {
      std::ostringstream param;
      param << activation_param;
      std::string p = param.str();
      std::replace(p.begin(), p.end(), '.', 'p');  // test names take no dots
      os << p;
    }
    os << "_";
  }
  os << c10::toString(dtype);
  if (param_dtype != dtype) os << "_params" << c10::toString(param_dtype);
  os << "_" << shape_name(shape) << (channels_last ? "_channels_last" : "")
     << (training ? "_train" : "_eval") << (affine ? "" : "_noaffine")
     << (running_stats ? "" : "_norunning") << (strided_channel_tensors ? "_strided" : "")
     << (mixed_sign_weight ? "_mixed_sign" : "") << (strided_input ? "_strided_input" : "");
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
//
// The fused epilogue y = act(z), z = BN(x) + residual: z's scale is BN's output scale plus
// |residual|; y's is L times that (L: the activation's largest slope; |act(z)| <= L |z| for all
// five). Its backward's dz = dy * act'(z) takes dy's place in the batch-norm backward, with the
// magnitude |dy| (L + C2 * scale(z)) (C2: the largest |act''|, through which z's error reaches dz)
// in place of |dy|; grad_residual is dz.
struct ErrorScales {
  at::Tensor mean, invstd, running_mean, running_var;  // [C]
  at::Tensor pre_activation;                           // z, like the input
  at::Tensor output;                                   // like the input
  at::Tensor grad_input, grad_residual;                // like the input
  at::Tensor grad_weight, grad_bias;                   // [C]
};

// The statistics of the reference in float64 and the scales of the forward's values.
struct ForwardTerms {
  std::vector<int64_t> reduce_dims;
  at::Tensor mean, mean_abs, var_scale, invstd, r_inv;  // broadcastable per channel
  at::Tensor xhat, xhat_scale, alpha, w, b;
};

ForwardTerms forward_terms(const at::Tensor& x64, const OptTensor& w64, const OptTensor& b64,
                           const OptTensor& rm64, const OptTensor& rv64, const ParityCase& c) {
  ForwardTerms t;
  t.reduce_dims = {0};
  for (int64_t d = 2; d < x64.dim(); ++d) t.reduce_dims.push_back(d);
  std::vector<int64_t> channel_shape(x64.dim(), 1);
  channel_shape[1] = x64.size(1);
  const auto per_channel = [&](const at::Tensor& v) { return v.reshape(channel_shape); };
  const auto mean_of = [&](const at::Tensor& v) { return v.mean(t.reduce_dims, true); };

  at::Tensor var;
  if (c.training) {
    t.mean = mean_of(x64);
    var = mean_of((x64 - t.mean).square());
    t.mean_abs = mean_of(x64.abs());
    // The terms (x - mean)^2, each difference off by the mean's error (~ u mean|x|).
    t.var_scale = var + mean_of((x64 - t.mean).abs()) * t.mean_abs;
  } else {
    t.mean = per_channel(*rm64);
    var = per_channel(*rv64);
    t.mean_abs = t.mean.abs();
    t.var_scale = var;
  }
  t.invstd = (var + c.eps).rsqrt();
  t.r_inv = 1 + t.var_scale / (var + c.eps);  // relative error scale of invstd
  t.w = w64.has_value() ? per_channel(w64->abs()) : at::ones_like(t.invstd);
  t.b = b64.has_value() ? per_channel(b64->abs()) : at::zeros_like(t.invstd);
  const at::Tensor centred = x64 - t.mean;
  t.xhat = centred * t.invstd;
  t.xhat_scale = t.invstd * (x64.abs() + t.mean_abs + centred.abs() * t.r_inv);
  t.alpha = t.invstd * t.w;
  return t;
}

// The largest slope and the largest curvature of the activation (see ErrorScales).
struct ActivationBounds {
  double slope;
  double curvature;
};

ActivationBounds activation_bounds(const ParityCase& c) {
  const double p = std::abs(c.activation_param);
  switch (c.activation) {
    case Activation::kLeakyRelu: return {std::max(1.0, p), 0.0};
    case Activation::kElu: return {std::max(1.0, p), p};
    case Activation::kSilu: return {1.1, 0.5};
    default: return {1.0, 0.0};
  }
}

// dz: the gradient at z (dy for the plain operators); r_abs: |residual|, or undefined.
ErrorScales error_scales(const ForwardTerms& t, const at::Tensor& dy64, const at::Tensor& dz64,
                         const at::Tensor& r_abs, const OptTensor& rm64, const OptTensor& rv64,
                         const ParityCase& c) {
  const auto mean_of = [&](const at::Tensor& v) { return v.mean(t.reduce_dims, true); };
  const double n = static_cast<double>(dy64.numel() / std::max<int64_t>(1, dy64.size(1)));
  const ActivationBounds act = activation_bounds(c);

  ErrorScales s;
  s.mean = t.mean_abs.flatten();
  s.invstd = (t.invstd * t.r_inv).flatten();
  if (c.running_stats) {
    const double m = c.momentum;
    s.running_mean = (1 - m) * rm64->abs() + (c.training ? m * s.mean : at::zeros_like(s.mean));
    s.running_var = (1 - m) * rv64->abs() +
                    (c.training ? m * n / std::max(1.0, n - 1) * t.var_scale.flatten()
                                : at::zeros_like(s.mean));
  }
  s.pre_activation = t.w * t.xhat_scale + t.b;
  if (r_abs.defined()) s.pre_activation = s.pre_activation + r_abs;
  s.output = act.slope * s.pre_activation;
  // |dz| and the scale of its error.
  const at::Tensor dz_abs = c.fused || c.inplace
                               ? dy64.abs() * (act.slope + act.curvature * s.pre_activation)
                               : dy64.abs();
  s.grad_residual = dz_abs;
  if (c.training) {
    const at::Tensor mean_dz = mean_of(dz64), mean_dz_xhat = mean_of(dz64 * t.xhat);
    s.grad_input =
        t.alpha * ((dz_abs + mean_dz.abs() + t.xhat.abs() * mean_dz_xhat.abs()) * t.r_inv +
                   mean_of(dz_abs) + t.xhat_scale * mean_dz_xhat.abs() +
                   t.xhat.abs() * mean_of(dz_abs * t.xhat_scale));
  } else {
    s.grad_input = t.alpha * dz_abs * t.r_inv;
  }
  s.grad_weight = (dz_abs * t.xhat_scale).sum(t.reduce_dims);
  s.grad_bias = dz_abs.sum(t.reduce_dims);
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

// The float64 reference of the fused epilogue at z: act(z) with ATen's own activation and its
// derivative dy * act'(z) by autograd.
std::pair<at::Tensor, at::Tensor> activation_reference(const ParityCase& c, const at::Tensor& z64,
                                                       const at::Tensor& dy64) {
  if (c.activation == Activation::kIdentity) return {z64, dy64};
  const at::Tensor z = z64.detach().requires_grad_(true);
  const at::Tensor y = aten_activation(c.activation, c.activation_param, z);
  const auto grads = torch::autograd::grad({y}, {z}, {dy64});
  return {y.detach(), grads[0]};
}

// relu, leaky_relu and elu change slope at z = 0: where the float64 z and the kernels' z (off by
// their rounding) lie on opposite sides of it, their derivatives differ outright, and neither is
// wrong. Such inputs are moved out of the way: every x whose z is within the acc dtype's bound of
// 0 steps away from 0 (by at least one ulp of its dtype) until none is left; moving x shifts the
// channel's statistics and with them every z a little, hence the rounds.
bool has_kink(const ParityCase& c) {
  return (c.fused || c.inplace) &&
         (c.activation == Activation::kRelu || c.activation == Activation::kLeakyRelu ||
          c.activation == Activation::kElu);
}

struct Inputs {
  at::Tensor x, dy;
  OptTensor weight, bias, running_mean, running_var, residual;
};

// x away from the kink (see has_kink); false if rounds do not suffice.
double unit_roundoff(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return std::ldexp(1.0, -53);
    case at::kFloat: return std::ldexp(1.0, -24);
    case at::kHalf: return std::ldexp(1.0, -11);
    default: return std::ldexp(1.0, -8);
  }
}

// x away from the kink (see has_kink); false if the rounds do not suffice.
bool move_off_kink(Inputs& in, const ParityCase& c, at::MemoryFormat fmt) {
  const at::ScalarType acc_dtype = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const OptTensor w64 = to_double(in.weight), b64 = to_double(in.bias);
  const OptTensor rm64 = to_double(in.running_mean), rv64 = to_double(in.running_var);
  std::vector<int64_t> channel_shape(c.shape.size(), 1);
  channel_shape[1] = c.shape[1];
  for (int round = 0; round < 8; ++round) {
    const at::Tensor x64 = in.x.to(at::kDouble);
    const ForwardTerms t = forward_terms(x64, w64, b64, rm64, rv64, c);
    const at::Tensor w = w64.has_value() ? w64->reshape(channel_shape) : at::ones_like(t.invstd);
    const at::Tensor alpha = t.invstd * w;  // dz/dx
    at::Tensor z = t.xhat * w;
    at::Tensor z_scale = t.w * t.xhat_scale + t.b;
    if (b64.has_value()) z = z + b64->reshape(channel_shape);
    if (in.residual.has_value()) {
      const at::Tensor r64 = in.residual->to(at::kDouble);
      z = z + r64;
      z_scale = z_scale + r64.abs();
    }
    // Well beyond the kernels' rounding of z (a few units of the acc dtype's roundoff).
    const at::Tensor margin = 4 * bound_tolerance(acc_dtype).rtol * z_scale;
    const at::Tensor near = z.abs() <= margin;
    if (!near.any().item<bool>()) return true;
    const at::Tensor direction = at::where(z >= 0, 1.0, -1.0) * at::where(alpha >= 0, 1.0, -1.0);
    const at::Tensor step = at::maximum(2 * margin / alpha.abs().clamp_min(1e-300),
                                        4 * unit_roundoff(c.dtype) * x64.abs() + 1e-30);
    in.x = at::where(near, x64 + direction * step, x64).to(c.dtype).contiguous(fmt);
  }
  return false;
}

Inputs make_inputs(const ParityCase& c, at::MemoryFormat fmt) {
  at::manual_seed(c.seed);
  const int64_t C = c.shape[1];
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.x = channel_varied_input(c.shape, c.dtype).contiguous(fmt);
  if (c.affine) {
    at::Tensor w = at::randn({C}, f64) * 0.5 + 1.0;
    if (c.mixed_sign_weight) w.slice(0, 1, C, 2).neg_();
    in.weight = channel_tensor(w, c.param_dtype, c.strided_channel_tensors);
    in.bias = channel_tensor(at::randn({C}, f64), c.param_dtype, c.strided_channel_tensors);
  }
  if (c.running_stats) {
    in.running_mean =
        channel_tensor(at::randn({C}, f64), c.param_dtype, c.strided_channel_tensors);
    in.running_var =
        channel_tensor(at::rand({C}, f64) + 0.5, c.param_dtype, c.strided_channel_tensors);
  }
  in.dy = at::randn(c.shape, f64).to(c.dtype).contiguous(fmt);
  // Of the order of BN's output. Contiguous whatever the input's layout: the operators must
  // read it in the input's.
  if (c.residual) in.residual = at::randn(c.shape, f64).to(c.dtype);
  return in;
}

// An output whose mask entry is false: an empty [0] tensor, as csrc/checks.h
// unrequested_gradient makes it.
::testing::AssertionResult unrequested(const std::string& what, const at::Tensor& t) {
  if (t.defined() && t.dim() == 1 && t.numel() == 0) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure();
  failure << what << ": not requested, expected an empty [0] tensor, got ";
  if (t.defined()) return failure << "shape " << t.sizes();
  return failure << "an undefined tensor";
}

// The input of an in-place case as the operator gets it: a dense copy of x, or with
// strided_input a view of every other element along the last dimension of a larger tensor in
// the same memory format, whose other elements hold kSentinel.
constexpr double kSentinel = 123.0;

struct InPlaceInput {
  at::Tensor input;       // overwritten by the forward
  at::Tensor neighbours;  // strided_input: the elements between input's, which must stay put
};

InPlaceInput inplace_input(const ParityCase& c, const at::Tensor& x, at::MemoryFormat fmt) {
  if (!c.strided_input) return {x.clone(fmt), at::Tensor()};
  std::vector<int64_t> shape = c.shape;
  const int64_t last = static_cast<int64_t>(shape.size()) - 1;
  shape[last] *= 2;
  const at::Tensor storage = at::full(shape, kSentinel, x.options()).contiguous(fmt);
  InPlaceInput in{storage.slice(last, 0, shape[last], 2), storage.slice(last, 1, shape[last], 2)};
  in.input.copy_(x);
  return in;
}

// The in-place operators, emulated and on the CPU kernels, each against float64 autograd of
// act(at::batch_norm(x)): the input overwritten with the output, the saved and running
// statistics, and each mask's gradients computed from that output alone. Their error scales are
// the fused operators', except that the backward's x - mean comes from y: its error is y's
// (within y's bound) divided by the activation's slope at z and by |w| (z = w * xhat + b
// inverted).
::testing::AssertionResult check_inplace_parity(const ParityCase& c) {
  const auto fmt = c.channels_last ? channels_last_format(static_cast<int64_t>(c.shape.size()))
                                   : at::MemoryFormat::Contiguous;
  Inputs in = make_inputs(c, fmt);
  if (has_kink(c) && !move_off_kink(in, c, fmt)) {
    return ::testing::AssertionFailure() << "inputs: some z stayed at the activation's kink";
  }
  const at::ScalarType acc_dtype = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType grad_param_dtype = c.affine ? c.param_dtype : acc_dtype;
  const std::string act = activation_name(c.activation);
  Checker check;
  try {
    dev::emu::ScopedSchedule schedule(c.schedule);
    const at::Tensor x64 = in.x.to(at::kDouble), dy64 = in.dy.to(at::kDouble);
    const OptTensor w64 = to_double(in.weight), b64 = to_double(in.bias);
    const OptTensor rm_before = to_double(in.running_mean), rv_before = to_double(in.running_var);
    const ForwardTerms terms = forward_terms(x64, w64, b64, rm_before, rv_before, c);

    // Reference: autograd through ATen's batch_norm (which updates its own copy of the running
    // stats: to_double of float64 ones is no copy) and activation. Without affine parameters,
    // weight 1 and bias 0 stand in for them: the operator's grad_weight and grad_bias are then
    // the gradients at those.
    OptTensor rm_ref = clone_like(rm_before), rv_ref = clone_like(rv_before);
    const int64_t C = c.shape[1];
    const std::vector<at::Tensor> leaves = {
        x64.clone().requires_grad_(true),
        (c.affine ? w64->clone() : at::ones({C}, x64.options())).requires_grad_(true),
        (c.affine ? b64->clone() : at::zeros({C}, x64.options())).requires_grad_(true)};
    const at::Tensor bn = at::batch_norm(leaves[0], leaves[1], leaves[2], rm_ref, rv_ref,
                                         c.training, c.momentum, c.eps, /*cudnn_enabled=*/false);
    const at::Tensor y_graph = aten_activation(c.activation, c.activation_param, bn);
    const auto grads_ref = torch::autograd::grad({y_graph}, leaves, {dy64});
    const at::Tensor y_ref = y_graph.detach();
    const at::Tensor z_ref = bn.detach();
    const at::Tensor dz_ref = activation_reference(c, z_ref, dy64).second;
    const at::Tensor slope = activation_reference(c, z_ref, at::ones_like(z_ref)).second.abs();

    const ErrorScales forward_scale =
        error_scales(terms, dy64, dz_ref, at::Tensor(), rm_before, rv_before, c);
    // y's error is within y's bound, in units of its dtype's rtol; a gradient of another dtype
    // (the float parameter gradients of float16 input) states it in units of its own.
    const auto backward_scales = [&](at::ScalarType result_dtype) {
      ForwardTerms recovered = terms;
      recovered.xhat_scale = forward_scale.output / (slope * terms.w) *
                             (bound_tolerance(c.dtype).rtol / bound_tolerance(result_dtype).rtol);
      return error_scales(recovered, dy64, dz_ref, at::Tensor(), rm_before, rv_before, c);
    };
    const ErrorScales input_scale = backward_scales(c.dtype);
    const ErrorScales param_scale = backward_scales(grad_param_dtype);

    // Forward: emulated CUDA and CPU kernel, each overwriting its own copy of the input.
    InPlaceInput x = inplace_input(c, in.x, fmt), x_cpu = inplace_input(c, in.x, fmt);
    OptTensor rm = clone_like(in.running_mean), rv = clone_like(in.running_var);
    OptTensor rm_cpu = clone_like(in.running_mean), rv_cpu = clone_like(in.running_var);
    const auto [mean, invstd] = batch_norm_act_inplace_forward(
        c.device, x.input, in.weight, in.bias, rm, rv, c.training, c.momentum, c.eps, act,
        c.activation_param);
    const auto [mean_cpu, invstd_cpu] = custom_bn::batch_norm_act_inplace_forward(
        x_cpu.input, in.weight, in.bias, rm_cpu, rv_cpu, c.training, c.momentum, c.eps, act,
        c.activation_param);
    check.expect(agree("output (the overwritten input)", x.input, x_cpu.input, c.dtype, y_ref,
                       forward_scale.output));
    for (const at::Tensor& neighbours : {x.neighbours, x_cpu.neighbours}) {
      check.expect_true(!neighbours.defined() || neighbours.eq(kSentinel).all().item<bool>(),
                        "a forward wrote between the elements of its strided input");
    }
    check.expect(agree("save_mean", mean, mean_cpu, acc_dtype, terms.mean.flatten(),
                       forward_scale.mean));
    check.expect(agree("save_invstd", invstd, invstd_cpu, acc_dtype, terms.invstd.flatten(),
                       forward_scale.invstd));
    if (c.running_stats) {
      check.expect(agree("running_mean", *rm, *rm_cpu, c.param_dtype, *rm_ref,
                         forward_scale.running_mean));
      check.expect(agree("running_var", *rv, *rv_cpu, c.param_dtype, *rv_ref,
                         forward_scale.running_var));
    }

    // Backward, each path from its own output and saved statistics.
    const BackwardFault& f = c.fault;
    const std::string backward_act = activation_name(f.activation.value_or(c.activation));
    for (const auto& m : c.masks) {
      const std::array<bool, 3> mask = {m[0], m[1], m[2]};
      std::ostringstream which;
      which << " [mask " << mask[0] << mask[1] << mask[2] << "]";
      const auto [dx, dw, db] = batch_norm_act_inplace_backward(
          c.device, in.dy, x.input, in.weight, f.drop_bias ? OptTensor() : in.bias, mean, invstd,
          c.training, backward_act, f.activation_param.value_or(c.activation_param), mask);
      const auto [dx_cpu, dw_cpu, db_cpu] = custom_bn::batch_norm_act_inplace_backward(
          in.dy, x_cpu.input, in.weight, in.bias, mean_cpu, invstd_cpu, c.training, c.eps, act,
          c.activation_param, mask);
      if (mask[0]) {
        check.expect(agree("grad_input" + which.str(), dx, dx_cpu, c.dtype, grads_ref[0],
                           input_scale.grad_input));
        check.expect_true(dx.strides() == in.x.strides() && dx_cpu.strides() == in.x.strides(),
                          "grad_input strides differ from the dense input's" + which.str());
      } else {
        check.expect(unrequested("grad_input" + which.str(), dx));
        check.expect(unrequested("grad_input (CPU kernel)" + which.str(), dx_cpu));
      }
      if (mask[1]) {
        check.expect(agree("grad_weight" + which.str(), dw, dw_cpu, grad_param_dtype,
                           grads_ref[1], param_scale.grad_weight));
      } else {
        check.expect(unrequested("grad_weight" + which.str(), dw));
        check.expect(unrequested("grad_weight (CPU kernel)" + which.str(), dw_cpu));
      }
      if (mask[2]) {
        check.expect(agree("grad_bias" + which.str(), db, db_cpu, grad_param_dtype, grads_ref[2],
                           param_scale.grad_bias));
      } else {
        check.expect(unrequested("grad_bias" + which.str(), db));
        check.expect(unrequested("grad_bias (CPU kernel)" + which.str(), db_cpu));
      }
    }
  } catch (const dev::emu::EmulatorError& e) {
    return ::testing::AssertionFailure() << "emulator: " << e.what();
  }
  return check.result();
}

}  // namespace

::testing::AssertionResult check_parity(const ParityCase& c) {
  if (c.inplace) return check_inplace_parity(c);
  const auto fmt = c.channels_last ? channels_last_format(static_cast<int64_t>(c.shape.size()))
                                   : at::MemoryFormat::Contiguous;
  Inputs in = make_inputs(c, fmt);
  if (has_kink(c) && !move_off_kink(in, c, fmt)) {
    return ::testing::AssertionFailure() << "inputs: some z stayed at the activation's kink";
  }
  const at::Tensor& x = in.x;
  const at::Tensor& dy = in.dy;
  const OptTensor& weight = in.weight;
  const OptTensor& bias = in.bias;
  const OptTensor& residual = in.residual;

  const at::ScalarType acc_dtype = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Without weight the parameter gradients take the accumulation dtype (csrc/checks.h).
  const at::ScalarType grad_param_dtype = c.affine ? c.param_dtype : acc_dtype;
  const std::string act = activation_name(c.activation);
  Checker check;
  try {
    dev::emu::ScopedSchedule schedule(c.schedule);
    const at::Tensor x64 = x.to(at::kDouble), dy64 = dy.to(at::kDouble);
    const OptTensor w64 = to_double(weight), b64 = to_double(bias), r64 = to_double(residual);
    // Before the forward: ATen's updates the float64 running stats in place.
    const ForwardTerms terms = forward_terms(x64, w64, b64, to_double(in.running_mean),
                                             to_double(in.running_var), c);

    // Forward: emulated CUDA, CPU kernel, ATen float64; each with its own running stats.
    OptTensor rm_emu = clone_like(in.running_mean), rv_emu = clone_like(in.running_var);
    OptTensor rm_cpu = clone_like(in.running_mean), rv_cpu = clone_like(in.running_var);
    OptTensor rm_ref = to_double(in.running_mean), rv_ref = to_double(in.running_var);
    const OptTensor rm_before = to_double(in.running_mean), rv_before = to_double(in.running_var);
    const auto [y, mean, invstd] =
        c.fused ? batch_norm_act_forward(c.device, x, weight, bias, rm_emu, rv_emu, residual,
                                         c.training, c.momentum, c.eps, c.activation,
                                         c.activation_param)
                : batch_norm_forward(c.device, x, weight, bias, rm_emu, rv_emu, c.training,
                                     c.momentum, c.eps);
    const auto [y_cpu, mean_cpu, invstd_cpu] =
        c.fused ? custom_bn::batch_norm_act_forward(x, weight, bias, rm_cpu, rv_cpu, residual,
                                                    c.training, c.momentum, c.eps, act,
                                                    c.activation_param)
                : custom_bn::batch_norm_forward(x, weight, bias, rm_cpu, rv_cpu, c.training,
                                                c.momentum, c.eps);
    auto [bn_ref, mean_ref, invstd_ref] =
        at::native_batch_norm(x64, w64, b64, rm_ref, rv_ref, c.training, c.momentum, c.eps);
    if (!c.training) {
      mean_ref = *rm_ref;
      invstd_ref = (*rv_ref + c.eps).rsqrt();
    }
    const at::Tensor z_ref = r64.has_value() ? bn_ref + *r64 : bn_ref;
    const auto [y_ref, dz_ref] = activation_reference(c, z_ref, dy64);
    const ErrorScales scale = error_scales(terms, dy64, dz_ref,
                                           r64.has_value() ? r64->abs() : at::Tensor(),
                                           rm_before, rv_before, c);

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

    // Backward, from each path's own saved statistics; the reference is BN's backward of dz.
    const auto [dx_ref, dw_ref, db_ref] = at::native_batch_norm_backward(
        dz_ref, x64, w64, rm_ref, rv_ref, c.training ? OptTensor(mean_ref) : OptTensor(),
        c.training ? OptTensor(invstd_ref) : OptTensor(), c.training, c.eps,
        {true, true, true});
    for (const auto& mask : c.masks) {
      std::ostringstream which;
      which << " [mask " << mask[0] << mask[1] << mask[2] << (c.fused ? "" : "]");
      if (c.fused) which << mask[3] << "]";
      at::Tensor dx, dw, db, dr, dx_cpu, dw_cpu, db_cpu, dr_cpu;
      if (c.fused) {
        const BackwardFault& f = c.fault;
        std::tie(dx, dw, db, dr) = batch_norm_act_backward(
            c.device, dy, x, weight, bias, f.drop_residual ? OptTensor() : residual, mean,
            invstd, c.training, f.activation.value_or(c.activation),
            f.activation_param.value_or(c.activation_param), mask);
        std::tie(dx_cpu, dw_cpu, db_cpu, dr_cpu) = custom_bn::batch_norm_act_backward(
            dy, x, weight, bias, residual, mean_cpu, invstd_cpu, c.training, c.eps, act,
            c.activation_param, mask);
      } else {
        const std::array<bool, 3> mask3 = {mask[0], mask[1], mask[2]};
        std::tie(dx, dw, db) =
            batch_norm_backward(c.device, dy, x, weight, mean, invstd, c.training, mask3);
        std::tie(dx_cpu, dw_cpu, db_cpu) = custom_bn::batch_norm_backward(
            dy, x, weight, mean_cpu, invstd_cpu, c.training, c.eps, mask3);
      }
      if (mask[0]) {
        check.expect(agree("grad_input" + which.str(), dx, dx_cpu, c.dtype, dx_ref,
                           scale.grad_input));
        check.expect_true(dx.strides() == x.strides(),
                          "grad_input strides differ from the input's" + which.str());
      } else {
        check.expect(unrequested("grad_input" + which.str(), dx));
      }
      if (mask[1]) {
        check.expect(agree("grad_weight" + which.str(), dw, dw_cpu, grad_param_dtype, dw_ref,
                           scale.grad_weight));
      } else {
        check.expect(unrequested("grad_weight" + which.str(), dw));
      }
      if (mask[2]) {
        check.expect(agree("grad_bias" + which.str(), db, db_cpu, grad_param_dtype, db_ref,
                           scale.grad_bias));
      } else {
        check.expect(unrequested("grad_bias" + which.str(), db));
      }
      if (!c.fused) continue;
      if (mask[3]) {
        check.expect(agree("grad_residual" + which.str(), dr, dr_cpu, c.dtype, dz_ref,
                           scale.grad_residual));
        check.expect_true(dr.strides() == x.strides(),
                          "grad_residual strides differ from the input's" + which.str());
      } else {
        check.expect(unrequested("grad_residual" + which.str(), dr));
      }
    }
  } catch (const dev::emu::EmulatorError& e) {
    return ::testing::AssertionFailure() << "emulator: " << e.what();
  }
  return check.result();
}

}  // namespace emulator
}  // namespace custom_bn
