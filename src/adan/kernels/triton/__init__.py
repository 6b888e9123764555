"""Adan's CUDA kernel in Triton, one launch per group: ``codes`` (device twins of the number
codes), ``device`` (the kernel and its address table), ``launch`` (the host side). How it
works: docs/triton.md."""

from adan.kernels.triton.device import FMT_BF16, FMT_FLOAT, FMT_INT8
from adan.kernels.triton.launch import (
    BLOCK,
    NUM_WARPS,
    QBLOCK,
    TILE,
    launch_options,
    triton_adan,
    triton_unsupported,
)

__all__ = ["BLOCK", "FMT_BF16", "FMT_FLOAT", "FMT_INT8", "NUM_WARPS", "QBLOCK", "TILE",
           "launch_options", "triton_adan", "triton_unsupported"]
