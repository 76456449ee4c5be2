"""The checker's rules for texts: that a named text exists, and that the calibration and
evaluation texts hold enough tokens (counted exactly when the tokenizer loads without weights)."""

from __future__ import annotations

import os

from surgery.calibration import (
    SHORTAGE_HINT,
    count_tokens,
    shortage,
)
from surgery.data import TextSource, TextSourceError, resolve_text
from surgery.front.checked import (
    MIN_PERPLEXITY_TOKENS,
    CheckedRecipe,
)
from surgery.models.loading import tokenizer_without_weights
from surgery.models.specs import ModelSpec
from surgery.source import Span

_TOKEN_COUNTS: dict[tuple[int, str, int], int] = {}


class TextChecks:
    """Texts and their token counts (a part of the checker, surgery/front/check.py)."""

    def text(self, name: str) -> TextSource | TextSourceError:
        """A named text resolved once per check (resolving reads the whole file to hash and check it)."""
        if name not in self.texts:
            try:
                self.texts[name] = resolve_text(name, self.base_dir)
            except TextSourceError as problem:
                self.texts[name] = problem
        return self.texts[name]

    def text_exists(self, name: str, span: Span | None) -> bool:
        """Whether a named text (built-in or file) exists; an error at `span` where it does not."""
        found = self.text(name)
        if isinstance(found, TextSourceError):
            self.error(str(found), span, found.hint)
            return False
        return True

    def tokenizer(self, spec: ModelSpec):
        """The model's tokenizer if it loads without weights (see `tokenizer_without_weights`), once."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = tokenizer_without_weights(spec)
        return self._tokenizer

    def tokens_in(self, name: str, spec: ModelSpec, enough: int) -> tuple[int, bool] | None:
        """(tokens, exact) in a text, counted up to `enough`: exactly with the model's tokenizer,
        else an upper bound (no token is shorter than a byte, bar one leading space marker)."""
        source = self.text(name)
        if isinstance(source, TextSourceError):
            return None  # reported where the text is named
        tokenizer = self.tokenizer(spec)
        if tokenizer is None:
            return os.path.getsize(source.path) + 1, False
        # Counted once per tokenizer, text (by content) and bound in a process that checks often.
        key = (id(tokenizer), source.sha256, enough)
        if key not in _TOKEN_COUNTS:
            _TOKEN_COUNTS[key] = count_tokens(tokenizer, source.read(), enough)
        return _TOKEN_COUNTS[key], True

    def calibration_fits(self, checked: CheckedRecipe, what: str | None = None) -> None:
        """The calibration (the statement's, or the defaults) fits the model and its text is long enough."""
        spec, index = checked.calibration, checked.index
        span = checked.calibration_span or checked.model_span
        if what is None:
            what = "calibration" if checked.calibration_span else f"the default calibration ({spec.describe()})"
        if not 2 <= spec.length <= index.max_positions:
            if checked.calibration_span is None:  # a statement's length is checked with the statement
                self.error(
                    f"{what} is longer than the model's context of {index.max_positions} tokens",
                    span,
                    f"ask for samples of at most {index.max_positions} tokens",
                )
            return
        needed = spec.samples * spec.length
        counted = self.tokens_in(spec.data, checked.spec, needed)
        if counted is None:
            return
        tokens, exact = counted
        problem = shortage(spec, tokens)
        if problem:
            if not exact:
                problem = problem.replace(f"has {tokens:,} tokens", f"has at most {tokens:,} tokens")
            self.error(problem, span, SHORTAGE_HINT)

    def evaluation_fits(self, checked: CheckedRecipe) -> None:
        """`verify perplexity`'s text has enough tokens to score."""
        check = checked.perplexity
        counted = self.tokens_in(check.data, checked.spec, MIN_PERPLEXITY_TOKENS)
        if counted is not None and counted[0] < MIN_PERPLEXITY_TOKENS:
            at_most = "" if counted[1] else "at most "
            self.error(
                f"'{check.data}' has {at_most}{counted[0]} tokens, too few for a perplexity",
                check.span,
                f"give a text of at least {MIN_PERPLEXITY_TOKENS} tokens",
            )
