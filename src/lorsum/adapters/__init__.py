"""Parameterisations of the weight update other than a LoRA pair ``B @ A``.

Each adapter is a module that wraps a frozen linear layer, with an exact ``merge``/``unmerge``,
a function that injects it into a model, and a trainable-parameter count that matches its
paper's formula.
"""

from lorsum.adapters.loldu import LoLDULinear, add_loldu, load_loldu_state_dict, loldu_state_dict
from lorsum.adapters.miss import (
    BatLinear,
    add_bat,
    bat_delta_weight,
    bat_state_dict,
    bat_unmerge_weight,
    load_bat_state_dict,
    miss_config,
    miss_parameter_count,
    miss_trainable_parameters,
)
from lorsum.adapters.sds import SDSLoRALinear, SDSLoRASchedule, add_sds_lora, sds_lora_state_dict

__all__ = [
    "BatLinear",
    "LoLDULinear",
    "SDSLoRALinear",
    "SDSLoRASchedule",
    "add_bat",
    "add_loldu",
    "add_sds_lora",
    "bat_delta_weight",
    "bat_state_dict",
    "bat_unmerge_weight",
    "load_bat_state_dict",
    "load_loldu_state_dict",
    "loldu_state_dict",
    "miss_config",
    "miss_parameter_count",
    "miss_trainable_parameters",
    "sds_lora_state_dict",
]
