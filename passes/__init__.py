"""Graph passes, one file per recipe keyword (`drop attention` -> drop_attention.py).

Installed as `surgery.passes`. `PASSES` maps each recipe keyword to its pass class; the planner
creates pass instances from it and the pipeline runs them through `run_pass`, which checks
each pass's contract.
"""

from surgery.passes.base import GraphPass, PassContractError, PassResult, run_pass
from surgery.passes.drop_attention import DropAttention
from surgery.passes.drop_block import DropBlock
from surgery.passes.drop_mlp import DropMlp

PASSES: dict[str, type[GraphPass]] = {cls.name: cls for cls in (DropAttention, DropMlp, DropBlock)}

__all__ = [
    "PASSES",
    "DropAttention",
    "DropBlock",
    "DropMlp",
    "GraphPass",
    "PassContractError",
    "PassResult",
    "run_pass",
]
