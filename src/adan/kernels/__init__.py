"""Adan update kernels: pure functions that apply one step to lists of tensors in place."""

from adan.kernels.foreach import multi_tensor_adan
from adan.kernels.single import single_tensor_adan

__all__ = ["multi_tensor_adan", "single_tensor_adan"]
