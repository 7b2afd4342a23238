"""Training: absl entry point, configs, data, optimizer, jitted steps, checkpoints."""
