"""Benchmarks: optimizer-step speed against the memory floor and the peers."""
