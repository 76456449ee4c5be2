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
from dataclasses import dataclass
from typing import Any

from surgery import __version__
from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.budgets import DEFAULT_LATENCY_PROMPT, QualityRequest, improves_with_count, quality_key
from surgery.front.syntax import Recipe
from surgery.progress import advance, counted
from surgery.search.candidates import (
    SearchTarget,
    candidate_recipe,
    concrete,
    recipe_text,
    search_targets,
    settled_recipe,
)
from surgery.search.measure import Job
from surgery.search.rescore import RescoreOrder
from surgery.search.results import Candidate, SearchResult, budget_value, unmet
from surgery.search.strategy import candidates_expected, largest_fitting


@dataclass(frozen=True)
class SearchSettings:
    """How candidates are run: executor kind, workers, onnxruntime threads, scratch folder."""

    executor: str = "process"
    workers: int | None = None
    threads: int | None = None
    scratch: str | None = None
    use_cache: bool = True  # read earlier candidates' measurements (they are always written)


class Searcher:
    """Runs every search of one recipe; see the module docstring."""

    def __init__(self, recipe_path: str, checked, model: str | None, computed, settings: SearchSettings,
                 progress, graph_loader, build) -> None:  # fmt: skip
        self.recipe_path = os.path.abspath(recipe_path)
        self.checked = checked
        self.model = model
        self.computed = computed
        self.settings = settings
        self.progress = progress
        self.build = build  # apply(path, output, ...): builds a candidate (handed down by the pipeline)
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

    def references(self, fit) -> None:
        """The unmodified model's perplexity (PyTorch, layer-major) on each quality budget's tokens."""
        from surgery.backend.evaluate import eval_tokens, graph_perplexity
        from surgery.data import resolve_text

        for budget in fit.quality:
            request = budget.request(False, self.checked.index.max_positions)
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
            with counted(self.progress, f"search: perplexity of the original model on {tokens.scored()} tokens of "
                         f"{text.name} (layer by layer)", len(graph.layers), "layer"):  # fmt: skip
                self.reference[key] = graph_perplexity(graph, tokens).perplexity
            self._store(cache, {"perplexity": self.reference[key]})

    def job(self, fit, candidate: Recipe) -> Job:
        """What measuring `candidate` under `fit`'s budgets takes (the references must be in)."""
        max_positions = self.checked.index.max_positions
        quality = tuple(b.request(b.measure != "perplexity", max_positions) for b in fit.quality)
        # One request per text and size: a KL budget's comparison also gives its perplexity.
        merged: dict[str, QualityRequest] = {}
        for request in quality:
            key = quality_key(request)
            merged[key] = request if key not in merged or request.compare else merged[key]
        return Job(
            recipe_path=self.recipe_path,
            recipe=candidate,
            text=recipe_text(candidate),
            build=self.build,
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
                advance("candidate")
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
                advance("candidate", len(chunk))
            for count, measured in zip(todo, results, strict=True):
                if "error" in measured:
                    problem = f"the candidate with {count} {target.counting()} could not be built: {measured['error']}"
                    raise RecipeError([Diagnostic("error", problem, target.fit.span)])
                self._store(paths[count], measured)
                found[count] = (measured, False)
        return found

    # The search of one statement.

    def plan_of(self, recipe, target: SearchTarget, settled: dict, statement):
        """(the candidate's recipe, its plan) with `statement` (one, several or None) at the
        target's place: the syntax tree is checked and planned as it is (its statements keep the
        user's spans)."""
        from surgery.front.check import check
        from surgery.front.planner import build_plan

        candidate = candidate_recipe(recipe, target, settled, statement)
        checked = check(candidate, self.model)
        return candidate, build_plan(checked, verify=False, computed=self.computed)

    def measured_candidates(self, target: SearchTarget, counts: list[int], jobs: dict[int, Job],
                            layers: dict[int, tuple[int, ...]]) -> dict[int, Candidate]:  # fmt: skip
        """`counts` measured (from the cache or built), each read by every budget of the target."""
        fit, found = target.fit, {}
        max_positions = self.checked.index.max_positions
        for count, (values, cached) in self._measure(target, counts, jobs).items():
            values["values"] = {b.describe(): b.read(values, max_positions) for b in fit.budgets}
            verdicts = {b.describe(): b.holds(budget_value(b, values)) for b in fit.budgets}
            found[count] = Candidate(count, layers[count], values, cached, verdicts)
        return found

    def search(self, recipe, target: SearchTarget, settled: dict) -> SearchResult:
        """The largest count of `target` that keeps every budget (settled statements before it);
        a trade (`or drop attention`) is searched by surgery/search/trade.py."""
        if target.kind == "trade":
            from surgery.search.trade import trade_search

            return trade_search(self, recipe, target, settled)
        start = time.perf_counter()
        fit = target.fit
        self.references(fit)

        def plan_of(statement):
            return self.plan_of(recipe, target, settled, statement)

        _, base_plan = plan_of(None)
        present = _present(target, base_plan)
        maximum = max(0, len(present) - 1) if target.kind == "drop" and target.statement.part != "mlp" else len(present)
        order = RescoreOrder(self, target, present) if fit.rescore else None

        layers: dict[int, tuple[int, ...]] = {}
        jobs: dict[int, Job] = {}

        def prepare(count: int) -> None:
            if count in jobs:
                return
            explicit = order.first(count) if order is not None else None
            statement = concrete(target, count, explicit)
            candidate, plan = plan_of(statement)
            layers[count] = _chosen_layers(target, plan, statement)
            jobs[count] = self.job(fit, candidate)

        measured: dict[int, Candidate] = {}

        def run(counts: list[int]) -> None:
            counts = [c for c in dict.fromkeys(counts) if c not in measured]
            for count in counts:
                prepare(count)
            measured.update(self.measured_candidates(target, counts, jobs, layers))

        harder = [b for b in fit.budgets if not improves_with_count(b, target.more_is_lighter)]

        def bounded(count: int) -> bool:
            return all(measured[count].verdicts[b.describe()] for b in harder)

        parallel = self._parallel(fit)
        expected = candidates_expected(fit.search, maximum, parallel, bool(harder))
        with counted(self.progress, f"search line {target.line}: {target.counting()}, {fit.search}", expected,
                     "candidate"):  # fmt: skip
            answer = largest_fitting(fit.search, maximum, parallel, bool(harder), run, measured, bounded)
        seconds = time.perf_counter() - start

        if answer is None:
            raise RecipeError([unmet(target, list(measured.values()), maximum)])
        statement = concrete(target, answer.count, order.first(answer.count) if order is not None else None)
        settled[target.position] = statement
        from surgery.front.syntax import unparse_statement

        return SearchResult(
            target,
            fit.search,
            maximum,
            list(measured.values()),
            answer,
            seconds,
            unparse_statement(statement) if statement is not None else "(nothing: count 0)",
        )


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


def _chosen_layers(target: SearchTarget, plan, statement) -> tuple[int, ...]:
    """The layers the candidate's statement took (dropped, or given the first rule's width): the
    steps planned from within its span."""
    if statement is None:
        return ()
    span = statement.span
    steps = [s for s in plan.steps if s.source is not None and span.start <= s.source.start < span.end]
    if target.kind == "drop":
        return tuple(sorted(layer for step in steps for layer in step.layers))
    return tuple(steps[0].layers) if len(steps) == 2 else ()


def run_searches(recipe_path: str, checked, model: str | None, computed, settings: SearchSettings, progress,
                 graph_loader, build) -> tuple[Recipe, list[SearchResult]]:  # fmt: skip
    """Every `as many as fit` of the recipe settled in plan order; (the settled recipe, the results).

    The settled recipe is the original one with each searched statement replaced by its answer
    (spans kept), so the plan and its diagnostics still point at the user's lines.
    """
    targets = search_targets(checked.recipe)
    if not targets:
        return checked.recipe, []
    searcher = Searcher(recipe_path, checked, model, computed, settings, progress, graph_loader, build)
    settled: dict[int, Any] = {}
    results = []
    try:
        for target in targets:
            results.append(searcher.search(checked.recipe, target, settled))
    finally:
        searcher.close()
    return settled_recipe(checked.recipe, settled), results
