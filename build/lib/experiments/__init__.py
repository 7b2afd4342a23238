"""Experiments: benchmarks, sweeps, scaling-law fits, interpretability, notebooks."""
