"""surgery: a declarative model-surgery compiler.

A `.surg` recipe describes structural edits to a Hugging Face causal LM; `surgery apply` turns it
into an ONNX Runtime model plus a report proving the result computes what the recipe says.
The whole pipeline, in order, lives in :mod:`surgery.pipeline`.
"""

__version__ = "0.1.0"
