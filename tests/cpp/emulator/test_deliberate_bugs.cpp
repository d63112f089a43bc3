// The harness can fail: the real kernels, each with one deliberate bug, must be caught. A
// Mutation (cuda_emulator.h) alters one call site of a real kernel at run time, which is the
// kernel with that one statement changed, without a hand-made copy that could drift from it:
//  - a dropped __syncthreads in a block reduction (a shared-memory race),
//  - threadIdx.y read where threadIdx.x was meant and the reverse (a flipped index).
// Each test first shows the unmutated case passes, then that the mutated one fails the
// comparison with the CPU kernels, and that the mutation really struck (its hit count).
// The fused epilogue's backward is given a wrong derivative through its arguments instead (a
// BackwardFault of parity.h): the real kernels then differentiate another activation than the
// forward applied, or recompute z without the residual, exactly as a kernel with that bug would;
// likewise the in-place backward recovers its input without the bias or with a wrong slope.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "cuda_emulator.h"
#include "parity.h"

namespace custom_bn {
namespace emulator {
namespace {

namespace emu = dev::emu;

ParityCase bug_case(std::vector<int64_t> shape, bool channels_last) {
  ParityCase c;
  c.shape = std::move(shape);
  c.channels_last = channels_last;
  c.dtype = at::kFloat;
  c.param_dtype = at::kFloat;
  c.training = true;
  c.device = two_warp_splits();  // blocks of two warps, channels split over several blocks
  c.schedule.order = emu::ThreadOrder::kForward;
  c.schedule.resident_blocks = 1;
  c.seed = 7;
  return c;
}

// The __syncthreads call sites of `function` that a run of case c reaches, by line.
std::vector<unsigned> barrier_lines(const ParityCase& c, const std::string& function) {
  emu::ScopedSiteCatalog catalog;
  EXPECT_TRUE(check_parity(c)) << "the unmutated kernel must pass";
  std::vector<unsigned> lines;
  for (const emu::CallSite& s : catalog.sites()) {
    if (s.primitive == emu::Primitive::kSyncThreads &&
        s.function.find(function) != std::string::npos &&
        std::find(lines.begin(), lines.end(), s.line) == lines.end()) {
      lines.push_back(s.line);
    }
  }
  std::sort(lines.begin(), lines.end());
  return lines;
}

std::string first_lines(const std::string& s, int n) {
  size_t end = 0;
  for (int i = 0; i < n && end != std::string::npos; ++i) end = s.find('\n', end + 1);
  return end == std::string::npos ? s : s.substr(0, end) + "\n  ...";
}

// column_reduce (channels-last statistics and gradient sums) stores each thread's partial to
// shared memory, synchronizes, then folds the upper half of the rows onto the lower half.
// Without that barrier a thread reads its partner's slot before the partner wrote it.
TEST(DeliberateBugs, DroppedBarrierInColumnReduceIsCaught) {
  const ParityCase c = bug_case({4, 3, 7, 9}, /*channels_last=*/true);
  const std::vector<unsigned> lines = barrier_lines(c, "column_reduce");
  ASSERT_GE(lines.size(), 3u) << "expected the barriers before the store, after it and per step";
  emu::ScopedMutation drop({emu::Primitive::kSyncThreads, "column_reduce", lines[1]});
  const ::testing::AssertionResult result = check_parity(c);
  EXPECT_FALSE(result) << "dropping the barrier at batch_norm_kernel.cuh:" << lines[1]
                       << " went unnoticed";
  EXPECT_GT(drop.hits(), 0);
  std::printf("[ caught   ] column_reduce without the __syncthreads at line %u:%s\n", lines[1],
              first_lines(result.message(), 3).c_str());
}

// block_reduce (contiguous layout): lane 0 of every warp stores the warp's partial, the block
// synchronizes, warp 0 combines them. Without that barrier warp 0 reads unwritten slots.
TEST(DeliberateBugs, DroppedBarrierInBlockReduceIsCaught) {
  const ParityCase c = bug_case({5, 17, 33}, /*channels_last=*/false);
  const std::vector<unsigned> lines = barrier_lines(c, "block_reduce");
  ASSERT_EQ(lines.size(), 2u) << "expected the barriers before and after the per-warp store";
  emu::ScopedMutation drop({emu::Primitive::kSyncThreads, "block_reduce", lines[1]});
  const ::testing::AssertionResult result = check_parity(c);
  EXPECT_FALSE(result) << "dropping the barrier at batch_norm_kernel.cuh:" << lines[1]
                       << " went unnoticed";
  EXPECT_GT(drop.hits(), 0);
  std::printf("[ caught   ] block_reduce without the __syncthreads at line %u:%s\n", lines[1],
              first_lines(result.message(), 3).c_str());
}

// The contiguous kernels walk N with threadIdx.y and HW with threadIdx.x; reading threadIdx.x
// for the N position visits the wrong samples.
TEST(DeliberateBugs, FlippedThreadIndexInContiguousLoopIsCaught) {
  const ParityCase c = bug_case({5, 17, 33}, /*channels_last=*/false);
  ASSERT_TRUE(check_parity(c));
  emu::ScopedMutation flip({emu::Primitive::kThreadIdxY, "for_each_contiguous", 0});
  const ::testing::AssertionResult result = check_parity(c);
  EXPECT_FALSE(result) << "threadIdx.x in place of threadIdx.y went unnoticed";
  EXPECT_GT(flip.hits(), 0);
  std::printf("[ caught   ] for_each_contiguous reading threadIdx.x for threadIdx.y:%s\n",
              first_lines(result.message(), 3).c_str());
}

// The channels-last kernels give each threadIdx.x a channel; threadIdx.y there mixes channels.
TEST(DeliberateBugs, FlippedThreadIndexInChannelsLastChannelIsCaught) {
  const ParityCase c = bug_case({2, 40, 3, 3}, /*channels_last=*/true);
  ASSERT_TRUE(check_parity(c));
  emu::ScopedMutation flip({emu::Primitive::kThreadIdxX, "channels_last_channel", 0});
  const ::testing::AssertionResult result = check_parity(c);
  EXPECT_FALSE(result) << "threadIdx.y in place of threadIdx.x went unnoticed";
  EXPECT_GT(flip.hits(), 0);
  std::printf("[ caught   ] channels_last_channel reading threadIdx.y for threadIdx.x:%s\n",
              first_lines(result.message(), 3).c_str());
}

ParityCase fused_bug_case(Activation activation, double param, bool channels_last) {
  ParityCase c = bug_case(channels_last ? std::vector<int64_t>{2, 40, 3, 3}
                                        : std::vector<int64_t>{5, 17, 33},
                          channels_last);
  c.fused = true;
  c.activation = activation;
  c.activation_param = param;
  c.residual = true;
  c.masks = {{true, true, true, true}};
  return c;
}

struct DerivativeBug {
  const char* what;
  ParityCase c;
};

// Each a derivative that is wrong only in part of its domain or only slightly: relu's mask
// leaking a 0.01 slope, leaky_relu's slope off by 0.05, elu's alpha off by 0.3 on its negative
// side, silu's derivative taken as 1, and a z recomputed without the residual (relu's mask, hence
// its derivative, then comes from the wrong z).
std::vector<DerivativeBug> derivative_bugs() {
  std::vector<DerivativeBug> bugs;
  for (bool channels_last : {false, true}) {
    ParityCase relu = fused_bug_case(Activation::kRelu, 0.0, channels_last);
    relu.fault.activation = Activation::kLeakyRelu;
    relu.fault.activation_param = 0.01;
    bugs.push_back({"relu differentiated as leaky_relu(0.01)", relu});

    ParityCase leaky = fused_bug_case(Activation::kLeakyRelu, 0.2, channels_last);
    leaky.fault.activation_param = 0.25;
    bugs.push_back({"leaky_relu(0.2) differentiated with slope 0.25", leaky});

    ParityCase elu = fused_bug_case(Activation::kElu, 1.3, channels_last);
    elu.fault.activation_param = 1.0;
    bugs.push_back({"elu(1.3) differentiated with alpha 1", elu});

    ParityCase silu = fused_bug_case(Activation::kSilu, 0.0, channels_last);
    silu.fault.activation = Activation::kIdentity;
    bugs.push_back({"silu differentiated as the identity", silu});

    ParityCase no_residual = fused_bug_case(Activation::kRelu, 0.0, channels_last);
    no_residual.fault.drop_residual = true;
    bugs.push_back({"relu's z recomputed without the residual", no_residual});
  }
  return bugs;
}

TEST(DeliberateBugs, WrongActivationDerivativeIsCaught) {
  for (const DerivativeBug& bug : derivative_bugs()) {
    ParityCase correct = bug.c;
    correct.fault = BackwardFault{};
    ASSERT_TRUE(check_parity(correct)) << "the unmutated kernels must pass: " << correct.name();
    const ::testing::AssertionResult result = check_parity(bug.c);
    EXPECT_FALSE(result) << bug.what << " went unnoticed (" << bug.c.name() << ")";
    std::printf("[ caught   ] %s (%s):%s\n", bug.what,
                bug.c.channels_last ? "channels-last" : "contiguous",
                first_lines(result.message(), 2).c_str());
  }
}

// The in-place backward works from the output alone, recovering x - mean = (z - b) / (w invstd)
// with z = act^-1(y). Each bug breaks that recovery: the bias forgotten (z / (w invstd)), and
// leaky_relu's output inverted and differentiated with a slope off by 0.05.
std::vector<DerivativeBug> inplace_bugs() {
  std::vector<DerivativeBug> bugs;
  for (bool channels_last : {false, true}) {
    ParityCase c = bug_case(channels_last ? std::vector<int64_t>{2, 40, 3, 3}
                                          : std::vector<int64_t>{5, 17, 33},
                            channels_last);
    c.inplace = true;
    c.activation = Activation::kLeakyRelu;
    c.activation_param = 0.2;
    c.mixed_sign_weight = true;

    ParityCase no_bias = c;
    no_bias.fault.drop_bias = true;
    bugs.push_back({"x - mean recovered without the bias", no_bias});

    ParityCase slope = c;
    slope.fault.activation_param = 0.25;
    bugs.push_back({"leaky_relu(0.2) inverted with slope 0.25", slope});
  }
  return bugs;
}

TEST(DeliberateBugs, WrongInPlaceRecoveryIsCaught) {
  for (const DerivativeBug& bug : inplace_bugs()) {
    ParityCase correct = bug.c;
    correct.fault = BackwardFault{};
    ASSERT_TRUE(check_parity(correct)) << "the unmutated kernels must pass: " << correct.name();
    const ::testing::AssertionResult result = check_parity(bug.c);
    EXPECT_FALSE(result) << bug.what << " went unnoticed (" << bug.c.name() << ")";
    std::printf("[ caught   ] %s (%s):%s\n", bug.what,
                bug.c.channels_last ? "channels-last" : "contiguous",
                first_lines(result.message(), 2).c_str());
  }
}

// "block_reduce" from "... custom_bn::cuda_kernels::emulated::block_reduce(...) [with ...]".
std::string bare_function(const std::string& function_name) {
  const std::string head = function_name.substr(0, function_name.find('('));
  const std::string name = head.substr(head.rfind(' ') + 1);
  return name.substr(name.rfind("::") == std::string::npos ? 0 : name.rfind("::") + 2);
}

// Every barrier of the kernels, dropped one at a time and run under several schedules (thread
// orders; all blocks interleaved with stalling threads, which is what exposes a block that
// signals its arrival before all its threads stored their partial results). Each must be caught,
// except the first barrier of block_reduce and of column_reduce: it protects the scratch from a
// previous reduction still reading it, and in these kernels the barriers of arrive_last already
// separate the two reductions, so no schedule can expose its absence (reported as redundant).
TEST(DeliberateBugs, EveryBarrierSweep) {
  // Contiguous; channels-last with block.y = 16 (several folding steps); channels-last with
  // 32 channels per block, so that many threads store partial results before the block signals.
  const std::vector<ParityCase> cases = {bug_case({5, 17, 33}, false),
                                         bug_case({4, 3, 7, 9}, true),
                                         bug_case({8, 40, 6, 6}, true)};
  std::vector<std::pair<ParityCase, emu::Schedule>> runs;
  for (const ParityCase& c : cases) {
    for (auto order : {emu::ThreadOrder::kForward, emu::ThreadOrder::kReverse}) {
      emu::Schedule s;
      s.order = order;
      s.resident_blocks = 1;
      runs.emplace_back(c, s);
    }
  }
  // Every block in flight at once, threads stalling now and then for a few to a few dozen
  // rounds: a race between blocks needs one thread to fall behind at the wrong moment, which a
  // single schedule rarely arranges and a few dozen seeds do.
  for (uint64_t seed = 1; seed <= 48; ++seed) {
    emu::Schedule s;
    s.order = emu::ThreadOrder::kRandom;
    s.resident_blocks = 8;
    s.stall_probability = 0.02 * double(1 + seed % 4);
    s.stall_rounds = seed % 2 == 0 ? 4.0 : 16.0;
    s.seed = seed;
    runs.emplace_back(cases[2], s);
  }

  struct Barrier {
    std::string file;
    unsigned line;
    std::string function;
    auto operator<=>(const Barrier&) const = default;
  };
  std::vector<Barrier> barriers;
  {
    emu::ScopedSiteCatalog catalog;
    for (const ParityCase& c : cases) ASSERT_TRUE(check_parity(c));
    for (const emu::CallSite& s : catalog.sites()) {
      const Barrier b{s.file, s.line, bare_function(s.function)};
      if (s.primitive == emu::Primitive::kSyncThreads &&
          std::find(barriers.begin(), barriers.end(), b) == barriers.end()) {
        barriers.push_back(b);
      }
    }
  }
  std::sort(barriers.begin(), barriers.end());
  ASSERT_GE(barriers.size(), 7u);

  std::map<std::string, unsigned> first_line;
  for (const Barrier& b : barriers) first_line.emplace(b.function, b.line);
  std::printf("[ sweep    ] each __syncthreads of the kernels dropped in turn:\n");
  for (const Barrier& b : barriers) {
    int caught = 0;
    int64_t hits = 0;
    for (auto [c, schedule] : runs) {
      c.schedule = schedule;
      emu::ScopedMutation drop({emu::Primitive::kSyncThreads, "::" + b.function + "(", b.line});
      caught += !check_parity(c);
      hits += drop.hits();
    }
    const bool defensive = (b.function == "block_reduce" || b.function == "column_reduce") &&
                           first_line[b.function] == b.line;
    std::printf("[ sweep    ]   line %4u %-14s caught in %2d of %2d runs%s\n", b.line,
                b.function.c_str(), caught, static_cast<int>(runs.size()),
                caught == 0 ? " (redundant here)" : "");
    EXPECT_GT(hits, 0) << b.function << ":" << b.line << " was never reached";
    if (!defensive) {
      EXPECT_GT(caught, 0) << "dropping the barrier in " << b.function << " at line " << b.line
                           << " went unnoticed under every schedule";
    }
  }
}

}  // namespace
}  // namespace emulator
}  // namespace custom_bn
