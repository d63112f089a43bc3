"""Builds custom_bn._C: the operator library (csrc/, kernels/) loaded into Python.

A CUDAExtension when nvcc is found (CUSTOM_BN_WITH_CUDA=0 forces a CPU-only build), else a
CppExtension. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". Install with
`pip install --no-build-isolation .` so the build uses the torch already installed.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("CUSTOM_BN_WITH_CUDA")
    if flag is not None:
        return flag.lower() not in ("0", "off", "false", "no", "")
    return cpp_extension.CUDA_HOME is not None


# at::vec compiles to plain scalar loops unless the AVX2 code path is enabled at build time;
# CMakeLists.txt applies the same flags (option WITH_AVX2).
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _want_avx2() -> bool:
    """AVX2/FMA/F16C kernels when the build machine has them (CUSTOM_BN_CPU_AVX2=0/1 decides)."""
    flag = os.environ.get("CUSTOM_BN_CPU_AVX2")
    if flag is not None:
        return flag.lower() not in ("0", "off", "false", "no", "")
    try:
        with open("/proc/cpuinfo") as f:
            cpu_flags = set(f.read().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= cpu_flags


def _cuda_include_dirs() -> list:
    """CUDA library headers that torch's CUDA headers include (cusparse.h, ...): the CUDA 13
    wheels ship them under site-packages/nvidia/cu13/include, not in the toolkit."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _sources(with_cuda: bool) -> list:
    # csrc/nn (the C++ torch::nn modules) is for LibTorch apps only: the CMake library has it.
    patterns = ["csrc/ops/*.cpp", "csrc/autograd/*.cpp", "csrc/python/*.cpp", "kernels/cpu/*.cpp"]
    if with_cuda:
        patterns.append("kernels/cuda/*.cu")
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return [os.path.relpath(f, ROOT) for f in found]


def _extension():
    with_cuda = _want_cuda()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cxx = ["-O3", "-std=c++20"] + (AVX2_FLAGS if _want_avx2() else [])
    kwargs = dict(
        name="custom_bn._C",
        sources=_sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")],
        define_macros=[("CUSTOM_BN_WITH_CUDA", "1" if with_cuda else "0")],
    )
    if with_cuda:
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _cuda_include_dirs()
        return cpp_extension.CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="custom_bn",
    version="0.1.0",
    description="Fused BatchNorm operators for PyTorch (CPU and CUDA) with C++ autograd",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
)
