"""Round-to-nearest group quantization: the calibration-free reference, GPTQ checkpoint format."""
