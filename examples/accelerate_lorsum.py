"""LoRSum with 🤗 Accelerate, exact under data parallelism.

On GPUs: ``accelerate launch --multi_gpu --num_processes 2 examples/accelerate_lorsum.py``.
On CPUs: ``torchrun --nproc_per_node 2 examples/accelerate_lorsum.py`` (``accelerate launch``
starts several CPU processes only through MPI; under torchrun, ``Accelerator`` finds the
process group itself and uses gloo). Also runs as one process: ``python examples/...``.

Build the optimizer (and its gradient capture) on the unwrapped model, then hand both to
``accelerator.prepare``: the capture's hooks stay on the model's own LoRA layers inside the DDP
wrapper, and the optimizer averages the captured gradients over the ranks, so every rank takes
the step one process would take on the whole batch.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorsum


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPUs, NCCL on GPUs
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    lorsum.add_lora(model, ["0", "2"], rank=4)
    optimizer = lorsum.create_optimizer(model, "lorsum", lr=0.2, num_iters=1, damping=1e-3)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(30 * 64, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g))
    # 64 examples per step in all, split over the processes by the prepared loader.
    loader = DataLoader(TensorDataset(x, y), batch_size=64 // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for step, (xb, yb) in enumerate(loader):
        loss = (model(xb) - yb).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == len(loader) - 1:
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
            accelerator.print(f"step {step:2d}  loss {mean_loss.item():.4f}")

    unwrapped = accelerator.unwrap_model(model)
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()])
    everyone = accelerator.gather(checksum.unsqueeze(0))
    same = all(torch.equal(row, everyone[0]) for row in everyone)
    accelerator.print(f"ranks hold identical factors: {same}")
    optimizer.optimizer.capture.remove()  # prepare() wrapped the lorsum optimizer
    accelerator.wait_for_everyone()  # leave together (see examples/torchrun_lorsum.py)
    accelerator.end_training()


if __name__ == "__main__":
    main()
