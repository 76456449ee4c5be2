"""The back end: what runs and proves the exported model.

Verification against the PyTorch reference (`verify`, `verify_layerwise`), onnxruntime sessions
and decoding (`runtime`), latency and perplexity measurements (`latency`, `evaluate`), the report
(`report`) and the output folder that appears complete or not at all (`output`). The exporter
itself is surgery.export; the executor (surgery.executor) drives these for a plan.
"""
