"""Export of the edited decoder graph to ONNX for onnxruntime."""
