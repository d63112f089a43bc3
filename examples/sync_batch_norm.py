"""custom_bn.SyncBatchNorm under torchrun: each process normalizes its share of a batch with the
statistics of the whole batch, and checks that against one process doing the whole batch.

    torchrun --standalone --nproc-per-node=2 examples/sync_batch_norm.py

gloo on the CPU, NCCL when every process has a GPU (see the README for several machines).
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import custom_bn


def main() -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    # The same global batch on every process (uneven shares: rank r gets r + 2 samples).
    g = torch.Generator().manual_seed(0)
    sizes = [r + 2 for r in range(world)]
    x = torch.randn(sum(sizes), 8, 6, 6, generator=g, dtype=torch.float64).to(device)
    start = sum(sizes[:rank])
    mine = x[start:start + sizes[rank]].clone().requires_grad_()

    bn = custom_bn.SyncBatchNorm(8, activation="relu", device=device, dtype=torch.float64)
    out = bn(mine)
    out.sum().backward()

    # One process over the whole batch.
    whole = x.clone().requires_grad_()
    ref = F.relu(F.batch_norm(whole, None, None, training=True))
    ref.sum().backward()
    torch.testing.assert_close(out, ref[start:start + sizes[rank]])
    torch.testing.assert_close(mine.grad, whole.grad[start:start + sizes[rank]])
    print(f"rank {rank}/{world}: SyncBatchNorm matches one process on the global batch", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
