"""Tiny transformers configs shared by the integration tests (built locally, never downloaded)."""

from __future__ import annotations

import transformers

VOCAB, SEQ = 100, 7


def bert_config() -> transformers.BertConfig:
    """A 2-layer, 32-wide BERT. No dropout in the base model: LoRA's is the only randomness."""
    return transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
