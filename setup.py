"""Builds custom_bn._C: the operator library (csrc/, kernels/) loaded into Python.

A CUDAExtension when nvcc is found (CUSTOM_BN_WITH_CUDA=0 forces a CPU-only build), else a
CppExtension. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". Install with
`pip install --no-build-isolation .` so the build uses the torch already installed.
"""
import fnmatch
import glob
import os
import platform
import shutil
import subprocess
from typing import Optional

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_cuda_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and bool(
        glob.glob(os.path.join(path, "lib*", "libcudart.so*"))
    )


def _nvcc_toolkit(nvcc: str) -> Optional[str]:
    """The toolkit an nvcc belongs to, as nvcc itself reports it (its ``_HERE_`` directory in a
    dry run), so a wrapper script on PATH that execs the real nvcc is followed."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(os.path.realpath(line.split("=", 1)[1].strip()))
    return None


def _find_cuda_home() -> Optional[str]:
    """The CUDA toolkit: CUDA_HOME or CUDA_PATH when set; else the toolkit of the nvcc on PATH
    or of /usr/local/cuda*/bin/nvcc, whichever first is a real toolkit (headers and cudart).
    torch.utils.cpp_extension on its own takes the parent of the nvcc found on PATH, which is
    wrong when that nvcc is a wrapper outside the toolkit (the link then fails with "cannot find
    -lcudart")."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = [shutil.which("nvcc")] + sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    for nvcc in filter(None, candidates):
        toolkit = _nvcc_toolkit(nvcc)
        if toolkit and _is_cuda_toolkit(toolkit):
            return toolkit
    return None


if os.environ.get("CUSTOM_BN_WITH_CUDA", "1").lower() not in ("0", "off", "false", "no", ""):
    _cuda_home = _find_cuda_home()
    if _cuda_home:
        os.environ["CUDA_HOME"] = _cuda_home  # read by cpp_extension when it is imported

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is settled)


def _want_cuda() -> bool:
    flag = os.environ.get("CUSTOM_BN_WITH_CUDA")
    if flag is not None:
        return flag.lower() not in ("0", "off", "false", "no", "")
    return cpp_extension.CUDA_HOME is not None


# The CPU kernels (kernels/cpu/*_kernel.cpp) are compiled once per instruction-set level listed
# in kernels/cpu/cpu_capabilities.txt, and the library picks one at run time; CMakeLists.txt
# reads the same file.
PER_ISA_PATTERN = "kernels/cpu/*_kernel.cpp"


def _cpu_capabilities() -> list:
    """[(level, flags)]: the portable level, plus the x86-64 levels on x86-64."""
    levels = []
    with open(os.path.join(ROOT, "kernels", "cpu", "cpu_capabilities.txt")) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                name, *flags = line.split()
                levels.append((name, flags))
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return levels if x86 else levels[:1]


def _torch_openmp_library() -> list:
    """Link arguments for the OpenMP runtime libtorch itself uses, so that one OpenMP thread
    pool serves torch and custom_bn: torch's own libgomp (pip wheels ship it in torch/lib), else
    the one that importing torch loaded, else the compiler's (-fopenmp)."""
    import torch

    found = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    if not found:
        try:
            with open("/proc/self/maps") as maps:
                found = sorted({line.split()[-1] for line in maps if "/libgomp" in line})
        except OSError:
            pass
    if found:
        return [found[0]]
    print("custom_bn: libtorch's OpenMP runtime not found; linking the compiler's (-fopenmp)")
    return ["-fopenmp"]


class BuildExtension(cpp_extension.BuildExtension):
    """Compiles the per-ISA kernel sources once per level (each into its own folder, with its
    own flags and CPU_CAPABILITY) and links those objects into the extension."""

    def finalize_options(self):
        super().finalize_options()
        # One object folder for every way of building (make's in-place build, pip install, and
        # pip install -e, which would otherwise compile everything in a fresh temporary
        # folder): ninja then recompiles only what changed.
        self.build_temp = os.path.join(ROOT, "build", "temp")

    def build_extension(self, ext):
        per_isa = [s for s in ext.sources if fnmatch.fnmatch(s, PER_ISA_PATTERN)]
        ext.sources = [s for s in ext.sources if s not in per_isa]
        for level, flags in _cpu_capabilities():
            args = ext.extra_compile_args
            args = dict(args, cxx=args["cxx"] + flags) if isinstance(args, dict) else args + flags
            ext.extra_objects += self.compiler.compile(
                per_isa,
                output_dir=os.path.join(self.build_temp, "cpu_" + level),
                macros=ext.define_macros + [("CPU_CAPABILITY", level), ("CPU_CAPABILITY_" + level, None)],
                include_dirs=ext.include_dirs,
                extra_postargs=args,
            )
        super().build_extension(ext)


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


def _cuda_arch_macro() -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.0 9.0+PTX") as build_info's CUSTOM_BN_CUDA_ARCHS
    (80_90, 80_90+PTX; nvcc would split a comma). Only the C++ compiler gets it."""
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()
    return "-DCUSTOM_BN_CUDA_ARCHS=" + "_".join(a.replace(".", "") for a in archs)


def _extension():
    with_cuda = _want_cuda()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # -fopenmp: at::parallel_for is ATen's inline OpenMP code, serial without it.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    x86 = len(_cpu_capabilities()) > 1
    kwargs = dict(
        name="custom_bn._C",
        sources=_sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")],
        define_macros=[("CUSTOM_BN_WITH_CUDA", "1" if with_cuda else "0"),
                       ("CUSTOM_BN_CPU_X86", "1" if x86 else "0")],
        extra_link_args=_torch_openmp_library(),
        # Every file of the library: setuptools relinks only when one of these is newer than the
        # extension (ninja then recompiles just what changed).
        depends=["setup.py"] + [os.path.relpath(f, ROOT) for d in ("csrc", "kernels")
                 for f in glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True) if os.path.isfile(f)],
    )
    if with_cuda:
        cxx.append(_cuda_arch_macro())
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
    package_data={"custom_bn": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
)
