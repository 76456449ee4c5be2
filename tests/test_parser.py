"""Parsing: AST shape, spans, parse -> unparse -> parse round trips, syntax diagnostics."""

from __future__ import annotations

import pytest

from surgery.diagnostics import RecipeError
from surgery.front.parser import parse, split_statements
from surgery.front.syntax import (
    AllLayers,
    DropStmt,
    EvenlyLayers,
    ExportStmt,
    FirstLayers,
    LastLayers,
    LayerIndex,
    LayerList,
    LayerRange,
    ModelStmt,
    unparse,
)

ROUND_TRIP = [
    'model "smollm2-135m"\ndrop attention layers 20..29\nexport onnx\n',
    "drop mlp layers 3, 5, 9..12\ndrop block layers -4..-1\n",
    "drop attention layers first 2\ndrop mlp layers last 4\ndrop block layers evenly 6\ndrop mlp layers *\n",
    "export onnx opset 19 without kv-cache\n",
    '# comment only line\n\nmodel "./a folder/model"   # trailing comment\n  drop   attention layers 1 ..  2  \n',
    'model "x # not a comment"\n',
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(text):
    recipe = parse(text)
    again = parse(unparse(recipe))
    assert again == recipe
    assert unparse(again) == unparse(recipe)


def test_ast_of_every_selector():
    recipe = parse(
        "drop attention layers 20..29, 3, -4..-1\n"
        "drop mlp layers first 2\n"
        "drop block layers last 4\n"
        "drop mlp layers evenly 6\n"
        "drop block layers *\n"
    )
    assert recipe.statements == (
        DropStmt(
            "attention",
            LayerList(
                (LayerRange(LayerIndex(20), LayerIndex(29)), LayerIndex(3), LayerRange(LayerIndex(-4), LayerIndex(-1)))
            ),
        ),
        DropStmt("mlp", FirstLayers(2)),
        DropStmt("block", LastLayers(4)),
        DropStmt("mlp", EvenlyLayers(6)),
        DropStmt("block", AllLayers()),
    )


def test_model_and_export_statements():
    recipe = parse('model "tiny-llama"\nexport onnx opset 18 without kv-cache\n')
    assert recipe.statements == (ModelStmt("tiny-llama"), ExportStmt(opset=18, kv_cache=False))
    assert parse("export onnx\n").statements == (ExportStmt(opset=None, kv_cache=True),)


def test_spans_point_into_the_recipe():
    recipe = parse('\n  model "tiny-llama"\ndrop attention layers 1..2, 4\n', name="r.surg")
    model, drop = recipe.statements
    assert model.span.location() == "r.surg:2:3"
    assert model.spec_span.text == '"tiny-llama"'
    assert drop.span.text == "drop attention layers 1..2, 4"
    first, second = drop.selector.items
    assert first.span.text == "1..2" and first.span.location() == "r.surg:3:23"
    assert second.span.text == "4"


def test_split_statements_skips_comments_and_blank_lines():
    text = '# header\n\nmodel "a" # c\n   \ndrop mlp layers 1\n'
    assert [text[a:b] for a, b in split_statements(text)] == ['model "a"', "drop mlp layers 1"]


# Bad snippets and the message each must produce (the lark `match_examples` idea as a table).
SYNTAX_ERRORS = {
    "dorp attention layers 1": ("unknown keyword 'dorp'", "did you mean 'drop'?"),
    "quantise layers 1": ("unknown keyword 'quantise'", None),
    "drop attn layers 2": (
        "unexpected 'attn', expected 'attention', 'block', 'heads' or 'mlp'",
        "did you mean 'attention'?",
    ),
    "drop attention layers": ("incomplete statement", None),
    "drop attention layers 20...29": ("unexpected '.', expected a layer number", None),
    "drop attention layers 20..": ("incomplete statement", None),
    "drop mlp 3": ("unexpected '3', expected 'layers'", None),
    "export onnx opset x": ("unexpected 'x', expected a number", None),
    "export onnx without cache": ("unexpected 'cache', expected 'cuda-graphs' or 'kv-cache'", None),
    "model smollm2": ("unexpected 'smollm2'", None),
}


@pytest.mark.parametrize("snippet", SYNTAX_ERRORS)
def test_syntax_error_messages(snippet):
    message, hint = SYNTAX_ERRORS[snippet]
    with pytest.raises(RecipeError) as caught:
        parse(snippet + "\n", name="bad.surg")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.message.startswith(message)
    assert diagnostic.span.location().startswith("bad.surg:1:")
    if hint:
        assert diagnostic.hint == hint


def test_every_syntax_error_is_reported_at_once():
    text = "dorp mlp layers 1\ndrop mlp layers 2\ndrop attn layers 3\nexport onnx opset\n"
    with pytest.raises(RecipeError) as caught:
        parse(text, name="r.surg")
    assert [d.span.line for d in caught.value.diagnostics] == [1, 3, 4]
