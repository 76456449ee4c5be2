"""Which checkpoint tensors make each model parameter, when transformers converts on loading.

transformers 5 stores a mixture-of-experts layer's experts fused (`mlp.experts.gate_up_proj`,
(experts, 2 x intermediate, hidden)) while checkpoints keep one tensor per expert and
projection (`block_sparse_moe.experts.3.w1.weight`), and some families rename keys. Loading
such a checkpoint eagerly fuses the whole model in memory. Here the same conversion is read
from transformers' own table (`transformers.conversion_mapping`) and turned into a recipe per
parameter, so a lazily loaded model (`surgery.models.lazy`) builds one layer's fused experts
from the checkpoint when that layer is loaded, and nothing else.

Supported: renamings by plain substring, and converters made of `MergeModulelist` (stack the
per-expert tensors) and `Concatenate` (join the sources' stacks along a dimension). Anything
else (a regex renaming, a split, a transpose) makes `sources` return None and the model is
loaded eagerly, as before.

gpt-oss ships its experts in MXFP4 (`gate_up_proj_blocks`: 4-bit codes two to a byte, 32 to a
block; `gate_up_proj_scales`: one power-of-two exponent per block). Such a parameter is made by
dequantizing its two tensors when its layer loads (`dequantize_mxfp4`), as transformers does
for the whole model at once where no MXFP4 kernel runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"^[\w.]+$")  # a pattern that means the same as a substring and as a regex


@dataclass(frozen=True)
class Source:
    """How one model parameter is made from checkpoint tensors.

    `groups[i]` lists the tensors of source pattern i in expert order; with `stacked`, each
    group is stacked into a new first dimension, and the groups are then concatenated along
    `dim` (a group of one tensor, not stacked, is that tensor as stored, possibly renamed).
    """

    groups: tuple[tuple[str, ...], ...]
    stacked: bool = False
    dim: int = 0
    mxfp4: bool = False  # groups: ((blocks,), (scales,)) of an MXFP4 tensor, dequantized

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The parameter's shape, from the sources' shapes; None if they do not fit together."""
        if self.mxfp4:  # blocks (experts, out, blocks, 16 bytes) -> (experts, in, out)
            experts, out, blocks, width = shapes[self.groups[0][0]]
            return (experts, blocks * width * 2, out) if shapes[self.groups[1][0]] == (experts, out, blocks) else None
        parts = []
        for group in self.groups:
            first = shapes[group[0]]
            if any(shapes[name] != first for name in group):
                return None
            parts.append((len(group), *first) if self.stacked else first)
        if len(parts) == 1:
            return tuple(parts[0])
        base = list(parts[0])
        if self.dim >= len(base) or any(len(p) != len(base) for p in parts):
            return None
        for other in parts[1:]:
            if [b for i, b in enumerate(base) if i != self.dim] != [o for i, o in enumerate(other) if i != self.dim]:
                return None
            base[self.dim] += other[self.dim]
        return tuple(base)


def _rules(model_type: str) -> tuple[list[tuple[str, str]], list[tuple[list[str], str, bool, int]]] | None:
    """(renamings (checkpoint, model), converters (sources, target, stacked, dim)) of a family,
    or None when its table has an operation this module does not reproduce."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return [], []
    renamings, converters = [], []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        kind = type(rule).__name__
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if len(targets) != 1 or not all(_PLAIN.match(p.replace("*", "")) for p in [*sources, *targets]):
            return None
        if kind == "WeightRenaming" and len(sources) == 1:
            renamings.append((sources[0], targets[0]))
            continue
        operations = [type(op).__name__ for op in getattr(rule, "operations", [])]
        if kind != "WeightConverter" or not set(operations) <= {"MergeModulelist", "Concatenate"}:
            return None
        concat = [op for op in rule.operations if type(op).__name__ == "Concatenate"]
        if len(sources) > 1 and not concat:
            return None
        dim = int(concat[0].dim) if concat else 0
        converters.append((sources, targets[0], "MergeModulelist" in operations, dim))
    return renamings, converters


def sources(model_type: str, parameters: list[str], stored: set[str]) -> dict[str, Source] | None:
    """For each parameter not stored under its own name, how to make it from stored tensors; None
    when some parameter cannot be made (the eager load then reports or converts it)."""
    rules = _rules(model_type)
    if rules is None:
        return None
    renamings, converters = rules
    found: dict[str, Source] = {}
    for name in parameters:
        if name in stored:
            continue
        stored_name = name
        for checkpoint_part, model_part in renamings:  # back to the checkpoint's spelling
            stored_name = stored_name.replace(model_part, checkpoint_part)
        if stored_name in stored:
            found[name] = Source(((stored_name,),))
            continue
        if f"{stored_name}_blocks" in stored and f"{stored_name}_scales" in stored:  # gpt-oss's MXFP4 experts
            found[name] = Source(((f"{stored_name}_blocks",), (f"{stored_name}_scales",)), mxfp4=True)
            continue
        made = None
        for patterns, target, stacked, dim in converters:
            if not stored_name.endswith(target):
                continue
            groups = []
            for pattern in patterns:
                template = stored_name[: -len(target)] + pattern
                if stacked and "*" in template:
                    group = []
                    while template.replace("*", str(len(group))) in stored:
                        group.append(template.replace("*", str(len(group))))
                else:
                    group = [template] if template in stored else []
                if not group:
                    break
                groups.append(tuple(group))
            else:
                made = Source(tuple(groups), stacked, dim)
                break
        if made is None:
            return None
        found[name] = made
    return found


# The 16 values of an MXFP4 (e2m1) code, by code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales, dtype):
    """(experts, in, out) weights from MXFP4 `blocks` (experts, out, groups, 16 bytes: the low
    nibble first) and `scales` (experts, out, groups: the exponent + 127), in `dtype`."""
    import torch

    table = torch.tensor(FP4_VALUES, dtype=dtype)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], -1).long()
    values = torch.ldexp(table[codes], (scales.to(torch.int32) - 127)[..., None].to(dtype))
    return values.reshape(*blocks.shape[:2], -1).transpose(1, 2).contiguous()
