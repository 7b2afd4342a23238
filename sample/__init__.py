"""Sampling: prefill + scan decode with a KV cache."""
