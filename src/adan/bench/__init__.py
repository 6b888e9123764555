"""Measurements: training the small character-level GPT, speed and memory of the update kernels."""
