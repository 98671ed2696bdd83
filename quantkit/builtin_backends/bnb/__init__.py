"""bitsandbytes (NF4/FP4/LLM.int8) through the bitsandbytes library."""
