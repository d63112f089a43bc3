"""Per-kernel CUDA resource report of kernels/cuda/batch_norm_kernel.cu, without a GPU.

Compiles the kernels per architecture with the project's nvcc flags and `-Xptxas -v` (one nvcc
at a time, device code only: `-cubin`), then tabulates for every __global__ instantiation the
registers, stack, spills and shared memory, and the theoretical occupancy at the launchers'
default block (kernels/cuda/launch_config.h) under the documented per-SM limits of A100
(sm_80) and H100 (sm_90), computed as cuda_occupancy.h does. Needs nvcc and c++filt.

    .venv/bin/python benchmarks/cuda_resources.py [--out docs/cuda_resources.md] [--nvcc PATH]
"""
import argparse
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "kernels", "cuda")
SOURCE = os.path.join(CUDA_DIR, "batch_norm_kernel.cu")


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of one architecture (CUDA programming guide, compute capability tables)."""

    arch: str
    gpu: str
    smem_per_sm: int  # largest shared-memory carveout, bytes
    regs_per_sm: int = 65536
    max_threads: int = 2048
    max_blocks: int = 32
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split over the 4 warp schedulers
    smem_unit: int = 128
    smem_reserved_per_block: int = 1024  # kept by the driver for every resident block


ARCHS = {"80": SmLimits("sm_80", "A100", smem_per_sm=164 * 1024),
         "90": SmLimits("sm_90", "H100", smem_per_sm=228 * 1024)}
SHORT_NAMES = {"float": "f32", "double": "f64", "c10::Half": "f16", "c10::BFloat16": "bf16",
               "int": "i32", "long": "i64", "true": "train", "false": "eval"}
SORT_ORDER = list(SHORT_NAMES.values())
PREAMBLE = """# CUDA resource usage of the batch-norm kernels

Registers, local memory and shared memory of every `__global__` instantiation in
`kernels/cuda/batch_norm_kernel.cu` as `ptxas -v` reports them for each target architecture,
with the theoretical occupancy at the launchers' default block of {threads} threads
(`Tuning::threads` in `kernels/cuda/launch_config.h`; small inputs get smaller blocks).
Dynamic shared memory is what the reductions ask for at that block: a Welford triple or a
gradient pair per warp (contiguous) or per thread (channels-last). Occupancy is the resident
warps' share of the SM's 64; below 100% the limiting resource is named. Regenerate with
`.venv/bin/python benchmarks/cuda_resources.py --out docs/cuda_resources.md` (no GPU needed;
this run: nvcc {nvcc}, torch {torch}).

**Conclusion:** {conclusion}

"""


@dataclass
class Kernel:
    """One kernel instantiation's resources, as ptxas reports them."""

    name: str  # e.g. transform_contiguous
    args: dict[str, str]  # template parameter name (scalar, param, acc, ...) -> short value
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int
    smem_static: int
    smem_dynamic: int = 0



def round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def occupancy(k: Kernel, threads: int, sm: SmLimits) -> tuple[float, str]:
    """Theoretical occupancy (% of the SM's warp slots) and what limits it."""
    warps = (threads + 31) // 32
    regs_per_warp = round_up(max(k.regs, 1) * 32, sm.reg_unit)
    warps_by_regs = sm.regs_per_sm // sm.sub_partitions // regs_per_warp * sm.sub_partitions
    smem = round_up(k.smem_static + k.smem_dynamic + sm.smem_reserved_per_block, sm.smem_unit)
    limits = {"threads": sm.max_threads // (warps * 32), "blocks/SM": sm.max_blocks,
              "registers": warps_by_regs // warps, "shared memory": sm.smem_per_sm // smem}
    blocks = min(limits.values())
    limiter = next(name for name, n in limits.items() if n == blocks)
    return 100.0 * blocks * warps / (sm.max_threads // 32), f"{limiter}: {blocks} blocks/SM"


def launch_facts() -> tuple[int, dict[str, int]]:
    """Default threads per block, and how many accumulators per reduction entry the kernels
    with dynamic shared memory keep (reduce_launch's `fields`), read from launch_config.h."""
    text = Path(CUDA_DIR, "launch_config.h").read_text()
    threads = int(re.search(r"int threads = (\d+);", text).group(1))
    fields = {kernel: int(re.search(kernel + r"_launch\(.*?reduce_launch\(g, (\d+)", text,
                                    re.S).group(1))
              for kernel in ("collect_stats", "backward_reduce")}
    return threads, fields


def dynamic_smem(k: Kernel, threads: int, fields: dict[str, int]) -> int:
    """Bytes of dynamic shared memory (reduce_shared_bytes) a launch of k asks for."""
    base = next((f for f in fields if k.name.startswith(f)), None)
    if base is None:
        return 0
    entries = threads // 32 if k.name.endswith("contiguous") else threads  # per warp / thread
    return entries * fields[base] * {"f32": 4, "f64": 8}[k.args["acc"]]


def template_params() -> dict[str, list[str]]:
    """Each kernel's template parameter names (scalar_t -> scalar, kTraining -> training), in
    the order the kernel bodies define the kernels."""
    found = re.findall(r"template <([^>]*)>\s*CBN_KERNEL void batch_norm_(\w+)_kernel\(",
                       Path(CUDA_DIR, "batch_norm_kernel.cuh").read_text())
    return {name: [p.split()[-1].removesuffix("_t").lstrip("k").lower()
                   for p in params.split(",")] for params, name in found}


def torch_flags() -> tuple[list[str], str]:
    """Torch's part of the compile line (ABI, include dirs) and torch's version."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime"
    import torch
    from torch.utils import cpp_extension

    site = os.path.dirname(os.path.dirname(torch.__file__))
    wheels = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return [abi] + ["-I" + d for d in cpp_extension.include_paths() + wheels], torch.__version__


def nvcc_command(nvcc: str, arch: str, torch_args: list[str], out: str) -> list[str]:
    """setup.py's nvcc flags plus the ones cpp_extension adds, for one architecture."""
    return [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "-DCUSTOM_BN_WITH_CUDA=1", "-I" + os.path.join(ROOT, "csrc"),
            "-I" + os.path.join(ROOT, "kernels"), *torch_args,
            "-Xptxas", "-v", "-o", out, SOURCE]


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        sys.exit("cuda_resources: needs c++filt or cu++filt to demangle kernel names")
    run = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True)
    return run.stdout.splitlines()


PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\S+)' for 'sm_\d+'\n.*Function properties for \S+\n"
    r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r".*Used (\d+) registers(.*)\n")


def parse_ptxas(log: str, params: dict[str, list[str]]) -> list[Kernel]:
    """The kernels of one `-Xptxas -v` log, named by their demangled template arguments."""
    entries = PTXAS_ENTRY.findall(log)
    if not entries:
        sys.exit("cuda_resources: no kernel found in the ptxas output:\n" + log)
    kernels = []
    for (_, stack, stores, loads, regs, rest), pretty in zip(
            entries, demangle([e[0] for e in entries])):
        m = re.search(r"batch_norm_(\w+)_kernel<(.*?)>\(", pretty)
        values = [SHORT_NAMES.get(v.strip(), v.strip()) for v in m.group(2).split(",")]
        smem = re.search(r"(\d+) bytes smem", rest)
        kernels.append(Kernel(m.group(1), dict(zip(params[m.group(1)], values)), int(regs),
                              int(stack), int(stores), int(loads), int(smem[1]) if smem else 0))
    return kernels


def instantiation(k: Kernel) -> str:
    suffix = {"scalar": " in", "param": " params", "acc": " acc", "index": " index"}
    return ", ".join(value + suffix.get(name, "") for name, value in k.args.items()
                     if name != "training") + (f", {k.args['training']}"
                                               if "training" in k.args else "")


def report(sm: SmLimits, kernels: list[Kernel], threads: int,
           order: list[str]) -> tuple[list[str], dict[bool, tuple]]:
    """Markdown table of one architecture, and its lowest (occupancy, kernel, limiter) over
    all kernels (key False) and over the common ones: 32-bit index, no float64 (key True)."""
    kernels.sort(key=lambda k: (order.index(k.name),
                                [SORT_ORDER.index(v) for v in k.args.values()]))
    lines = [f"## {sm.arch} ({sm.gpu}: {sm.regs_per_sm} registers, {sm.max_threads} threads, "
             f"{sm.max_blocks} blocks, {sm.smem_per_sm // 1024} KiB shared memory per SM)", "",
             "| kernel | instantiation | regs | stack B | spill st/ld B | smem static B "
             "| smem dynamic B | occupancy % |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    lowest: dict[bool, tuple] = {}
    for k in kernels:
        occ, limiter = occupancy(k, threads, sm)
        note = "" if occ >= 100 else f" ({limiter.split(':')[0]})"
        lines.append(f"| {k.name} | {instantiation(k)} | {k.regs} | {k.stack} | "
                     f"{k.spill_stores}/{k.spill_loads} | {k.smem_static} | {k.smem_dynamic} "
                     f"| {occ:g}{note} |")
        common = k.args.get("index") != "i64" and "f64" not in k.args.values()
        for key in {False, common}:
            if occ < lowest.get(key, (101.0,))[0]:
                lowest[key] = (occ, f"{k.name} [{instantiation(k)}], {k.regs} registers",
                               limiter)
    return lines + [""], lowest


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    return re.search(r"release [\d.]+, V[\d.]+", out.stdout).group(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="markdown file to write (printed either way)")
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help="compute capability without the dot; repeatable (default: all)")
    args = parser.parse_args()
    threads, fields = launch_facts()
    params = template_params()
    torch_args, torch_version = torch_flags()

    sections, summary, spills, stack = [], [], 0, 0
    with tempfile.TemporaryDirectory(prefix="cuda_resources_") as tmp:
        for arch in args.arch or sorted(ARCHS):
            print(f"cuda_resources: compiling for sm_{arch} ...", file=sys.stderr, flush=True)
            command = nvcc_command(args.nvcc, arch, torch_args, os.path.join(tmp, "k.cubin"))
            run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                sys.exit(f"cuda_resources: nvcc failed for sm_{arch}:\n{run.stdout}{run.stderr}")
            kernels = parse_ptxas(run.stdout + run.stderr, params)
            for k in kernels:
                k.smem_dynamic = dynamic_smem(k, threads, fields)
                spills += k.spill_stores + k.spill_loads
                stack += k.stack
            lines, lowest = report(ARCHS[arch], kernels, threads, list(params))
            sections += lines
            low = [f"{occ:g}% {what} in {where} ({limiter})" for what, (occ, where, limiter)
                   in (("overall", lowest[False]), ("with i32 index, no f64", lowest[True]))]
            summary.append(f"- sm_{arch}: {len(kernels)} kernels, {max(k.regs for k in kernels)} "
                           f"registers at most; lowest occupancy {low[0]}; {low[1]}.")

    spilled = (f"{spills} B of spills" if spills else "no spills") + (
        f" and {stack} B of stack frames in all" if stack else " and no stack frames")
    text = PREAMBLE.format(threads=threads, nvcc=nvcc_version(args.nvcc), torch=torch_version,
                           conclusion=f"{spilled}.\n" + "\n".join(summary)) + "\n".join(sections)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
