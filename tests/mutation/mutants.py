"""Deliberate bugs that the test suite must catch (run by tests/mutation/run.py).

Each mutant replaces one exact snippet of one source file (the snippet must occur exactly once,
so the list fails loudly instead of rotting when the code changes) and names the test commands
that should catch it, tried in order until one fails:

  "pytest <args>"    pytest -x -q <args>, run in the scratch copy (PYTHONPATH=<copy>/python)
                     against a CPU-only build of custom_bn._C;
  "emulator <args>"  the emulated CUDA kernel suite (custom_bn_emulator_tests, CMake
                     WITH_CUDA=OFF), which compares kernels/cuda/*.cuh run on the CPU with the
                     CPU kernels and ATen.

Snippets are matched character for character, indentation and line breaks included.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    description: str
    tests: Tuple[str, ...]  # commands, tried in order; the first that fails catches it


PARITY = "pytest tests/python/test_parity.py"
CPU_PATHS = "pytest tests/python/test_cpu_paths.py"
AUTOGRAD = "pytest tests/python/test_autograd.py"
MODULES = "pytest tests/python/test_modules.py"
EMULATOR = "emulator"

CUH = "kernels/cuda/batch_norm_kernel.cuh"
LAUNCH = "kernels/cuda/batch_norm_launch.h"
MATH = "kernels/common/batch_norm_math.h"
KERNEL = "kernels/cpu/batch_norm_kernel.cpp"
OPERATOR = "kernels/cpu/batch_norm_cpu.cpp"
AUTOGRAD_CPP = "csrc/autograd/batch_norm.cpp"
ACTIVATION_VEC = "kernels/cpu/activation_vec.h"
CONTIGUOUS = "kernels/cpu/contiguous.h"
CHANNELS_LAST = "kernels/cpu/channels_last.h"
FUSED = "pytest tests/python/test_fused.py"
TRANSFORMS_PY = "python/custom_bn/_transforms.py"
TRANSFORMS = "pytest tests/python/test_transforms.py"
INPLACE = "pytest tests/python/test_inplace.py"

MUTANTS = [
    # ---------------------------------------------------------------- CUDA kernel bodies
    Mutant(
        "cuda-dx-drop-kc",
        CUH,
        "static_cast<scalar_t>(dz * k.k_dy + source.centred(v) * k.k_x + k.k_c);",
        "static_cast<scalar_t>(dz * k.k_dy + source.centred(v) * k.k_x);",
        "CUDA backward_element: grad_input without the -w*invstd*mean(dy) term",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-contiguous-nc-swapped",
        CUH,
        "const index_t base = (n * C + c) * HW;",
        "const index_t base = (c * N + n) * HW;",
        "CUDA for_each_contiguous: (N, C) strides swapped, sample n of channel c at (c*N + n)*HW",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-cl-partial-index",
        CUH,
        "v = Op::combine(v, Op::load(partial, slots, int64_t(j) * C + c));",
        "v = Op::combine(v, Op::load(partial, slots, int64_t(c) * splits + j));",
        "CUDA reduce_channels_last: last block reads the partials in the contiguous kernels' "
        "order (c*splits + j) instead of the order they were written (j*C + c)",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-running-var-stride",
        CUH,
        "param_t& rv = running_var[c * running_var_stride];",
        "param_t& rv = running_var[c];",
        "CUDA collect_stats finalize: strided running_var treated as contiguous",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-nan-clamped",
        CUH,
        "const acc_t var = s.m2 / s.count;",
        "const acc_t var = (s.m2 > acc_t(0) ? s.m2 : acc_t(0)) / s.count;",
        "CUDA collect_stats finalize: max(0, M2) clamp turns a NaN variance into 0",
        (EMULATOR,),
    ),
    # ---------------------------------------------------------------- shared math (CPU + CUDA)
    Mutant(
        "common-dx-drop-kx",
        MATH,
        "return {k_dy, k_x, -k_dy * sum_dy * inv_n, mean};",
        "return {k_dy, acc_t(0), -k_dy * sum_dy * inv_n, mean};",
        "fold_backward: training grad_input without the (x - mean)*sum(dy*(x - mean)) term",
        (PARITY, AUTOGRAD, EMULATOR),
    ),
    Mutant(
        "common-momentum-reversed",
        MATH,
        "return running * (acc_t(1) - momentum) + batch * momentum;",
        "return running * momentum + batch * (acc_t(1) - momentum);",
        "running_update: momentum applied the wrong way round, r = m*r + (1-m)*batch",
        (PARITY, MODULES, EMULATOR),
    ),
    Mutant(
        "welford-merge-drop-cross-term",
        "kernels/common/welford.h",
        "r.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;",
        "r.m2 = a.m2 + b.m2;",
        "welford_merge (Chan): M2 of the merge without the delta^2*na*nb/n between-parts term",
        (PARITY, CPU_PATHS, EMULATOR),
    ),
    # ---------------------------------------------------------------- CPU kernels
    Mutant(
        "cpu-fused-dx-drop-kc",
        KERNEL,
        "affine_run(dx + p, src.dy + p, a.training ? src.x + p : nullptr, k.k_dy, k.k_c, k.mean,",
        "affine_run(dx + p, src.dy + p, a.training ? src.x + p : nullptr, k.k_dy, 0 * k.k_c, k.mean,",
        "CPU whole-channel backward: grad_input without the -w*invstd*mean(dy) term",
        (CPU_PATHS,),
    ),
    Mutant(
        "cpu-running-var-stride",
        OPERATOR,
        "const int64_t sm = running_mean.stride(0), sv = running_var.stride(0);",
        "const int64_t sm = running_mean.stride(0), sv = 1;",
        "CPU running-stat update: strided running_var treated as contiguous",
        (CPU_PATHS, PARITY),
    ),
    Mutant(
        "cpu-weight-stride",
        OPERATOR,
        "if (t->scalar_type() == acc && t->is_contiguous()) return *t;",
        "if (t->scalar_type() == acc) return *t;",
        "CPU channel_values: a strided weight/bias/running stat passed on as if contiguous",
        (CPU_PATHS, PARITY),
    ),
    Mutant(
        "cpu-grad-chunk-end-off-by-one",
        "kernels/cpu/contiguous.h",
        "const int64_t end = std::min(n, off + kChunk);",
        "const int64_t end = std::min(n, off + kChunk - 1);",
        "CPU run_grad_sums: each full 4096-value chunk ends one early (runs with H*W > chunk "
        "lose a value per chunk)",
        (CPU_PATHS, PARITY),
    ),
    Mutant(
        "cpu-piece-offset-from-task",
        "kernels/cpu/contiguous.h",
        "if (len > 0) f(t, run * g.hw + off, len, channel);",
        "if (len > 0) f(t, t * p.length, len, channel);",
        "CPU for_each_piece: piece offset computed as task*length (wrong when H*W is not a "
        "multiple of the piece length)",
        (CPU_PATHS, PARITY),
    ),
    Mutant(
        "cpu-cl-tile-channel-offset",
        "kernels/cpu/channels_last.h",
        "src.load(i * g.c + c0 + c, c0 + c, count, gv, xv);",
        "src.load(i * g.c + c, c0 + c, count, gv, xv);",
        "CPU tile_grad_sums: dy read without the channel block's offset c0 (C > 1024)",
        (CPU_PATHS, PARITY),
    ),
    Mutant(
        "cpu-running-var-biased",
        OPERATOR,
        "const acc_t unbiased = acc_t(unbiased_variance(var[c], count));",
        "const acc_t unbiased = acc_t(var[c]);",
        "CPU running-stat update: biased batch variance instead of n/(n-1) * var",
        (PARITY, MODULES),
    ),
    Mutant(
        "cpu-eps-outside-sqrt",
        KERNEL,
        "static_cast<acc_t*>(a.invstd)[c] = acc_t(1.0 / std::sqrt(var + a.eps));",
        "static_cast<acc_t*>(a.invstd)[c] = acc_t(1.0 / (std::sqrt(var) + a.eps));",
        "CPU training invstd = 1/(sqrt(var) + eps) instead of 1/sqrt(var + eps)",
        (PARITY, CPU_PATHS),
    ),
    Mutant(
        "cpu-eval-uses-batch-stats",
        OPERATOR,
        "save_invstd.data_ptr(), var.data(), training, eps,",
        "save_invstd.data_ptr(), var.data(), true, eps,",
        "CPU forward: evaluation mode normalizes with the batch statistics",
        (PARITY, MODULES),
    ),
    Mutant(
        "cpu-nan-clamped",
        KERNEL,
        "const double var = s.m2 < 0 ? 0.0 : s.m2 / s.count;",
        "const double var = std::max(0.0, s.m2) / s.count;",
        "CPU store_batch_stats: std::max(0, M2) clamp turns a NaN variance into 0",
        (CPU_PATHS,),
    ),
    # ---------------------------------------------------------------- double backward
    Mutant(
        "autograd-dx-drop-mean-dy",
        AUTOGRAD_CPP,
        "g = dy - dy.mean(reduce_dims, true) - xhat * (dy * xhat).mean(reduce_dims, true);",
        "g = dy - xhat * (dy * xhat).mean(reduce_dims, true);",
        "differentiable backward (create_graph): grad_input without the -mean(dy) term",
        (AUTOGRAD,),
    ),
    Mutant(
        "autograd-invstd-detached",
        AUTOGRAD_CPP,
        "invstd = (var + eps).rsqrt();",
        "invstd = save_invstd.reshape(channel_shape);",
        "differentiable backward: training invstd taken from save_invstd (a constant), so "
        "second-order terms through the variance are lost",
        (AUTOGRAD,),
    ),
    # ---------------------------------------------------- torch.func path (Python face)
    Mutant(
        "jvp-drop-mean-dx",
        TRANSFORMS_PY,
        "dx = dx - dx.mean(reduce, keepdim=True) - xhat",
        "dx = dx - xhat",
        "forward-mode derivative in training without the -mean(dx) term",
        (TRANSFORMS,),
    ),
    Mutant(
        "vmap-running-stat-writeback-dropped",
        TRANSFORMS_PY,
        "                    target.copy_(folded.view(target.shape))",
        "                    pass",
        "vmap batching rule: a running statistic folded into a copy is not written back",
        (TRANSFORMS,),
    ),
    Mutant(
        "vmap-backward-param-grads-transposed",
        TRANSFORMS_PY,
        "g.view(size, -1) if wanted else g for g, wanted in zip(grads[1:], output_mask[1:])",
        "g.view(-1, size).t() if wanted else g for g, wanted in zip(grads[1:], output_mask[1:])",
        "backward batching rule: grad_weight/grad_bias unfolded as (C, B) instead of (B, C)",
        (TRANSFORMS,),
    ),
    Mutant(
        "backward-ignores-tangents",
        AUTOGRAD_CPP,
        "  return (at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();",
        "  return at::GradMode::is_enabled() && t.requires_grad();",
        "backward Autograd kernel: the fused kernel under forward AD (jacfwd over jacrev) "
        "silently drops tangents",
        (TRANSFORMS,),
    ),
    # ---------------------------------------------------- fused epilogue (CPU, autograd)
    Mutant(
        "fused-leaky-relu-grad-swapped",
        ACTIVATION_VEC,
        "return Vec::blendv(dy * Vec(param), dy, z > zero);",
        "return Vec::blendv(dy, dy * Vec(param), z > zero);",
        "fused backward: leaky_relu's derivative takes the slope on the positive side",
        (FUSED,),
    ),
    Mutant(
        "fused-backward-z-without-residual-contiguous",
        CONTIGUOUS,
        "      t = {rv.first + beta, rv.second + beta};",
        "      t = {beta, beta};",
        "fused backward (contiguous): the pre-activation is recomputed without the residual",
        (FUSED,),
    ),
    Mutant(
        "fused-forward-drops-residual-channels-last",
        CHANNELS_LAST,
        "        t0 = y.first + t0;",
        "        t0 = t0;",
        "fused forward (channels-last): the first vector of each step ignores the residual",
        (FUSED,),
    ),
    Mutant(
        "fused-backward-z-without-bias",
        KERNEL,
        "                         : fold_affine(static_cast<const acc_t*>(a.mean)[c], invstd, wc, bc);",
        "                         : fold_affine(static_cast<const acc_t*>(a.mean)[c], invstd, wc, 0);",
        "fused backward: the recomputed pre-activation leaves out the bias",
        (FUSED,),
    ),
    Mutant(
        "fused-double-backward-silu-first-term-only",
        AUTOGRAD_CPP,
        "      return dy * s * (1 + z * (1 - s));",
        "      return dy * s;",
        "differentiable fused backward: silu's derivative without its z * s * (1 - s) term",
        (FUSED,),
    ),
    # ------------------------------------------------------ in-place mode (CPU, autograd)
    Mutant(
        "inplace-inverse-affine-drops-bias",
        MATH,
        "  return {alpha, -b * alpha};",
        "  return {alpha, acc_t(0) * b};",
        "in-place backward: x - mean recovered from z without subtracting the bias",
        (INPLACE,),
    ),
    Mutant(
        "cuda-inplace-centred-drops-beta",
        CUH,
        "      return activation_inverse(kAct, activation_param, v) * k.alpha + k.beta;",
        "      return activation_inverse(kAct, activation_param, v) * k.alpha;",
        "CUDA in-place backward: x - mean recovered without the -bias/(w invstd) term",
        (EMULATOR,),
    ),
    Mutant(
        "inplace-leaky-inverse-ignores-slope",
        ACTIVATION_VEC,
        "      return Vec::blendv(y / Vec(param), y, y > zero);",
        "      return Vec::blendv(y, y, y > zero);",
        "in-place backward: leaky_relu's inverse forgets to divide the negative side by the slope",
        (INPLACE,),
    ),
    Mutant(
        "inplace-uncentred-mean",
        KERNEL,
        "    centred.mean = zero_mean.data();",
        "    centred.mean = a.mean;",
        "in-place backward: the batch mean subtracted again from the already centred input",
        (INPLACE,),
    ),
    Mutant(
        "inplace-no-version-bump",
        AUTOGRAD_CPP,
        "    torch::autograd::impl::bump_version(output);\n",
        "",
        "in-place autograd: the overwritten input's version counter is not moved",
        (INPLACE,),
    ),
    # ------------------------------------------------ SyncBatchNorm's pieces (CUDA, emulated)
    Mutant(
        "cuda-sync-stats-unbiased-var",
        CUH,
        "    if (save_var != nullptr) save_var[c] = var;",
        "    if (save_var != nullptr) save_var[c] = unbiased_variance(var, s.count);",
        "CUDA batch_norm_stats: the unbiased variance where SyncBatchNorm merges biased ones",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-sync-elemt-local-count",
        LAUNCH,
        "                          split.given != nullptr ? split.count : g.count(),",
        "                          g.count(),",
        "CUDA batch_norm_backward_elemt: this batch's count in place of the whole batch's",
        (EMULATOR,),
    ),
    Mutant(
        "cuda-sync-elemt-reduces-again",
        LAUNCH,
        "  if (a.sum_dy != nullptr && !a.sums_given) {",
        "  if (a.sum_dy != nullptr) {",
        "CUDA batch_norm_backward_elemt: the reduction runs anyway and overwrites the whole "
        "batch's sums with this batch's",
        (EMULATOR,),
    ),
]
