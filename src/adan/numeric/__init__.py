"""Layer 0, numbers: the 8-bit codes, the noise hash and the step's scalar arithmetic.

Everything above (state formats, kernels, the optimizer) computes with these; nothing here
knows about optimizers or state.
"""
