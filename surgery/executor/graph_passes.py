"""Graph passes on a run's model, a layer at a time where its weights stream."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def run_on_graph(graph_pass, graph, scratch: Callable[[], Path] | None, progress: Callable[[str], None]):
    """`run_pass`, except on a lazily loaded graph for a pass that rewrites weights (one with
    `layer_passes`: prune and merge experts). There it runs a layer at a time: the layer is
    loaded, its one-layer pass applied, the new weights written to a file in `scratch()` and
    released (`DecoderGraph.spill_rewritten`); later steps, the exporter and verification load
    them from there like the checkpoint's. The contract is checked on the whole graph before
    and after, from shapes. So peak memory is a layer's, whatever the model's size.
    """
    from surgery.passes import PassResult, run_pass

    if graph.weights is None or not hasattr(graph_pass, "layer_passes") or scratch is None:
        return run_pass(graph_pass, graph)

    def layer_by_layer(graph) -> PassResult:
        folder, written, layers = scratch(), 0, graph_pass.layer_passes()
        for index, one_layer in layers:
            layer = graph.layer(index)
            with graph.materialized(*layer.modules()):
                one_layer.apply(graph)
                written += graph.spill_rewritten(layer, folder)
        progress(f"{graph_pass.name}: rewrote {len(layers)} layer(s) one at a time "
                 f"({written / 1e6:.1f} MB written aside)")  # fmt: skip
        return PassResult(True, graph_pass.summary())

    return run_pass(graph_pass, graph, layer_by_layer)
