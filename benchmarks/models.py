"""The paper's small image models (spec ``lorsum.md`` §6.2–6.3), written for lorsum's tasks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNet5(nn.Module):
    """LeNet-5 with tanh and max-pooling for 32 × 32 inputs.

    Widths scale with the input channels as in the reference code: 6c and 16c convolution
    channels and 120c, 84c hidden units, so one channel is the classic LeNet-5 and three channels
    give the reference's CIFAR model (conv 3→18→48, linears 1200→360→252→classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        c = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(c, 6 * c, 5), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(6 * c, 16 * c, 5), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16 * c * 25, 120 * c), nn.Tanh(),
            nn.Linear(120 * c, 84 * c), nn.Tanh(),
            nn.Linear(84 * c, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class PatchMLP(nn.Module):
    """Patches of 4 × 4 (a strided convolution), a learned position embedding, residual
    pre-norm MLP blocks ``x + Dropout(L2(GELU(L1(LayerNorm(x)))))``, a final LayerNorm, the mean
    over tokens and a linear head (the ``PatchMLP`` class of the reference code).
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, *, dim: int = 256, depth: int = 4,
        patch: int = 4, hidden_mult: int = 2, dropout: float = 0.1, image_size: int = 32,
    ) -> None:  # fmt: skip
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patchify = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, hidden_mult * dim),
                nn.GELU(),
                nn.Linear(hidden_mult * dim, dim),
                nn.Dropout(dropout),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.position  # (batch, tokens, dim)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h).mean(dim=1))
