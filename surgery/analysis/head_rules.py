"""The rule for dropping query heads, written once for `check` (on the config's head counts)
and the `drop heads` pass's contract (on the graph's): grouped-query attention maps query head
h to key/value head h // group, so every key/value head must keep as many query heads as the
others, and at least one."""

from __future__ import annotations


def head_problems(heads: tuple[int, ...], num_heads: int, num_kv_heads: int, qk_norm: str = "none",
                  latent: bool = False) -> list[str]:  # fmt: skip
    """Why these query heads cannot be dropped from an attention of this shape (empty: they can).

    A Q norm over the whole projection (`qk_norm` "projection", OLMo 2) normalizes every head by
    all of them: a head cannot leave without changing the others. Multi-head latent attention
    (`latent`, DeepSeek) expands every head from one shared latent; dropping one is not modelled."""
    if latent:
        return ["multi-head latent attention's heads share one latent (dropping them is not supported yet)"]
    if qk_norm == "projection":
        return ["its Q norm spans every head together, so no head can be dropped alone"]
    outside = [h for h in heads if not 0 <= h < num_heads]
    if outside:
        return [f"head(s) {', '.join(map(str, outside))} outside 0..{num_heads - 1}"]
    group = num_heads // num_kv_heads
    per_group = [sum(1 for h in heads if h // group == kv) for kv in range(num_kv_heads)]
    if len(set(per_group)) > 1:
        return [
            f"each of the {num_kv_heads} key/value heads must lose as many of its {group} query heads as "
            f"the others; these take {', '.join(map(str, per_group))} from them"
        ]
    if per_group[0] >= group:
        return [f"every query head would be dropped (each key/value head has {group})"]
    return []
