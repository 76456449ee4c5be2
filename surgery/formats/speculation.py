"""onnxruntime-genai 0.18's bounds on speculative decoding, read by `check` and by the draft step.

"max_draft_tokens (K) must be in [1, 16]"; n-gram drafting needs n-grams of 2 tokens or more.
"""

MAX_DRAFT_TOKENS = 16
MIN_NGRAM = 2
DEFAULT_NGRAM_TOKENS = 3  # K for n-gram drafting when the recipe does not give it: its proposals are short
