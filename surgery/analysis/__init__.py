"""The middle's analyses: what the graph passes (surgery.passes) and the quantizers decide with.

Expert statistics and merging (`experts`), splitting a dense MLP into experts (`moe`), the rules
a check and its pass share (`expert_rules`, `head_rules`), GPTQ and its calibration
(`gptq`, `calibrated_quantization`), and MatMulNBits' blocks (`quantization`). Importance
metrics are the package beside it (surgery.importance). Nothing here knows the recipe language.
"""
