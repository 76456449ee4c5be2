"""Each recipe statement has one home: a module with its node, grammar rules, check, plan and description."""

from __future__ import annotations

import re

from surgery.front import statements
from surgery.front.plan_step import PlanStep
from surgery.front.planner import build_plan
from surgery.front.statements import STATEMENTS, for_step, model


def _statement_rules() -> set[str]:
    """The statement rules the parser offers (its `?statement` rule, assembled from the modules)."""
    from surgery.grammar import grammar_text

    grammar = grammar_text()
    start = grammar.index("?statement:")
    block = grammar[start : grammar.index("\n\n", start)]
    return set(re.findall(r"\b(\w+_stmt)\b", block.split(":", 1)[1]))


def test_every_grammar_statement_rule_has_exactly_one_module():
    owners: dict[str, list[str]] = {}
    for module in (*STATEMENTS, model):
        for rule in module.GRAMMAR:
            owners.setdefault(rule, []).append(statements.name(module))
    assert set(owners) == _statement_rules()
    assert all(len(modules) == 1 for modules in owners.values()), owners


def test_every_module_declares_its_parts():
    for module in STATEMENTS:
        for part in ("NODES", "GRAMMAR", "unparse", "check", "plan"):
            assert hasattr(module, part), f"{module.__name__} lacks {part}"
        steps = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, PlanStep)
                 and v.__module__ == module.__name__]  # fmt: skip
        for kind in steps:  # a step kind describes itself and runs itself
            assert kind.describe is not PlanStep.describe, kind
            assert kind.run is not PlanStep.run or kind.run_all is not PlanStep.run_all, kind


def test_plan_steps_are_described_by_the_statement_that_made_them(tmp_path):
    from surgery.front.check import check
    from surgery.front.parser import parse

    recipe = parse(
        'model "tiny-llama"\ndrop attention layers 1\ndrop mlp layers 2\nquantize layers 3..4 to int4\n'
        'fuse layer 3 into head\nexport onnx opset 21\nverify perplexity on "wikitext-2-test" max-increase 50%\n'
    )
    plan = build_plan(check(recipe))
    made = {step.action: for_step(step) for step in plan.steps}
    assert made["drop attention"] is statements.drop and made["quantize"] is statements.quantize
    assert made["fuse"] is statements.fuse and made["export onnx"] is statements.export
    assert made["verify perplexity"] is statements.verify and made["verify"] is None  # the plan's default
    text = plan.render()
    assert "drop attention layers 1" in text and "fuse layer 3 into the head" in text
