"""The recipe grammar: grammar/surgery.lark (shipped here as package data) holds what statements
share; each statement module brings its own rules (`SYNTAX`). `grammar_text` assembles them and
`lark_parser` compiles the LALR parser once."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import lark


def statement_modules() -> tuple:
    """Every statement module, `model` first: each declares its syntax (`SYNTAX`: lark rules),
    the rules a statement starts from (`GRAMMAR`) and its AST builders (`BUILDERS`)."""
    from surgery.front.statements import STATEMENTS, model

    return (model, *STATEMENTS)


@cache
def grammar_text() -> str:
    """The recipe grammar: the `?statement` rule offering every module's statement rules, each
    module's rules, then what they share (grammar/surgery.lark)."""
    shared = resources.files("surgery.grammar").joinpath("surgery.lark").read_text()
    modules = statement_modules()
    rules = [rule for module in modules for rule in module.GRAMMAR]
    statement = "?statement: " + "\n          | ".join(rules) + "\n"
    return "\n".join([statement, *(module.SYNTAX for module in modules), shared])


@cache
def statement_keywords() -> tuple[str, ...]:
    """The words a statement starts with (`drop`, `quantize`, ...), read from the modules' rules."""
    words = []
    for module in statement_modules():
        for rule in module.GRAMMAR:
            found = re.search(rf'^{rule}:\s*"([a-z-]+)"', module.SYNTAX, flags=re.M)
            if found and found[1] not in words:
                words.append(found[1])
    return tuple(words)


@cache
def lark_parser() -> lark.Lark:
    """The LALR parser of one statement (compiled once)."""
    return lark.Lark(grammar_text(), parser="lalr", start="statement", propagate_positions=True)
