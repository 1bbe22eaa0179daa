"""Low-rank compression of trained linear layers, for inference: one-shot (LoRD) and during
training (TRP)."""

from lorsum.compression.trp import LayerReport, TrainedRankPruning, split_layer

__all__ = ["LayerReport", "TrainedRankPruning", "split_layer"]
