"""GPTQ in plain torch, GPTQ checkpoint format."""
