"""``custom_bn.build_info()``: what this build contains and which CPU code path it runs."""

import os
from typing import Any, Dict, List

import torch

from . import _C


def _openmp_runtimes() -> List[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere). One is
    right: custom_bn links libtorch's own, so both share torch's intra-op thread pool."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    except OSError:
        return []
    return sorted(os.path.realpath(p) for p in paths)


def build_info() -> Dict[str, Any]:
    """Returns a dict describing this build of custom_bn:

    * ``cpu_capability``: the instruction-set level of the CPU kernels in use, ``"DEFAULT"``,
      ``"AVX2"`` or ``"AVX512"``. It follows ATen's choice for the running CPU
      (``torch.backends.cpu.get_cpu_capability()``), so the environment variable
      ``ATEN_CPU_CAPABILITY=default|avx2|avx512``, set before the first kernel call, selects a
      lower one.
    * ``cpu_capabilities_compiled``: every level the CPU kernels were compiled for.
    * ``openmp``: whether the CPU kernels run on torch's intra-op thread pool
      (``torch.set_num_threads``); ``num_threads``: its current size.
    * ``openmp_runtimes``: the OpenMP libraries loaded in this process (one is expected).
    * ``cuda``: whether the CUDA kernels were compiled in; ``cuda_architectures``: the GPU
      architectures they were compiled for (``["sm_80", "sm_90"]``, empty without CUDA).
    * ``version``: custom_bn's version; ``torch``: the torch running now;
      ``torch_compiled_against``: the LibTorch whose headers the library was compiled with
      (the two must be the same release).
    """
    from . import __version__

    info = dict(_C._build_info())
    info.update(
        num_threads=torch.get_num_threads(),
        openmp_runtimes=_openmp_runtimes(),
        version=__version__,
        torch=torch.__version__,
    )
    return info
