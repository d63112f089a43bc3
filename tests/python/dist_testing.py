"""Multi-process tests on torch.distributed with gloo on 127.0.0.1.

``run_distributed(worker, world_size, *args)`` spawns ``world_size`` processes, joins them into
one process group and runs ``worker(rank, world_size, *args)`` in each; it returns every rank's
result (a dict of tensors). It never hangs: the first rank that raises fails the call with its
traceback (the other ranks, possibly blocked in a collective, are killed), and so does a rank
that dies silently or a run that exceeds ``timeout`` seconds.
"""

import multiprocessing
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable, rank: int, world_size: int, port: int, results, args) -> None:
    try:
        torch.set_num_threads(1)  # the ranks share this machine's cores
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        out = worker(rank, world_size, *args)
        # Plain arrays: a tensor would travel through shared memory that dies with this process.
        results.put((rank, True, {k: v.detach().cpu().numpy() for k, v in out.items()}))
    except BaseException:  # noqa: BLE001  (everything is reported to the parent)
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    worker: Callable[..., Dict[str, torch.Tensor]], world_size: int, *args: Any, timeout: float = 180
) -> List[Dict[str, torch.Tensor]]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(worker, rank, world_size, port, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: Dict[int, Dict[str, torch.Tensor]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed run did not finish within {timeout} s; ranks done: {sorted(done)}"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without reporting (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})")
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            done[rank] = {k: torch.from_numpy(v) for k, v in payload.items()}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    return [done[r] for r in range(world_size)]
