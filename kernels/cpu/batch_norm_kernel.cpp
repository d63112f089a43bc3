// CPU kernels of custom_bn::batch_norm_forward and custom_bn::batch_norm_backward.
//
// Two layouts, chosen from the memory format of the input:
//  - contiguous (N, C, *): a channel is N runs of HW contiguous values. One task owns whole
//    channels, so the statistics pass and the normalize pass read the same, still cached, data.
//  - channels-last (rows of C contiguous values; also (N, C) and any input with HW == 1): tasks
//    own blocks of rows and keep per-thread partial statistics that are merged at the end.
// Values are processed in cache-sized chunks: each chunk gets an exact two-pass mean/M2 in the
// accumulation type, and chunks are merged in double with Chan's formula (kernels/common), so
// long reductions neither lose precision nor form E[x^2] - E[x]^2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "common/batch_norm_math.h"
#include "common/welford.h"

namespace custom_bn {
namespace {

using at::vec::Vectorized;

// Elements per chunk: small enough that a chunk's second pass hits L1/L2.
constexpr int64_t kChunk = 4096;
// Below this many elements per task, threading costs more than it saves.
constexpr int64_t kGrainElements = 32768;

// Vector loads/stores of scalar_t values as vectors of the accumulation type.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kWidth);
    }
  }
};

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) total += lanes[i];
  return total;
}

// Two-pass statistics of n contiguous values (n <= kChunk, so the second pass is cached). The
// second pass also sums the deviations: subtracting (sum d)^2 / n removes the effect of the
// rounding error of the first-pass mean on M2 (the corrected two-pass algorithm).
template <typename scalar_t>
WelfordStats<double> contiguous_chunk_stats(const scalar_t* x, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) vsum += IO::load(x + i);
  acc_t sum = horizontal_sum(vsum);
  for (; i < n; ++i) sum += acc_t(x[i]);
  const acc_t mean = sum / acc_t(n);

  const Vec vmean(mean);
  Vec vm2(acc_t(0)), vdev(acc_t(0));
  i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    const Vec d = IO::load(x + i) - vmean;
    vdev += d;
    vm2 = at::vec::fmadd(d, d, vm2);
  }
  acc_t m2 = horizontal_sum(vm2), dev = horizontal_sum(vdev);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - mean;
    dev += d;
    m2 += d * d;
  }
  const double dev_mean = double(dev) / double(n);
  return {double(mean) + dev_mean, std::max(0.0, double(m2) - double(dev) * dev_mean), double(n)};
}

// sum(dy) and sum(dy * (x - mean)) over n contiguous values.
template <typename scalar_t>
std::pair<double, double> contiguous_chunk_grad_sums(const scalar_t* dy, const scalar_t* x,
                                                     int64_t n, at::opmath_type<scalar_t> mean) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec vmean(mean);
  Vec vsum(acc_t(0)), vdot(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    const Vec g = IO::load(dy + i);
    vsum += g;
    vdot = at::vec::fmadd(g, IO::load(x + i) - vmean, vdot);
  }
  acc_t sum = horizontal_sum(vsum), dot = horizontal_sum(vdot);
  for (; i < n; ++i) {
    const acc_t g = acc_t(dy[i]);
    sum += g;
    dot += g * (acc_t(x[i]) - mean);
  }
  return {double(sum), double(dot)};
}

// out[i] = a[i] * ka + (b ? (b[i] - b_shift) * kb : 0) + kc over n contiguous values: the
// normalize pass (a = x) and the grad_input pass (a = dy, b = x, b_shift = mean) of the
// contiguous layout.
template <typename scalar_t>
void contiguous_affine(scalar_t* out, const scalar_t* a, at::opmath_type<scalar_t> ka,
                       const scalar_t* b, at::opmath_type<scalar_t> b_shift,
                       at::opmath_type<scalar_t> kb, at::opmath_type<scalar_t> kc, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec vka(ka), vkb(kb), vkc(kc), vshift(b_shift);
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), vka, vkc));
    }
    for (; i < n; ++i) out[i] = scalar_t(acc_t(a[i]) * ka + kc);
  } else {
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      const Vec t = at::vec::fmadd(IO::load(b + i) - vshift, vkb, vkc);
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), vka, t));
    }
    for (; i < n; ++i) out[i] = scalar_t(acc_t(a[i]) * ka + ((acc_t(b[i]) - b_shift) * kb + kc));
  }
}

int64_t channel_grain(const Geometry& g) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.count()));
}

int64_t row_grain(const Geometry& g) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.c));
}

// Rows per chunk in the channels-last layout: about kChunk values, at least one row.
int64_t rows_per_chunk(const Geometry& g) {
  return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, g.c));
}

// Per-channel mean and biased variance of a channels-last tensor.
template <typename scalar_t>
void rows_stats(const scalar_t* x, const Geometry& g, std::vector<double>& mean,
                std::vector<double>& var) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = g.c, R = g.count(), chunk_rows = rows_per_chunk(g);
  const int64_t threads = at::get_num_threads();
  // Per thread: count, then mean[C], then m2[C] (all in double).
  std::vector<double> partial(threads * (1 + 2 * C), 0.0);

  at::parallel_for(0, R, row_grain(g), [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + at::get_thread_num() * (1 + 2 * C);
    double* t_mean = acc + 1;
    double* t_m2 = acc + 1 + C;
    std::vector<acc_t> sum(C), m2(C);
    for (int64_t r0 = begin; r0 < end; r0 += chunk_rows) {
      const int64_t nr = std::min(chunk_rows, end - r0);
      const scalar_t* base = x + r0 * C;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(m2.begin(), m2.end(), acc_t(0));
      for (int64_t r = 0; r < nr; ++r) {
        const scalar_t* row = base + r * C;
        int64_t c = 0;
        for (; c + IO::kWidth <= C; c += IO::kWidth) {
          (Vec::loadu(sum.data() + c) + IO::load(row + c)).store(sum.data() + c);
        }
        for (; c < C; ++c) sum[c] += acc_t(row[c]);
      }
      const acc_t inv_nr = acc_t(1) / acc_t(nr);
      for (int64_t c = 0; c < C; ++c) sum[c] *= inv_nr;  // sum now holds the chunk mean
      for (int64_t r = 0; r < nr; ++r) {
        const scalar_t* row = base + r * C;
        int64_t c = 0;
        for (; c + IO::kWidth <= C; c += IO::kWidth) {
          const Vec d = IO::load(row + c) - Vec::loadu(sum.data() + c);
          at::vec::fmadd(d, d, Vec::loadu(m2.data() + c)).store(m2.data() + c);
        }
        for (; c < C; ++c) {
          const acc_t d = acc_t(row[c]) - sum[c];
          m2[c] += d * d;
        }
      }
      const double count = acc[0];
      for (int64_t c = 0; c < C; ++c) {
        const auto merged = welford_merge(WelfordStats<double>{t_mean[c], t_m2[c], count},
                                          WelfordStats<double>{double(sum[c]), double(m2[c]),
                                                               double(nr)});
        t_mean[c] = merged.mean;
        t_m2[c] = merged.m2;
      }
      acc[0] = count + double(nr);
    }
  });

  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    WelfordStats<double> total;
    for (int64_t t = 0; t < threads; ++t) {
      const double* acc = partial.data() + t * (1 + 2 * C);
      total = welford_merge(total, WelfordStats<double>{acc[1 + c], acc[1 + C + c], acc[0]});
    }
    mean[c] = total.mean;
    var[c] = total.count > 0 ? total.m2 / total.count : 0.0;
  }
}

// Per-channel sum(dy) and sum(dy * (x - mean)) of a channels-last tensor.
template <typename scalar_t>
void rows_grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                    const at::opmath_type<scalar_t>* mean, std::vector<double>& sum_dy,
                    std::vector<double>& sum_dot) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = g.c, R = g.count(), chunk_rows = rows_per_chunk(g);
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(threads * 2 * C, 0.0);

  at::parallel_for(0, R, row_grain(g), [&](int64_t begin, int64_t end) {
    double* t_sum = partial.data() + at::get_thread_num() * 2 * C;
    double* t_dot = t_sum + C;
    std::vector<acc_t> sum(C), dot(C);
    for (int64_t r0 = begin; r0 < end; r0 += chunk_rows) {
      const int64_t nr = std::min(chunk_rows, end - r0);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(dot.begin(), dot.end(), acc_t(0));
      for (int64_t r = r0; r < r0 + nr; ++r) {
        const scalar_t* g_row = dy + r * C;
        const scalar_t* x_row = x + r * C;
        int64_t c = 0;
        for (; c + IO::kWidth <= C; c += IO::kWidth) {
          const Vec gv = IO::load(g_row + c);
          (Vec::loadu(sum.data() + c) + gv).store(sum.data() + c);
          at::vec::fmadd(gv, IO::load(x_row + c) - Vec::loadu(mean + c),
                         Vec::loadu(dot.data() + c))
              .store(dot.data() + c);
        }
        for (; c < C; ++c) {
          const acc_t gv = acc_t(g_row[c]);
          sum[c] += gv;
          dot[c] += gv * (acc_t(x_row[c]) - mean[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        t_sum[c] += double(sum[c]);
        t_dot[c] += double(dot[c]);
      }
    }
  });

  sum_dy.assign(C, 0.0);
  sum_dot.assign(C, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += partial[t * 2 * C + c];
      sum_dot[c] += partial[t * 2 * C + C + c];
    }
  }
}

// out = a * ka[c] + (b ? (b - b_shift[c]) * kb[c] : 0) + kc[c] over rows of C values
// (channels-last).
template <typename scalar_t>
void rows_affine(scalar_t* out, const scalar_t* a, const at::opmath_type<scalar_t>* ka,
                 const scalar_t* b, const at::opmath_type<scalar_t>* b_shift,
                 const at::opmath_type<scalar_t>* kb,
                 const at::opmath_type<scalar_t>* kc, const Geometry& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = g.c;
  at::parallel_for(0, g.count(), row_grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* a_row = a + r * C;
      const scalar_t* b_row = b ? b + r * C : nullptr;
      scalar_t* o_row = out + r * C;
      int64_t c = 0;
      for (; c + IO::kWidth <= C; c += IO::kWidth) {
        Vec t = Vec::loadu(kc + c);
        if (b_row) {
          t = at::vec::fmadd(IO::load(b_row + c) - Vec::loadu(b_shift + c), Vec::loadu(kb + c), t);
        }
        IO::store(o_row + c, at::vec::fmadd(IO::load(a_row + c), Vec::loadu(ka + c), t));
      }
      for (; c < C; ++c) {
        acc_t t = kc[c];
        if (b_row) t += (acc_t(b_row[c]) - b_shift[c]) * kb[c];
        o_row[c] = scalar_t(acc_t(a_row[c]) * ka[c] + t);
      }
    }
  });
}

// Per-channel tensor as a contiguous tensor of the accumulation dtype (ones/zeros when absent).
at::Tensor channel_values(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                          at::ScalarType acc, double fill) {
  if (given(t)) return t->to(acc).contiguous();
  return at::full({input.size(1)}, fill, input.options().dtype(acc));
}

// running = (1 - m) running + m batch in place, in the accumulation type of the input.
template <typename acc_t>
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const acc_t* mean,
                          const std::vector<double>& var, double count, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running_mean.scalar_type(), "custom_bn_running_stats", [&] {
        scalar_t* rm = running_mean.data_ptr<scalar_t>();
        scalar_t* rv = running_var.data_ptr<scalar_t>();
        const int64_t sm = running_mean.stride(0), sv = running_var.stride(0);
        const acc_t m = acc_t(momentum);
        for (int64_t c = 0; c < running_mean.size(0); ++c) {
          rm[c * sm] = scalar_t(running_update(acc_t(rm[c * sm]), mean[c], m));
          const acc_t unbiased = acc_t(unbiased_variance(var[c], count));
          rv[c * sv] = scalar_t(running_update(acc_t(rv[c * sv]), unbiased, m));
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input_arg, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  check_batch_norm_forward_args(input_arg, weight, bias, running_mean, running_var, training,
                                momentum, eps);
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const auto acc = accumulate_dtype(input.scalar_type());
  const Geometry g = geometry_of(input, fmt);
  at::Tensor output = at::empty_like(input, input.options(), fmt);
  at::Tensor save_mean = at::empty({g.c}, input.options().dtype(acc));
  at::Tensor save_invstd = at::empty({g.c}, input.options().dtype(acc));
  const bool batch_stats = training && g.count() > 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "custom_bn_batch_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = channel_values(weight, input, acc, 1.0);
    const at::Tensor b = channel_values(bias, input, acc, 0.0);
    const acc_t* w_ptr = w.data_ptr<acc_t>();
    const acc_t* b_ptr = b.data_ptr<acc_t>();
    acc_t* mean_ptr = save_mean.data_ptr<acc_t>();
    acc_t* invstd_ptr = save_invstd.data_ptr<acc_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.data_ptr<scalar_t>();
    std::vector<double> var(g.c, 0.0);

    if (!training) {
      const at::Tensor rm = running_mean->to(acc).contiguous();
      const at::Tensor rv = running_var->to(acc).contiguous();
      for (int64_t c = 0; c < g.c; ++c) {
        mean_ptr[c] = rm.const_data_ptr<acc_t>()[c];
        invstd_ptr[c] = acc_t(1) / std::sqrt(rv.const_data_ptr<acc_t>()[c] + acc_t(eps));
      }
    } else if (!batch_stats) {
      save_mean.zero_();
      save_invstd.zero_();
    }

    if (g.layout == Layout::kChannelsLast) {
      if (batch_stats) {
        std::vector<double> mean;
        rows_stats(x, g, mean, var);
        for (int64_t c = 0; c < g.c; ++c) {
          mean_ptr[c] = acc_t(mean[c]);
          invstd_ptr[c] = acc_t(1.0 / std::sqrt(var[c] + eps));
        }
      }
      std::vector<acc_t> alpha(g.c), beta(g.c);
      for (int64_t c = 0; c < g.c; ++c) {
        const auto k = fold_affine(mean_ptr[c], invstd_ptr[c], w_ptr[c], b_ptr[c]);
        alpha[c] = k.alpha;
        beta[c] = k.beta;
      }
      rows_affine<scalar_t>(y, x, alpha.data(), nullptr, nullptr, nullptr, beta.data(), g);
    } else {
      const int64_t stride_n = g.c * g.hw;
      at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          if (batch_stats) {
            WelfordStats<double> s;
            for (int64_t n = 0; n < g.n; ++n) {
              const scalar_t* p = x + n * stride_n + c * g.hw;
              for (int64_t off = 0; off < g.hw; off += kChunk) {
                s = welford_merge(s, contiguous_chunk_stats(p + off, std::min(kChunk, g.hw - off)));
              }
            }
            var[c] = s.m2 / s.count;
            mean_ptr[c] = acc_t(s.mean);
            invstd_ptr[c] = acc_t(1.0 / std::sqrt(var[c] + eps));
          }
          const auto k = fold_affine(mean_ptr[c], invstd_ptr[c], w_ptr[c], b_ptr[c]);
          for (int64_t n = 0; n < g.n; ++n) {
            const int64_t off = n * stride_n + c * g.hw;
            contiguous_affine<scalar_t>(y + off, x + off, k.alpha, nullptr, acc_t(0), acc_t(0),
                                        k.beta, g.hw);
          }
        }
      });
    }

    if (batch_stats && given(running_mean)) {
      at::Tensor rm = *running_mean, rv = *running_var;
      update_running_stats<acc_t>(rm, rv, mean_ptr, var, double(g.count()), momentum);
    }
  });
  return {output, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean_arg,
    const at::Tensor& save_invstd_arg, bool training, double /*eps*/,
    std::array<bool, 3> output_mask) {
  check_batch_norm_backward_args(grad_output_arg, input_arg, weight, save_mean_arg,
                                 save_invstd_arg);
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const at::Tensor grad_output = grad_output_arg.contiguous(fmt);
  const at::Tensor save_mean = save_mean_arg.contiguous();
  const at::Tensor save_invstd = save_invstd_arg.contiguous();
  const auto acc = accumulate_dtype(input.scalar_type());
  const auto param_dtype = given(weight) ? weight->scalar_type() : input.scalar_type();
  const Geometry g = geometry_of(input, fmt);
  // The reductions feed grad_weight/grad_bias and, in training, grad_input.
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);

  at::Tensor grad_input = output_mask[0] ? at::empty_like(input, input.options(), fmt)
                                          : unrequested_gradient(input);
  at::Tensor grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "custom_bn_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = channel_values(weight, input, acc, 1.0);
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* mean = save_mean.const_data_ptr<acc_t>();
    const acc_t* invstd = save_invstd.const_data_ptr<acc_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* dx = output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
    std::vector<double> sum_dy(g.c, 0.0), sum_dot(g.c, 0.0);
    const acc_t count = acc_t(g.count());

    if (g.layout == Layout::kChannelsLast) {
      if (need_sums && g.count() > 0) rows_grad_sums(dy, x, g, mean, sum_dy, sum_dot);
      if (dx) {
        std::vector<acc_t> k_dy(g.c), k_x(g.c), k_c(g.c);
        for (int64_t c = 0; c < g.c; ++c) {
          const auto k = fold_backward(mean[c], invstd[c], w_ptr[c], acc_t(sum_dy[c]),
                                       acc_t(sum_dot[c]), count, training);
          k_dy[c] = k.k_dy;
          k_x[c] = k.k_x;
          k_c[c] = k.k_c;
        }
        rows_affine<scalar_t>(dx, dy, k_dy.data(), training ? x : nullptr, mean, k_x.data(),
                              k_c.data(), g);
      }
    } else {
      const int64_t stride_n = g.c * g.hw;
      at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          if (need_sums) {
            for (int64_t n = 0; n < g.n; ++n) {
              const int64_t base = n * stride_n + c * g.hw;
              for (int64_t off = 0; off < g.hw; off += kChunk) {
                const auto [s, d] = contiguous_chunk_grad_sums(
                    dy + base + off, x + base + off, std::min(kChunk, g.hw - off), mean[c]);
                sum_dy[c] += s;
                sum_dot[c] += d;
              }
            }
          }
          if (!dx) continue;
          const auto k = fold_backward(mean[c], invstd[c], w_ptr[c], acc_t(sum_dy[c]),
                                       acc_t(sum_dot[c]), count, training);
          for (int64_t n = 0; n < g.n; ++n) {
            const int64_t off = n * stride_n + c * g.hw;
            contiguous_affine<scalar_t>(dx + off, dy + off, k.k_dy, training ? x + off : nullptr,
                                        k.mean, k.k_x, k.k_c, g.hw);
          }
        }
      });
    }

    if (output_mask[1] || output_mask[2]) {
      at::Tensor gw = at::empty({g.c}, input.options().dtype(acc));
      at::Tensor gb = at::empty({g.c}, input.options().dtype(acc));
      acc_t* gw_ptr = gw.data_ptr<acc_t>();
      acc_t* gb_ptr = gb.data_ptr<acc_t>();
      for (int64_t c = 0; c < g.c; ++c) {
        gw_ptr[c] = acc_t(sum_dot[c] * double(invstd[c]));
        gb_ptr[c] = acc_t(sum_dy[c]);
      }
      if (output_mask[1]) grad_weight = gw.to(param_dtype);
      if (output_mask[2]) grad_bias = gb.to(param_dtype);
    }
  });
  if (!output_mask[1]) grad_weight = unrequested_gradient(input);
  if (!output_mask[2]) grad_bias = unrequested_gradient(input);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace custom_bn
