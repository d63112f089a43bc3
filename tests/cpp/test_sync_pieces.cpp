// SyncBatchNorm's operators from C++ (custom_bn::batch_norm_stats, batch_norm_backward_reduce,
// batch_norm_backward_elemt): two "processes" simulated in one, their statistics and sums merged
// by hand as the Python SyncBatchNorm merges them, against at::batch_norm over the whole batch
// in float64. The multi-process tests are tests/python/test_sync.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <tuple>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::tensors_close;

TEST(SyncPieces, TwoShardsMergedEqualBatchNormOverTheWholeBatch) {
  torch::manual_seed(0);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  for (bool channels_last : {false, true}) {
    const auto fmt = channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
    const auto x = (torch::randn({7, 3, 4, 5}, f64) * 2 + 1).contiguous(fmt);
    const auto dy = torch::randn({7, 3, 4, 5}, f64).contiguous(fmt);
    const auto w = torch::rand({3}, f64) + 0.5, b = torch::randn({3}, f64);
    const std::vector<torch::Tensor> xs = {x.slice(0, 0, 3).contiguous(fmt), x.slice(0, 3).contiguous(fmt)};
    const std::vector<torch::Tensor> dys = {dy.slice(0, 0, 3).contiguous(fmt), dy.slice(0, 3).contiguous(fmt)};

    // Forward: merge (mean, biased var, count) of the shards with Chan's formula.
    torch::Tensor sum = torch::zeros({3}, f64), m2 = torch::zeros({3}, f64);
    std::vector<std::tuple<torch::Tensor, torch::Tensor>> stats;
    for (const auto& shard : xs) stats.push_back(custom_bn::batch_norm_stats(shard));
    const int64_t total = 7 * 20;
    for (size_t i = 0; i < xs.size(); ++i) sum += std::get<0>(stats[i]) * (xs[i].size(0) * 20);
    const auto mean = sum / total;
    for (size_t i = 0; i < xs.size(); ++i) {
      m2 += (std::get<1>(stats[i]) + (std::get<0>(stats[i]) - mean).square()) * (xs[i].size(0) * 20);
    }
    const auto var = m2 / total;
    const auto invstd = (var + 1e-5).rsqrt();

    // Backward: reduce per shard, sum, then each shard's grad_input.
    torch::Tensor sums = torch::zeros({2, 3}, f64);
    for (size_t i = 0; i < xs.size(); ++i) {
      sums += custom_bn::batch_norm_backward_reduce(dys[i], xs[i], w, b, {}, mean, invstd, "leaky_relu", 0.1);
    }
    std::vector<torch::Tensor> grads;
    for (size_t i = 0; i < xs.size(); ++i) {
      auto [gi, gr] = custom_bn::batch_norm_backward_elemt(dys[i], xs[i], w, b, {}, mean, invstd, sums, total,
                                                           "leaky_relu", 0.1, {true, false});
      EXPECT_EQ(gr.numel(), 0);
      grads.push_back(gi);
    }

    const auto xl = x.detach().requires_grad_(), wl = w.detach().requires_grad_(), bl = b.detach().requires_grad_();
    const auto y = torch::leaky_relu(at::batch_norm(xl, wl, bl, {}, {}, true, 0.1, 1e-5, false), 0.1);
    const auto want = torch::autograd::grad({y}, {xl, wl, bl}, {dy});
    const custom_bn::testing::Tolerance tol{1e-10, 1e-10};
    auto [want_var, want_mean] = torch::var_mean(x, {0, 2, 3}, /*unbiased=*/false);
    EXPECT_TRUE(tensors_close(mean, want_mean, tol));
    EXPECT_TRUE(tensors_close(var, want_var, tol));
    EXPECT_TRUE(tensors_close(torch::cat({grads[0], grads[1]}), want[0], tol)) << channels_last;
    EXPECT_TRUE(grads[1].is_contiguous(fmt));
    EXPECT_TRUE(tensors_close(sums[1] * invstd, want[1], tol));
    EXPECT_TRUE(tensors_close(sums[0], want[2], tol));
  }
}

}  // namespace
