"""Sweep files: each defines get_sweep() -> experiments.scaling.spec.Sweep (see its docstring)."""
