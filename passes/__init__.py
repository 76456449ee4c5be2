"""Graph passes, one file per recipe keyword (`drop attention` -> drop_attention.py).

Installed as `surgery.passes`. `PASSES` maps each recipe keyword to its pass class; the planner
creates pass instances from it and the pipeline runs them through `run_pass`, which checks
each pass's contract.
"""

from surgery.passes.base import GraphPass, OnnxPass, PassContractError, PassResult, run_pass
from surgery.passes.drop_attention import DropAttention
from surgery.passes.drop_block import DropBlock
from surgery.passes.drop_mlp import DropMlp
from surgery.passes.fuse import Fuse
from surgery.passes.merge_experts import MergeExperts
from surgery.passes.prune_experts import PruneExperts
from surgery.passes.quantize import Quantize
from surgery.passes.quantize_embedding import QuantizeEmbedding
from surgery.passes.quantize_kv_cache import QuantizeKVCache
from surgery.passes.split_mlp import SplitMlp

PASSES: dict[str, type[GraphPass]] = {
    cls.name: cls for cls in (DropAttention, DropMlp, DropBlock, SplitMlp, PruneExperts, Fuse)
}
# Built by its step with the scales it calibrated (surgery/front/statements/kv_cache.py), not from the step alone.
CALIBRATED_PASSES: dict[str, type[GraphPass]] = {QuantizeKVCache.name: QuantizeKVCache}
ONNX_PASSES: dict[str, type[OnnxPass]] = {cls.name: cls for cls in (Quantize, QuantizeEmbedding)}

__all__ = [
    "CALIBRATED_PASSES",
    "ONNX_PASSES",
    "PASSES",
    "DropAttention",
    "DropBlock",
    "DropMlp",
    "Fuse",
    "GraphPass",
    "OnnxPass",
    "PassContractError",
    "PassResult",
    "MergeExperts",
    "PruneExperts",
    "Quantize",
    "QuantizeEmbedding",
    "QuantizeKVCache",
    "SplitMlp",
    "run_pass",
]
