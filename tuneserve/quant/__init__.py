"""Weight quantization at serving time: packed modules, round-to-nearest, GGUF-native blocks, checkpoints.

The calibrated methods (GPTQ, AWQ) run the model and live in calibration/; loading.py dispatches.

`loading.quantize_model(model, "int4")` swaps the model's linear layers, token embedding and (untied) LM head for
packed modules (quant/linear.py) in place. Names (EngineArgs.quantization):
  int8       weight-only, symmetric, one fp32 scale per output channel
  int4       groups of 32/64/128 inputs, asymmetric (fp16 scale and min per group), round-to-nearest
  gptq-int4 / gptq-int8   Hessian-based error compensation on calibration text (calibration/gptq.py)
  awq-int4   activation-aware per-input-channel scales, then group-wise int4 (calibration/awq.py)
  gguf       keep a GGUF file's own blocks (Q4_1, Q8_0, ...) and compute from them (quant/gguf_native.py)
  DIR        a checkpoint written by `tuneserve quantize` or an HF GPTQ/AWQ directory (quant/checkpoint.py)
"""
