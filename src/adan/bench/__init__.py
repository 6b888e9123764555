"""Benchmarks and training workloads used to compare Adan with other optimizers."""
