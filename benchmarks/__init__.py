"""Measurements, kept outside the installed package: the convergence study (``train``) and its
tasks, speed and memory of the update kernels (``speed``, ``lowmem``), and one-off scripts.
Run from the repository root: ``python -m benchmarks NAME [ARGS]``."""
