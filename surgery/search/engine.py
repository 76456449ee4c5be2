"""The search: the largest count of each `as many as fit` statement that keeps every budget.

Counts run from 0 to the most the statement can take (drops keep one layer with the part).
The budgets that get harder as the count grows (`budgets.improves_with_count`) are assumed
monotone in the count, so the search bisects on them: each round measures as many evenly
spaced counts as the executor has workers, and keeps the interval between the largest count
that held and the smallest that did not. The budgets that get easier are then checked at that
count: if they fail there, no count meets every budget. `search exhaustive` measures every
count and takes the largest that meets every budget (the reference the tests hold bisection to).

With `rescore` the order is LLM-Drop's iterative one: after each drop the remaining layers are
scored again on the model without them, and the next least important goes.

Every measured candidate is cached under `$SURGERY_CACHE/search/`, keyed by its recipe text,
the model and the measurement protocol: a second run builds nothing it built before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from surgery import __version__
from surgery.budgets import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_LATENCY_PROMPT,
    Budget,
    LatencyBudget,
    QualityBudget,
    improves_with_count,
)
from surgery.checked import DEFAULT_WINDOW
from surgery.diagnostics import Diagnostic, RecipeError
from surgery.search.candidates import (
    SearchTarget,
    candidate_recipe,
    concrete,
    recipe_text,
    search_targets,
    settled_recipe,
)
from surgery.search.measure import Job, QualityRequest, quality_key
from surgery.statements.base import SCORE_PART
from surgery.syntax import Recipe


@dataclass(frozen=True)
class SearchSettings:
    """How candidates are run: executor kind, workers, onnxruntime threads, scratch folder."""

    executor: str = "process"
    workers: int | None = None
    threads: int | None = None
    scratch: str | None = None
    use_cache: bool = True  # read earlier candidates' measurements (they are always written)


@dataclass
class Candidate:
    """One measured count."""

    count: int
    layers: tuple[int, ...]
    measured: dict[str, Any]
    cached: bool
    verdicts: dict[str, bool] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """Every budget holds."""
        return all(self.verdicts.values())


@dataclass
class SearchResult:
    """One statement's search: every candidate measured, and the answer."""

    target: SearchTarget
    method: str
    maximum: int
    candidates: list[Candidate]
    answer: Candidate | None
    seconds: float
    settled_text: str

    def built(self) -> int:
        """Candidates built in this run (not read from the cache)."""
        return sum(not c.cached for c in self.candidates)

    def to_json(self) -> dict[str, Any]:
        """search.json's entry for this statement."""
        fit = self.target.fit
        return {
            "line": self.target.line,
            "statement": self.target.statement.span.source.text[
                self.target.statement.span.start : self.target.statement.span.end
            ],
            "counting": self.target.counting(),
            "method": self.method,
            "rescore": fit.rescore,
            "budgets": [b.describe() for b in fit.budgets],
            "counts_possible": self.maximum + 1,
            "candidates_measured": len(self.candidates),
            "candidates_built": self.built(),
            "answer": None if self.answer is None else {"count": self.answer.count, "layers": list(self.answer.layers)},
            "settled_statement": self.settled_text,
            "seconds": round(self.seconds, 2),
            "candidates": [
                {
                    "count": c.count,
                    "layers": list(c.layers),
                    "fits": c.fits,
                    "verdicts": c.verdicts,
                    "cached": c.cached,
                    **c.measured,
                }  # fmt: skip
                for c in sorted(self.candidates, key=lambda c: c.count)
            ],
        }


def budget_key(budget: Budget, max_positions: int) -> str:
    """The measurement a budget reads from a candidate's results (windows fit the model's context)."""
    if isinstance(budget, QualityBudget):
        return quality_key(_quality_request(budget, False, max_positions))
    if isinstance(budget, LatencyBudget):
        return f"{budget.measure}_ms prompt {budget.prompt or DEFAULT_LATENCY_PROMPT}"
    return budget.measure


def _quality_request(budget: QualityBudget, compare: bool, max_positions: int = 1 << 30) -> QualityRequest:
    window = budget.window or min(DEFAULT_WINDOW, max_positions)
    return QualityRequest(budget.data, budget.tokens or DEFAULT_BUDGET_TOKENS, window, compare)


def read_value(budget: Budget, measured: dict[str, Any], max_positions: int) -> float:
    """The number a budget compares, from a candidate's measurements: increase (%), KL, top-1 (%),
    ms, MB or bits."""
    if isinstance(budget, QualityBudget):
        quality = measured["quality"][budget_key(budget, max_positions)]
        if budget.measure == "perplexity":
            return quality["increase"] * 100
        return quality["kl"] if budget.measure == "kl" else quality["top1"] * 100
    if isinstance(budget, LatencyBudget):
        return measured["latency"][budget_key(budget, max_positions)]
    return measured["bytes"] / 1e6 if budget.measure == "size" else measured["bits"]


def budget_value(budget: Budget, measured: dict[str, Any]) -> float:
    """The number a budget compares, as the search recorded it on the candidate (`values`)."""
    return measured["values"][budget.describe()]


def holds(budget: Budget, measured: dict[str, Any]) -> bool:
    """Whether the measured candidate keeps the budget."""
    value = budget_value(budget, measured)
    if isinstance(budget, QualityBudget):
        return value >= budget.limit if budget.measure == "top1" else value <= budget.limit
    if isinstance(budget, LatencyBudget):
        return value <= budget.ms
    limit = budget.limit_bytes / 1e6 if budget.measure == "size" else budget.limit
    return value <= limit


class Searcher:
    """Runs every search of one recipe; see the module docstring."""

    def __init__(self, recipe_path: str, checked, model: str | None, computed, settings: SearchSettings,
                 progress, graph_loader) -> None:  # fmt: skip
        self.recipe_path = os.path.abspath(recipe_path)
        self.checked = checked
        self.model = model
        self.computed = computed
        self.settings = settings
        self.progress = progress
        self._graph_loader = graph_loader  # () -> (graph, tokenizer) of the unmodified model, lazily loaded
        self._graph = None
        self._executor = None
        self.reference: dict[str, float] = {}

    # The pieces every candidate shares.

    def loaded(self):
        """(graph, tokenizer) of the unmodified model, lazily loaded once."""
        if self._graph is None:
            self._graph = self._graph_loader()
        return self._graph

    def _references(self, fit) -> None:
        """The unmodified model's perplexity (PyTorch, layer-major) on each quality budget's tokens."""
        from surgery.data import resolve_text
        from surgery.evaluate import eval_tokens, graph_perplexity

        for budget in fit.quality:
            request = _quality_request(budget, False, self.checked.index.max_positions)
            key = quality_key(request)
            if key in self.reference:
                continue
            text = resolve_text(request.data, self.checked.base_dir)
            cache = self._cache_path("reference", {"key": key, "text": text.sha256})
            if cache.exists():  # the unmodified model's: read even when candidates are measured again
                self.reference[key] = json.loads(cache.read_text())["perplexity"]
                continue
            graph, tokenizer = self.loaded()
            tokens = eval_tokens(tokenizer, text, request.tokens, request.window)
            self.progress(f"search: perplexity of the original model on {tokens.scored()} tokens of {text.name}")
            self.reference[key] = graph_perplexity(graph, tokens).perplexity
            self._store(cache, {"perplexity": self.reference[key]})

    def _job(self, fit, text: str) -> Job:
        max_positions = self.checked.index.max_positions
        quality = tuple(_quality_request(b, b.measure != "perplexity", max_positions) for b in fit.quality)
        # One request per text and size: a KL budget's comparison also gives its perplexity.
        merged: dict[str, QualityRequest] = {}
        for request in quality:
            key = quality_key(request)
            merged[key] = request if key not in merged or request.compare else merged[key]
        return Job(
            recipe_path=self.recipe_path,
            text=text,
            model=self.model,
            quality=tuple(merged.values()),
            reference={key: self.reference[key] for key in merged},
            decode_prompts=tuple(
                sorted({b.prompt or DEFAULT_LATENCY_PROMPT for b in fit.latency if b.measure == "decode"})
            ),
            prefill_prompts=tuple(
                sorted({b.prompt or DEFAULT_LATENCY_PROMPT for b in fit.latency if b.measure == "prefill"})
            ),
            threads=self.settings.threads,
            scratch=self.settings.scratch,
        )

    # The cache.

    def _cache_path(self, kind: str, content: dict[str, Any]):
        from surgery.importance.compute import model_identity
        from surgery.models.builtin import cache_dir

        identity = {"version": __version__, "model": model_identity(self.checked.spec), "kind": kind, **content}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        return cache_dir() / "search" / f"{kind}-{digest}.json"

    @staticmethod
    def _store(path, content: dict[str, Any]) -> None:
        if path is None:
            return
        os.makedirs(path.parent, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(content))
        os.replace(temporary, path)

    def _candidate_cache(self, job: Job):
        from surgery.data import resolve_text

        texts = {request.data: resolve_text(request.data, self.checked.base_dir).sha256 for request in job.quality}
        calibration = self.checked.calibration
        if calibration is not None:  # what the candidate's importance ranks on, by content, not by path
            texts[f"calibrate {calibration.data}"] = resolve_text(calibration.data, self.checked.base_dir).sha256
        files = {path: _file_digest(path) for path in (self.checked.importance_files or {})}
        measurement = {
            "quality": [quality_key(r) + (" compare" if r.compare else "") for r in job.quality],
            "decode": job.decode_prompts,
            "prefill": job.prefill_prompts,
            "threads": job.threads,
        }
        return self._cache_path(
            "candidate",
            {
                "text": job.text,
                "override": job.model,
                "texts": texts,
                "files": files,
                "measurement": measurement,
                "reference": job.reference,
            },  # fmt: skip
        )

    # Running candidates.

    def _workers(self) -> int:
        return self.settings.workers or max(1, (os.cpu_count() or 2) // 2)

    def _parallel(self, fit) -> int:
        """Candidates measured at once: the workers, or one when latency is measured (candidates
        timed side by side would slow each other)."""
        return 1 if fit.latency else self._workers()

    def _executor_for(self):
        if self._executor is None:
            from surgery.search.executors import make_executor

            self._executor = make_executor(self.settings.executor, self._workers())
        return self._executor

    def close(self) -> None:
        """Stop the executor's workers."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def _measure(self, target: SearchTarget, counts: list[int], jobs: dict[int, Job]) -> dict[int, tuple[dict, bool]]:
        """Measurements of `counts`: from the cache where there, else built by the executor."""
        found: dict[int, tuple[dict, bool]] = {}
        todo = []
        paths = {count: self._candidate_cache(jobs[count]) for count in counts}  # hashes texts: once per count
        for count in counts:
            if self.settings.use_cache and paths[count].exists():
                found[count] = (json.loads(paths[count].read_text()), True)
            else:
                todo.append(count)
        if todo:
            executor = self._executor_for()
            self.progress(
                f"search line {target.line}: building and measuring {len(todo)} candidate(s) "
                f"({target.counting()}: {', '.join(map(str, todo))})"
            )
            results = []
            for start in range(0, len(todo), self._parallel(target.fit)):  # latency: one at a time
                chunk = todo[start : start + self._parallel(target.fit)]
                results += executor.run([jobs[c] for c in chunk])
            for count, measured in zip(todo, results, strict=True):
                if "error" in measured:
                    problem = f"the candidate with {count} {target.counting()} could not be built: {measured['error']}"
                    raise RecipeError([Diagnostic("error", problem, target.fit.span)])
                self._store(paths[count], measured)
                found[count] = (measured, False)
        return found

    # The search of one statement.

    def search(self, recipe, target: SearchTarget, settled: dict) -> SearchResult:
        """The largest count of `target` that keeps every budget (settled statements before it)."""
        from surgery.check import check
        from surgery.parser import parse_source
        from surgery.plan import build_plan
        from surgery.source import Source

        start = time.perf_counter()
        fit = target.fit
        self._references(fit)

        def plan_of(statement):
            """(checked, plan, the candidate's statement span) of the candidate recipe with `statement`."""
            candidate = candidate_recipe(recipe, target, settled, statement)
            text = recipe_text(candidate)
            reparsed = parse_source(Source(self.recipe_path, text))
            checked = check(reparsed, self.model)
            return text, build_plan(checked, verify=False, computed=self.computed), reparsed, candidate

        _, base_plan, _, _ = plan_of(None)
        present = _present(target, base_plan)
        maximum = max(0, len(present) - 1) if target.kind == "drop" and target.statement.part != "mlp" else len(present)
        order = _RescoreOrder(self, target, present) if fit.rescore else None

        texts: dict[int, str] = {}
        layers: dict[int, tuple[int, ...]] = {}
        jobs: dict[int, Job] = {}

        def prepare(count: int) -> None:
            if count in jobs:
                return
            explicit = order.first(count) if order is not None else None
            statement = concrete(target, count, explicit)
            text, plan, reparsed, candidate = plan_of(statement)
            texts[count] = text
            layers[count] = _chosen_layers(target, plan, reparsed, candidate, statement)
            jobs[count] = self._job(fit, text)

        measured: dict[int, Candidate] = {}

        def run(counts: list[int]) -> None:
            counts = [c for c in dict.fromkeys(counts) if c not in measured]
            for count in counts:
                prepare(count)
            for count, (values, cached) in self._measure(target, counts, jobs).items():
                max_positions = self.checked.index.max_positions
                values["values"] = {b.describe(): read_value(b, values, max_positions) for b in fit.budgets}
                verdicts = {b.describe(): holds(b, values) for b in fit.budgets}
                measured[count] = Candidate(count, layers[count], values, cached, verdicts)

        harder = [b for b in fit.budgets if not improves_with_count(b, target.more_is_lighter)]

        def bounded(count: int) -> bool:
            return all(measured[count].verdicts[b.describe()] for b in harder)

        if fit.search == "exhaustive":
            run(list(range(maximum + 1)))
            fitting = [c for c in measured.values() if c.fits]
            answer = max(fitting, key=lambda c: c.count) if fitting else None
        else:
            parallel = self._parallel(fit)
            low, high = -1, maximum + 1  # bounded(low) holds (or low = -1); bounded(high) fails (or high = max + 1)
            if not harder:
                run([maximum])
                low = maximum
            while high - low > 1:
                inner = high - low - 1
                probes = sorted({low + max(1, round((i + 1) * (inner + 1) / (parallel + 1))) for i in range(parallel)})
                probes = [p for p in probes if low < p < high] or [low + 1]
                run(probes)
                for probe in probes:
                    if bounded(probe):
                        low = max(low, probe)
                high = min([p for p in probes if p > low and not bounded(p)] + [high])
            answer = measured[low] if low >= 0 and measured[low].fits else None
        seconds = time.perf_counter() - start
        if answer is None:
            raise RecipeError([_unmet(target, list(measured.values()), maximum)])
        statement = concrete(target, answer.count, order.first(answer.count) if order is not None else None)
        settled[target.position] = statement
        from surgery.syntax import unparse_statement

        return SearchResult(
            target,
            fit.search,
            maximum,
            list(measured.values()),
            answer,
            seconds,
            unparse_statement(statement) if statement is not None else "(nothing: count 0)",
        )


class _RescoreOrder:
    """LLM-Drop's iterative order: the next layer to drop is the least important on the model
    with the earlier ones already dropped, scored again each time."""

    def __init__(self, searcher: Searcher, target: SearchTarget, present: list[int]):
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
        from surgery.importance.measures import lim_scores, residual_statistics, similarity_scores
        from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass
        from surgery.selection import ranking

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


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _present(target: SearchTarget, plan) -> list[int]:
    """The layers that still have the statement's part when it runs."""
    part = target.statement.part
    if part in ("attention",):
        return list(plan.kv_layers_after)
    if part == "mlp":
        return list(plan.mlp_layers_after)
    return list(plan.layers_after)


def _chosen_layers(target: SearchTarget, plan, reparsed, candidate, statement) -> tuple[int, ...]:
    """The layers the candidate's statement took (dropped, or given the first rule's width)."""
    if statement is None:
        return ()
    position = candidate.statements.index(statement)
    span = reparsed.statements[position].span
    steps = [s for s in plan.steps if s.source is not None and span.start <= s.source.start < span.end]
    if target.kind == "drop":
        return tuple(sorted(layer for step in steps for layer in step.layers))
    return tuple(steps[0].layers) if len(steps) == 2 else ()


def _unmet(target: SearchTarget, candidates: list[Candidate], maximum: int) -> Diagnostic:
    """No count meets every budget: the error names the candidate that came closest."""

    def shortfall(candidate: Candidate) -> tuple[int, float]:
        missed = [b for b in target.fit.budgets if not candidate.verdicts[b.describe()]]
        excess = 0.0
        for budget in missed:
            value = budget_value(budget, candidate.measured)
            limit = _limit(budget)
            excess += abs(value - limit) / max(abs(limit), 1e-9)
        return len(missed), excess

    best = min(candidates, key=shortfall)
    missed = [
        f"{b.describe()} (measured {_shown(b, budget_value(b, best.measured))})"
        for b in target.fit.budgets
        if not best.verdicts[b.describe()]
    ]
    return Diagnostic(
        "error",
        f"no count meets every budget: the closest, {best.count} {target.counting()}, misses " + "; ".join(missed),
        target.fit.span,
        f"{len(candidates)} of {maximum + 1} counts measured (search.json with `apply` lists them); "
        "loosen a budget or change what the statement does",
    )


def _limit(budget: Budget) -> float:
    if isinstance(budget, QualityBudget):
        return budget.limit
    if isinstance(budget, LatencyBudget):
        return budget.ms
    return budget.limit_bytes / 1e6 if budget.measure == "size" else budget.limit


def _shown(budget: Budget, value: float) -> str:
    if isinstance(budget, QualityBudget):
        return f"{value:+.2f}%" if budget.measure == "perplexity" else (
            f"{value:.4f}" if budget.measure == "kl" else f"{value:.1f}%"
        )  # fmt: skip
    if isinstance(budget, LatencyBudget):
        return f"{value:.2f} ms"
    return f"{value:.1f} MB" if budget.measure == "size" else f"{value:.3f} bits"


def run_searches(recipe_path: str, checked, model: str | None, computed, settings: SearchSettings, progress,
                 graph_loader) -> tuple[Recipe, list[SearchResult]]:  # fmt: skip
    """Every `as many as fit` of the recipe settled in plan order; (the settled recipe, the results).

    The settled recipe is the original one with each searched statement replaced by its answer
    (spans kept), so the plan and its diagnostics still point at the user's lines.
    """
    targets = search_targets(checked.recipe)
    if not targets:
        return checked.recipe, []
    searcher = Searcher(recipe_path, checked, model, computed, settings, progress, graph_loader)
    settled: dict[int, Any] = {}
    results = []
    try:
        for target in targets:
            progress(f"search line {target.line}: {target.counting()}, {target.fit.search}")
            results.append(searcher.search(checked.recipe, target, settled))
    finally:
        searcher.close()
    return settled_recipe(checked.recipe, settled), results


def render_table(result: SearchResult) -> str:
    """The candidates as a text table, the answer marked."""
    budgets = result.target.fit.budgets
    header = ["count", "layers"] + [_column(b) for b in budgets] + ["fits", ""]
    rows = []
    for c in sorted(result.candidates, key=lambda c: c.count):
        values = [_shown(b, budget_value(b, c.measured)) for b in budgets]
        shown_layers = ",".join(map(str, c.layers)) if c.layers else "-"
        if len(shown_layers) > 40:
            shown_layers = shown_layers[:37] + "..."
        mark = "<- answer" if result.answer is not None and c.count == result.answer.count else ""
        rows.append(
            [str(c.count), shown_layers, *values, "yes" if c.fits else "no", mark + (" (cached)" if c.cached else "")]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]
    fit = result.target.fit
    summary = (
        f"search (line {result.target.line}, {result.method}{', rescored' if fit.rescore else ''}): "
        f"{result.target.counting()} = {result.answer.count if result.answer else 'none'}; "
        f"{len(result.candidates)} of {result.maximum + 1} counts measured, {result.built()} built, "
        f"{len(result.candidates) - result.built()} from the cache, {result.seconds:.1f} s"
    )
    return "\n".join([summary, *("  " + line for line in lines)])


def _column(budget: Budget) -> str:
    if isinstance(budget, QualityBudget):
        return {"perplexity": "ppl increase", "kl": "KL", "top1": "top-1"}[budget.measure]
    if isinstance(budget, LatencyBudget):
        return f"{budget.measure} ms"
    return "MB" if budget.measure == "size" else "bits"


def search_json(results: list[SearchResult], settled_text: str) -> dict[str, Any]:
    """The content of search.json."""
    return {
        "format": "surgery-search",
        "version": 1,
        "settled_recipe": settled_text,
        "searches": [r.to_json() for r in results],
        "notes": "counts are the original model's layers; perplexity increase is against the unmodified model in "
        "PyTorch (fp32) on the same tokens; latency by surgery/latency.py's protocol on this machine",
    }
