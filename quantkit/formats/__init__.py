"""Checkpoint formats beyond each backend's own: compressed-tensors (vLLM's native format) and
exact conversions between it, GPTQ and AWQ."""
