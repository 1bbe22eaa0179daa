"""lorsum: LoRA optimizers that take the full fine-tuning step projected onto rank r, no SVD."""

from lorsum import functional
from lorsum._version import __version__

__all__ = ["__version__", "functional"]
