"""What a node needs from the exporter while it emits itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from surgery.export.options import ExportOptions
from surgery.export.writer import GraphWriter

if TYPE_CHECKING:
    from surgery.formats.precision import Precision
    from surgery.formats.weights import WeightFormat

MS = "com.microsoft"


class EmitContext(Protocol):
    """The exporter, as the nodes see it: the graph writer, the options, the element type."""

    w: GraphWriter
    options: ExportOptions
    linears: dict[str, str]  # exported linear name -> its MatMul node (for quantization passes)
    element: Precision  # the export's element type

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """A tensor as a numpy array in the export's element type."""
        ...

    def linear(
        self,
        linear: str,
        x: str,
        weight: torch.Tensor,
        weight_name: str,
        node: str,
        output: str | None = None,
        parameter: bool = True,
    ) -> str:
        """`x @ weight.T` for the linear layer `linear` ((out, in) weight); returns the output's name."""
        ...

    def scalar(self, value: float) -> str:
        """A scalar constant in the export's element type."""
        ...

    def quantizes(self, linear: str) -> bool:
        """Whether the export writes `linear` in a quantized weight format."""
        ...

    def quantized_lookup(self, table: torch.Tensor, ids: str, stored: WeightFormat) -> str:
        """The embedding's block-quantized lookup of `ids` in `table`, in format `stored`."""
        ...

    def pre(self, norm, name: str, scale: float | None = None, derived: bool = True) -> str:
        """The residual stream (any pending update added), normalized by `norm` when given, its
        gain times `scale` when given (a copy that is `derived`, not a parameter, by default)."""
        ...
