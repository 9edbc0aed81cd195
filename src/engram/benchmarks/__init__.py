"""Benchmark builders returning Avalanche benchmarks."""
