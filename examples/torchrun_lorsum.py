"""LoRSum under DDP, exact: ``torchrun --nproc_per_node 2 examples/torchrun_lorsum.py``.

Each process trains on its shard of every batch; the optimizer averages the captured gradients
over the ranks (``process_group="auto"``), so every rank takes the step of one process on the
whole batch and the ranks stay identical. Runs on CPU (gloo) or one GPU per process (nccl).
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import lorsum


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu")
    try:
        torch.manual_seed(0)  # the same model on every rank (DDP also broadcasts rank 0's)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
        lorsum.add_lora(model, ["0", "2"], rank=4)
        # Build the optimizer (and its capture) before wrapping, then wrap in DDP as usual.
        optimizer = lorsum.create_optimizer(model, "lorsum", lr=0.2, num_iters=1, damping=1e-3)
        ddp = nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(1)
        teacher = torch.randn(32, 1, generator=g)
        for step in range(30):
            x = torch.randn(64, 32, generator=g)  # the global batch, then this rank's shard
            y = torch.tanh(x @ teacher)
            x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
            loss = (ddp(x) - y).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 10 == 0 or step == 29:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                if rank == 0:
                    print(f"step {step:2d}  loss {mean_loss.item() / world:.4f}")
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
        everyone = [torch.empty_like(checksum) for _ in range(world)]
        dist.all_gather(everyone, checksum)
        if rank == 0:
            same = all(torch.equal(c, everyone[0]) for c in everyone)
            print(f"ranks hold identical factors: {same}")
            mb = optimizer.reducer.bytes_reduced / 30 / 2**10
            print(f"optimizer all-reduce: {mb:.2f} KiB per step")
        optimizer.capture.remove()
        # Leave together, with nothing left holding the group: DDP's wrapper sits in reference
        # cycles, and a rank that tears down its connections while the other is still in its
        # last collective, or while a wrapper still holds them, can make gloo abort a rank.
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
