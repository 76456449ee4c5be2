"""Records that own their facts: the element type (`Precision`), the stored form of a quantized
weight (`WeightFormat`) and the names exported tensors carry. Importable without torch, numpy or
onnx: `check` reads them too."""
