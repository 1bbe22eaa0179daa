"""Fine-tune a plain PyTorch model with LoRA and LoRSum, no PEFT needed.

    python examples/plain_pytorch.py

A frozen random MLP learns a new linear map through rank-4 adapters on both layers. LoRSum takes
each step as full fine-tuning would (W ← W − lr·∂L/∂W) and projects it onto rank 4 by two
alternating sweeps; the head stays trainable and is stepped by AdamW.
"""

import torch
from torch import nn

import lorsum

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
for p in model[:4].parameters():
    p.requires_grad_(False)  # a "pretrained" trunk; the head model[4] stays trainable

pairs = lorsum.add_lora(model, ["0", "2"], rank=4, alpha=8)  # LoRALinear on the two trunk layers
optimizer = lorsum.create_optimizer(model, "lorsum", lr=0.5, num_iters=2, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)

teacher = nn.Linear(32, 8)
x = torch.randn(512, 32)
with torch.no_grad():
    y = teacher(x)

for step in range(200):
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()  # the capture records each adapter's full gradient as (S, X) rows
    optimizer.step()
    scheduler.step()
    if step % 50 == 0 or step == 199:
        print(f"step {step:3d}  loss {loss.item():.4f}")

optimizer.capture.remove()  # take the gradient hooks off the model
