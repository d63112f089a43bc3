"""Smoke test of an installed custom_bn (make test-install): run from outside the source tree,
it checks that the package came from the install location given on the command line, reports
its build, and agrees with torch.nn in float64 (forward, backward, running statistics)."""

import os
import sys

import torch

import custom_bn

where = os.path.realpath(sys.argv[1])
assert os.path.realpath(custom_bn.__file__).startswith(where), (custom_bn.__file__, where)
assert os.path.isfile(os.path.join(os.path.dirname(custom_bn.__file__), "py.typed"))
info = custom_bn.build_info()
print(f"custom_bn {custom_bn.__version__} from {os.path.dirname(custom_bn.__file__)}: {info}")
assert info["torch_compiled_against"] == torch.__version__.split("+")[0]
assert info["cuda"] == bool(info["cuda_architectures"])
expected_cuda = os.environ.get("EXPECT_CUDA_ARCHS")
if expected_cuda is not None:
    assert info["cuda_architectures"] == expected_cuda.split(), info

torch.manual_seed(0)
x = torch.randn(8, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
ours, theirs = custom_bn.BatchNorm2d(5).double(), torch.nn.BatchNorm2d(5).double()
results = []
for m in (ours, theirs):
    xi = x.clone().requires_grad_()
    y = m(xi)
    y.backward(torch.cos(y.detach()))
    results.append([y, xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var])
for a, b in zip(*results):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
print("installed custom_bn agrees with torch.nn")
