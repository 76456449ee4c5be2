"""The executor: runs a plan's typed steps, in order, over one `Run` (surgery/executor/run.py).

It knows no step kind by name. Its policies are decided from what the steps declare: the
weights stay in the checkpoint and stream a layer at a time unless a step needs the whole
model; a reference a step measures on the unmodified model is taken before the first step
runs (`prepare`); work that overlaps the export starts once the graph is final
(`before_export`); steps of a kind that act as one run together (`run_all`). The modules
beside this one are the work the steps call on: loading, graph passes and expert statistics,
export, verification, ONNX quantization and perplexity.
"""
