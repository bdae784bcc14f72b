"""stabilitylab: find the quiet failures of self-supervised Vision Transformer training."""

__version__ = "0.1.0"
