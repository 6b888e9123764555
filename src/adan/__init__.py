"""adan: the Adan optimizer (Adaptive Nesterov Momentum) for PyTorch."""

from adan.optimizer import Adan

__all__ = ["Adan"]
__version__ = "0.1.0"
