"""torch.optim optimizers for LoRA pairs: thin wrappers over :mod:`lorsum.functional`."""

from lorsum.optim._base import LoRAOptimizer
from lorsum.optim.lorsum import LoRSum

__all__ = ["LoRAOptimizer", "LoRSum"]
