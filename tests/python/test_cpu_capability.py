"""One binary, the best code path for the running CPU: the CPU kernels are compiled for each
instruction-set level and chosen at run time as ATen chooses its own (ATEN_CPU_CAPABILITY lowers
the choice). Each level this CPU supports runs a parity check in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import custom_bn

LEVELS = ["DEFAULT", "AVX2", "AVX512"]

# Runs in a child process with ATEN_CPU_CAPABILITY set: reports the chosen level and the largest
# errors against float64 torch on the contiguous, channels-last and (N, C) paths (with masked
# tails: C = 33 and 7x7 planes), forward and backward, in every dtype.
CHILD = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F, custom_bn
    torch.manual_seed(0)
    errors = {}
    for shape, cl in [((4, 3, 33, 35), False), ((4, 3, 33, 35), True), ((4, 24, 7, 7), False),
                      ((4, 33, 9, 9), True), ((200, 37), False)]:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(shape, dtype=torch.float64) * 3 + 1
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x = x.to(dtype)
            dy = torch.randn_like(x)
            pdtype = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.rand(shape[1], dtype=pdtype) + 0.5
            b = torch.randn(shape[1], dtype=pdtype)
            def run(fn, x, dy, w, b):
                x = x.clone().requires_grad_()
                w = w.clone().requires_grad_()
                b = b.clone().requires_grad_()
                y = fn(x, None, None, w, b, training=True)
                return (y, *torch.autograd.grad(y, (x, w, b), dy))
            ours = run(custom_bn.functional.batch_norm, x, dy, w, b)
            ref = run(F.batch_norm, x.double(), dy.double(), w.double(), b.double())
            key = f"{shape}-{'cl' if cl else 'nc'}-{dtype}"
            errors[key] = max(((o.double() - r).abs().max() / r.abs().max().clamp_min(1)).item()
                              for o, r in zip(ours, ref))
    print(json.dumps({"chosen": custom_bn.build_info()["cpu_capability"],
                      "aten": torch.backends.cpu.get_cpu_capability(), "errors": errors}))
    """
)


def _machine_supports(level: str) -> bool:
    order = {name: i for i, name in enumerate(LEVELS)}
    return order[level] <= order.get(torch.backends.cpu.get_cpu_capability(), 0)


def test_build_info_reports_the_choice():
    info = custom_bn.build_info()
    assert info["cpu_capabilities_compiled"][0] == "DEFAULT"
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    if torch.backends.cpu.get_cpu_capability() in info["cpu_capabilities_compiled"]:
        assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_compiled_against"] == torch.__version__.split("+")[0]
    assert info["cuda"] == bool(info["cuda_architectures"])
    # The CUDA kernels are compiled for TORCH_CUDA_ARCH_LIST, by default sm_80 and sm_90.
    if info["cuda"]:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(";", " ").split()
        assert info["cuda_architectures"] == ["sm_" + a.replace(".", "") for a in archs]


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_runs_and_matches_torch(level):
    if level not in custom_bn.build_info()["cpu_capabilities_compiled"]:
        pytest.skip(f"{level} kernels are not compiled on this architecture")
    if not _machine_supports(level):
        pytest.skip(f"this CPU does not support {level}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level.lower())
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["chosen"] == level == report["aten"], report
    for key, err in report["errors"].items():
        limit = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3}.get(key.rsplit(".", 1)[1], 2e-2)
        assert err < limit, f"{level} {key}: relative error {err:.3g}"
