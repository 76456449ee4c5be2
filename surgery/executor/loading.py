"""Loading the model for a run: its graph built from the architecture description and checked
against the Hugging Face forward, every problem reported at the recipe's `model` line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.checked import CheckedRecipe


def weights_error(checked: CheckedRecipe, problem) -> RecipeError:
    """Every finding about the weights (a WeightsError), each at the `model` line."""
    return RecipeError([Diagnostic("error", message, checked.model_span, hint) for message, hint in problem.problems])


def load_graph(checked: CheckedRecipe, progress: Callable[[str], None], whole: bool = False) -> tuple[Any, Any]:
    """(graph, ModelTokenizer): the model loaded, its nodes built from the architecture description,
    and that description checked against the model's own forward; problems at the `model` line.
    The tokenizer loads when first used (`ModelTokenizer.get`).

    The weights of a safetensors checkpoint stay in their files and the graph loads them node
    by node (`DecoderGraph.materialized`), unless `whole`."""
    from surgery.architectures.conformance import DescriptionMismatch, checked_config, checked_graph
    from surgery.models.loading import load_model
    from surgery.models.specs import ModelSpecError
    from surgery.models.weights import WeightsError

    progress(f"loading {checked.spec.text}")
    try:
        hf_model, tokenizer, weights = load_model(
            checked.spec, progress, lazy=True, checked_before=checked_config, tokenizer_on_use=True
        )
        graph = checked_graph(hf_model, checked.index, weights)
        if whole:
            graph.materialize_all()
        return graph, tokenizer
    except DescriptionMismatch as problem:
        raise RecipeError([Diagnostic("error", str(problem), checked.model_span, problem.hint)]) from problem
    except WeightsError as problem:
        raise weights_error(checked, problem) from problem
    except ModelSpecError as problem:
        raise RecipeError([Diagnostic("error", str(problem), checked.model_span, problem.hint)]) from problem
