"""What makes the hot path fast: attention backends, fused norms/RoPE/modulation, compiled graphs, parallelism."""
