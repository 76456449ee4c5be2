"""Node kinds of the decoder IR. Each kind is one component: a `torch.nn.Module` whose `forward`
is the PyTorch reference and whose `emit` writes the same computation as ONNX.

The nodes hold references to the Hugging Face model's tensors (or views of them, for fused
projections), never copies. `surgery.architectures.build` creates them from an architecture
description; `surgery.export.decoder` walks the layers and asks each node to emit itself.
"""
