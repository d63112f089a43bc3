// custom_bn::batch_norm called from eight std::threads at once, each on its own tensors
// (different shapes, dtypes and layouts; training with running statistics; forward and backward
// through C++ autograd, several iterations), gives exactly what the same calls give one after
// another. The CPU kernels index partial results by task, not by thread, so a call's result is
// deterministic and is compared bitwise; that the serial calls themselves are deterministic and
// agree with at::batch_norm in float64 is checked first, so the baseline is not itself wrong.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <algorithm>
#include <exception>
#include <latch>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::channel_varied_input;
using custom_bn::testing::channels_last_format;
using custom_bn::testing::opt;
using custom_bn::testing::tensors_close;
using custom_bn::testing::tolerance_for;

constexpr int kIterations = 4;  // training steps per job
constexpr int kRepeats = 8;     // of each job, by its thread, in the concurrent phase
constexpr double kMomentum = 0.2;
constexpr double kEps = 1e-5;

struct Job {
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
  torch::ScalarType param_dtype;  // weight, bias and running stats
  bool channels_last;
  bool affine;
};

// Eight jobs; the first two are large enough that each call also splits over torch's intra-op
// threads.
const std::vector<Job>& jobs() {
  static const std::vector<Job> all = {
      {{8, 16, 24, 24}, torch::kFloat, torch::kFloat, false, true},
      {{8, 16, 24, 24}, torch::kFloat, torch::kFloat, true, true},
      {{16, 5}, torch::kDouble, torch::kDouble, false, true},
      {{4, 6, 50}, torch::kDouble, torch::kDouble, false, false},
      {{4, 8, 12, 12}, torch::kHalf, torch::kFloat, true, true},
      {{4, 8, 12, 12}, torch::kBFloat16, torch::kBFloat16, false, true},
      {{2, 3, 4, 5, 6}, torch::kFloat, torch::kFloat, true, true},
      {{6, 7, 33}, torch::kHalf, torch::kHalf, false, true},
  };
  return all;
}

struct JobInputs {
  std::vector<torch::Tensor> inputs, grad_outputs;  // one per iteration
  torch::Tensor weight, bias, running_mean, running_var;

  static JobInputs make(const Job& job) {
    const int64_t C = job.shape[1];
    const auto params = torch::TensorOptions().dtype(job.param_dtype);
    const auto fmt = job.channels_last
                         ? channels_last_format(static_cast<int64_t>(job.shape.size()))
                         : torch::MemoryFormat::Contiguous;
    JobInputs in;
    for (int i = 0; i < kIterations; ++i) {
      in.inputs.push_back(channel_varied_input(job.shape, job.dtype).contiguous(fmt));
      in.grad_outputs.push_back(torch::randn(job.shape).to(job.dtype).contiguous(fmt));
    }
    if (job.affine) {
      in.weight = torch::rand({C}, params) + 0.5;
      in.bias = torch::randn({C}, params);
    }
    in.running_mean = torch::randn({C}, params);
    in.running_var = torch::rand({C}, params) + 0.5;
    return in;
  }
};

struct JobResults {
  std::vector<std::vector<torch::Tensor>> steps;  // per iteration: output, grads of x, w, b
  torch::Tensor running_mean, running_var;
};

// kIterations training steps with their own running statistics; `bn` is custom_bn::batch_norm
// or at::batch_norm.
template <typename BatchNorm>
JobResults run(const JobInputs& in, torch::ScalarType dtype, torch::ScalarType param_dtype,
               const BatchNorm& bn) {
  auto leaf = [&](const torch::Tensor& t, torch::ScalarType to) {
    return t.defined() ? t.to(to).clone(torch::MemoryFormat::Preserve).requires_grad_()
                       : torch::Tensor();
  };
  JobResults r;
  r.running_mean = in.running_mean.to(param_dtype).clone();
  r.running_var = in.running_var.to(param_dtype).clone();
  for (int i = 0; i < kIterations; ++i) {
    const torch::Tensor x = leaf(in.inputs[i], dtype);
    const torch::Tensor w = leaf(in.weight, param_dtype), b = leaf(in.bias, param_dtype);
    const torch::Tensor y = bn(x, w, b, r.running_mean, r.running_var);
    std::vector<torch::Tensor> wrt = {x};
    if (w.defined()) wrt.insert(wrt.end(), {w, b});
    std::vector<torch::Tensor> step = {y.detach()};
    for (const auto& g : torch::autograd::grad({y}, wrt, {in.grad_outputs[i].to(dtype)})) {
      step.push_back(g);
    }
    r.steps.push_back(step);
  }
  return r;
}

JobResults run_custom(const Job& job, const JobInputs& in) {
  return run(in, job.dtype, job.param_dtype,
             [](const auto& x, const auto& w, const auto& b, auto& rm, auto& rv) {
               return custom_bn::batch_norm(x, opt(w), opt(b), rm, rv, true, kMomentum, kEps);
             });
}

JobResults run_aten_float64(const JobInputs& in) {
  return run(in, torch::kDouble, torch::kDouble,
             [](const auto& x, const auto& w, const auto& b, auto& rm, auto& rv) {
               return at::batch_norm(x, opt(w), opt(b), rm, rv, true, kMomentum, kEps, false);
             });
}

const char* const kNames[] = {"output", "grad_input", "grad_weight", "grad_bias"};

// Every result of `got` that is not bitwise equal to `expected`'s, by name.
std::vector<std::string> differences(const JobResults& got, const JobResults& expected) {
  std::vector<std::string> found;
  for (int i = 0; i < kIterations; ++i) {
    for (size_t k = 0; k < expected.steps[i].size(); ++k) {
      if (!torch::equal(got.steps[i][k], expected.steps[i][k])) {
        found.push_back("step " + std::to_string(i) + " " + kNames[k]);
      }
    }
  }
  if (!torch::equal(got.running_mean, expected.running_mean)) found.push_back("running_mean");
  if (!torch::equal(got.running_var, expected.running_var)) found.push_back("running_var");
  return found;
}

std::string joined(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& item : items) s += (s.empty() ? "" : ", ") + item;
  return s;
}

// got is within its dtype's tolerance of the float64 reference, atol taken relative to the
// reference's largest magnitude: grad_bias sums thousands of terms that cancel.
::testing::AssertionResult close_to_reference(const torch::Tensor& got,
                                              const torch::Tensor& ref64) {
  auto tol = tolerance_for(got.scalar_type());
  tol.atol *= std::max(1.0, ref64.abs().max().item<double>());
  return tensors_close(got, ref64.to(got.scalar_type()), tol);
}

TEST(Concurrency, EightThreadsGiveTheSerialResults) {
  torch::manual_seed(0);
  std::vector<JobInputs> inputs;
  for (const Job& job : jobs()) inputs.push_back(JobInputs::make(job));
  const size_t n = jobs().size();

  // The baseline: serial calls, right (vs ATen in float64) and deterministic (run twice).
  std::vector<JobResults> serial;
  for (size_t j = 0; j < n; ++j) {
    serial.push_back(run_custom(jobs()[j], inputs[j]));
    EXPECT_TRUE(differences(run_custom(jobs()[j], inputs[j]), serial[j]).empty())
        << "job " << j << ": a repeated serial call differs";
    const JobResults ref = run_aten_float64(inputs[j]);
    for (int i = 0; i < kIterations; ++i) {
      for (size_t k = 0; k < serial[j].steps[i].size(); ++k) {
        EXPECT_TRUE(close_to_reference(serial[j].steps[i][k], ref.steps[i][k]))
            << "job " << j << " step " << i << " " << kNames[k] << " vs ATen float64";
      }
    }
    EXPECT_TRUE(close_to_reference(serial[j].running_mean, ref.running_mean))
        << "job " << j << " running_mean vs ATen float64";
    EXPECT_TRUE(close_to_reference(serial[j].running_var, ref.running_var))
        << "job " << j << " running_var vs ATen float64";
  }

  // All jobs at once, released together, each repeated so that many calls begin and end while
  // the others run; every repetition is compared with the serial results.
  std::vector<std::vector<std::string>> mismatches(n);
  std::latch start(static_cast<std::ptrdiff_t>(n));
  std::vector<std::thread> threads;
  for (size_t j = 0; j < n; ++j) {
    threads.emplace_back([&, j] {
      start.arrive_and_wait();
      try {
        for (int r = 0; r < kRepeats; ++r) {
          for (const auto& d : differences(run_custom(jobs()[j], inputs[j]), serial[j])) {
            mismatches[j].push_back("repeat " + std::to_string(r) + " " + d);
          }
        }
      } catch (const std::exception& e) {
        mismatches[j].push_back(std::string("threw: ") + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (size_t j = 0; j < n; ++j) {
    EXPECT_TRUE(mismatches[j].empty())
        << "job " << j << " differs from the serial calls in: " << joined(mismatches[j]);
  }
}

}  // namespace
