"""Low-rank compression of trained linear layers, for inference: one-shot (LoRD) and during
training (TRP)."""
