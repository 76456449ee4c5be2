"""surgery: a declarative model-surgery compiler.

A `.surg` recipe describes structural edits to a Hugging Face causal LM; `surgery apply` turns it
into an ONNX Runtime model plus a report proving the result computes what the recipe says.
The whole pipeline, in order, lives in :mod:`surgery.pipeline`; the Python API is
`surgery.check`, `surgery.plan` and `surgery.apply` (:mod:`surgery.api`, docs/api.md), imported
on first use so that `import surgery` stays light.
"""

import os as _os

__version__ = "0.1.0"

# The card's layout keeps passes/ and grammar/ beside surgery/; an install maps them to
# surgery.passes and surgery.grammar (see pyproject.toml). When this package is imported from
# a source checkout instead (`python -m surgery` in the repository), look there too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "passes")) and _os.path.isfile(
    _os.path.join(_checkout, "passes", "base.py")
):
    __path__.append(_checkout)  # noqa: F821  (a package's __path__)


_API = ("check", "plan", "apply", "Applied", "RecipeError", "OutputError", "HintedError")


def __getattr__(name: str):
    """The Python API (surgery.api), imported on first use."""
    if name in _API:
        from surgery import api

        return getattr(api, name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
