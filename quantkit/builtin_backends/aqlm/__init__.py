"""AQLM: additive quantization of language models, in plain torch, with aqlm-compatible checkpoints."""
