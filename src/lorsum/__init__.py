"""lorsum: LoRA optimizers that take the full fine-tuning step projected onto rank r, no SVD."""

from lorsum import functional, optim
from lorsum._version import __version__
from lorsum.capture import CapturedGradient, GradientCapture
from lorsum.factory import METHODS, create_optimizer, find_lora_pairs
from lorsum.layers import LoRALinear, add_lora, lora_pairs
from lorsum.lora import LoRAPair, dense_param_group, dense_parameters, pair_param_groups
from lorsum.optim import LoRAPro, LoRSum, PrecondLoRA, ScaledLoRSum, SVDLoRA

__all__ = [
    "METHODS",
    "CapturedGradient",
    "GradientCapture",
    "LoRALinear",
    "LoRAPair",
    "LoRAPro",
    "LoRSum",
    "PrecondLoRA",
    "SVDLoRA",
    "ScaledLoRSum",
    "__version__",
    "add_lora",
    "create_optimizer",
    "dense_param_group",
    "dense_parameters",
    "find_lora_pairs",
    "functional",
    "lora_pairs",
    "optim",
    "pair_param_groups",
]
