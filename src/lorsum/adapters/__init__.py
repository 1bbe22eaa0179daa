"""Parameterisations of the weight update other than a LoRA pair ``B @ A``.

Each adapter is a module that wraps a frozen linear layer, with an exact ``merge``/``unmerge``,
a function that injects it into a model, and a trainable-parameter count that matches its
paper's formula.
"""

from lorsum.adapters.sds import SDSLoRALinear, SDSLoRASchedule, add_sds_lora, sds_lora_state_dict

__all__ = ["SDSLoRALinear", "SDSLoRASchedule", "add_sds_lora", "sds_lora_state_dict"]
