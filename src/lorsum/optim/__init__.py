"""torch.optim optimizers for LoRA pairs: thin wrappers over :mod:`lorsum.functional`."""

from lorsum.optim._base import LoRAOptimizer
from lorsum.optim.lora_plus import lora_plus_param_groups
from lorsum.optim.lora_pro import LoRAPro
from lorsum.optim.lorsum import LoRSum
from lorsum.optim.precond_lora import PrecondLoRA
from lorsum.optim.scaled_lorsum import ScaledLoRSum
from lorsum.optim.svd_lora import SVDLoRA

__all__ = [
    "LoRAOptimizer",
    "LoRAPro",
    "LoRSum",
    "PrecondLoRA",
    "SVDLoRA",
    "ScaledLoRSum",
    "lora_plus_param_groups",
]
