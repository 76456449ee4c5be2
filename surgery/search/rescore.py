"""LLM-Drop's iterative order for `rescore`: after each drop the remaining layers are scored
again on the model without them, and the next least important goes."""

from __future__ import annotations

from surgery.front.statements.base import SCORE_PART
from surgery.search.candidates import SearchTarget


class RescoreOrder:
    """LLM-Drop's iterative order: the next layer to drop is the least important on the model
    with the earlier ones already dropped, scored again each time."""

    def __init__(self, searcher, target: SearchTarget, present: list[int]):
        self.searcher, self.target, self.present = searcher, target, present
        self.order: list[int] = []

    def first(self, count: int) -> tuple[int, ...]:
        """The first `count` layers of the order (scoring as many rounds as that needs)."""
        while len(self.order) < count:
            self.order.append(self._next())
        return tuple(self.order[:count])

    def _next(self) -> int:
        import copy

        from surgery.calibration import calibration_tokens
        from surgery.data import resolve_text
        from surgery.front.selection import ranking
        from surgery.importance.measures import lim_scores, residual_statistics, similarity_scores
        from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass

        statement = self.target.statement
        metric = statement.selector.source.metric
        part = statement.part
        graph, tokenizer = self.searcher.loaded()
        checked = self.searcher.checked
        calibration = checked.calibration
        tokens = calibration_tokens(tokenizer, calibration, resolve_text(calibration.data, checked.base_dir))
        dropped = list(self.order)
        self.searcher.progress(
            f"search line {self.target.line}: re-scoring {metric} after dropping {dropped or 'nothing'}"
        )
        passes = {"attention": DropAttention, "mlp": DropMlp, "block": DropBlock}
        # Each round edits a copy of the node list; the weights stay the lazily loaded ones.
        work = copy.copy(graph)
        work.layers = [copy.copy(layer) for layer in graph.layers]
        if dropped:
            run_pass(passes[part](layers=tuple(dropped)), work)
        statistics = residual_statistics(work, tokens)
        # Scores indexed by original layer number (a dropped block leaves the node list).
        full = {key: [float("nan")] * checked.index.num_layers for key in statistics}
        for i, layer in enumerate(work.layers):
            for key in statistics:
                full[key][layer.index] = float(statistics[key][i])
        scores = (lim_scores if metric == "lim" else similarity_scores)(
            {key: __import__("numpy").array(values) for key, values in full.items()}
        )
        remaining = [layer for layer in self.present if layer not in dropped]
        order = ranking(scores, SCORE_PART[part], remaining)  # most important first
        return order[0] if statement.selector.rank.rank == "most" else order[-1]
