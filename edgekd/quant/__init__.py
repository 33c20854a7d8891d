"""int8 quantization: QAT fake-quant modules (PyTorch) and static PTQ (onnxruntime)."""
