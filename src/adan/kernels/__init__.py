"""Adan update kernels: one module per implementation behind one signature (see ``common``).

``single`` (reference, one tensor at a time), ``foreach`` (multi-tensor eager), ``compact``
(one tensor at a time over any storage format), ``cpu_compiled`` (C++ by torch.compile),
``triton`` (one Triton launch per group on CUDA); ``select`` chooses.
"""
