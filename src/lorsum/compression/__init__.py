"""Low-rank compression of trained linear layers, for inference: one-shot (LoRD) and during
training (TRP)."""

from lorsum.compression.lord import (
    CompressionReport,
    LayerCompression,
    LoRDFactors,
    LowRankLinear,
    collect_output_statistics,
    compress_model,
    lord_factors,
    lord_rank,
)
from lorsum.compression.trp import LayerReport, TrainedRankPruning, split_layer
from lorsum.functional.feature import OutputStatistics

__all__ = [
    "CompressionReport",
    "LayerCompression",
    "LayerReport",
    "LoRDFactors",
    "LowRankLinear",
    "OutputStatistics",
    "TrainedRankPruning",
    "collect_output_statistics",
    "compress_model",
    "lord_factors",
    "lord_rank",
    "split_layer",
]
