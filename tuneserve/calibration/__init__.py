"""Offline quantization that runs the model: calibration text, GPTQ, AWQ, layer by layer."""
