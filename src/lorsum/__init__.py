"""lorsum: LoRA optimizers that take the full fine-tuning step projected onto rank r, no SVD."""

from lorsum import functional, optim
from lorsum._version import __version__
from lorsum.capture import CapturedGradient, GradientCapture
from lorsum.layers import LoRALinear, add_lora, lora_pairs
from lorsum.lora import LoRAPair, dense_param_group, pair_param_groups
from lorsum.optim import LoRSum

__all__ = [
    "CapturedGradient",
    "GradientCapture",
    "LoRALinear",
    "LoRAPair",
    "LoRSum",
    "__version__",
    "add_lora",
    "dense_param_group",
    "functional",
    "lora_pairs",
    "optim",
    "pair_param_groups",
]
