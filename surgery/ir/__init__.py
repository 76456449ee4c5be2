"""The IR: the decoder graph that passes rewrite (`graph`), a layer and its walk, written once for
the PyTorch reference and the exporter (`layer`), and what the graph's forward takes (`inputs`).
Its node kinds are surgery.nodes; the families it is built from are surgery.architectures.
"""
