"""Measurements: training the small character-level GPT, speed of the update kernels."""
