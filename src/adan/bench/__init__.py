"""Measurements: the convergence study (``train``) and its tasks, speed and memory of the update
kernels (``speed``, ``lowmem``); each runs as ``python -m adan bench NAME``."""
