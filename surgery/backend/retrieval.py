"""Pass-key retrieval: does the output still find a fact far back in a long context?

The test of Mohtashami and Jaggi ("Landmark Attention", 2023), as long-context work reports it:
a five-digit pass key is stated once at some depth of a long filler text that says nothing,
and the model is asked for it at the end ("... The pass key is"). Each length is tried at
`depths` evenly spaced depths (start to end of the filler), one key per depth (seeded).

A key counts as found when greedy decoding would write it: the model's argmax at each position
of the answer, given the prompt and the key's tokens before it, is the key's next token
(teacher-forced, so one forward pass decides it, and the same criterion holds for the original
model in PyTorch and the output in onnxruntime). Both read the prompt a piece at a time
(surgery.backend.long_context), so a 32k prompt never holds 32k x 32k attention scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from surgery.backend.long_context import graph_windows_streamed, streamed_prefill
from surgery.progress import advance

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class RetrievalPrompt:
    """One prompt and its answer: `ids` holds both, the answer (the key's tokens) from `answer_at`."""

    ids: np.ndarray
    answer_at: int
    key: str
    length: int  # the length it was asked for
    depth: float  # where the key is: 0 = start, 1 = end of the filler


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> RetrievalPrompt:
    """A prompt of at most `length` tokens, answer included, with `key` stated at `depth`."""

    def tokens(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos, *ids] if bos is not None and getattr(tokenizer, "add_bos_token", False) else list(ids)

    fixed = len(tokens(INTRO + NEEDLE.format(key=key) + QUESTION + " " + key)) + 8  # slack for joins
    per_filler = max(1, len(tokens(FILLER * 8)) // 8)
    repeats = max(0, (length - fixed) // per_filler)
    while True:
        before = round(depth * repeats)
        prompt = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
        asked, whole = tokens(prompt), tokens(prompt + " " + key)
        if len(whole) <= length:
            break
        if repeats == 0:
            raise ValueError(f"a pass-key prompt takes {len(whole)} tokens without filler, more than {length}")
        repeats -= 1
    if whole[: len(asked)] != asked:  # the answer must start a token of its own
        raise ValueError("the tokenizer joins the question and the answer: the pass key cannot be scored")
    return RetrievalPrompt(np.array(whole, np.int64), len(asked), key, length, depth)


def retrieval_prompts(tokenizer, lengths: tuple[int, ...], depths: int, seed: int = 0) -> list[RetrievalPrompt]:
    """`depths` prompts per length, each with its own key (seeded)."""
    rng = random.Random(seed)
    spots = [step / (depths - 1) if depths > 1 else 0.5 for step in range(depths)]
    return [passkey_prompt(tokenizer, length, depth, str(rng.randint(10000, 99999)))
            for length in lengths for depth in spots]  # fmt: skip


def _found(prompt: RetrievalPrompt, pieces: Iterator[np.ndarray]) -> bool:
    """Whether the argmax at every answer position is the key's next token."""
    chosen = np.concatenate([piece.argmax(-1) for piece in pieces])
    answer = prompt.ids[prompt.answer_at :]
    return bool((chosen[prompt.answer_at - 1 : len(prompt.ids) - 1] == answer).all())


def found_by_output(model, prompts: list[RetrievalPrompt]) -> list[bool]:
    """Keys found by an output (an OnnxCausalLM with a KV cache), each prompt prefilled in pieces."""
    found = []
    for prompt in prompts:
        found.append(_found(prompt, streamed_prefill(model, prompt.ids[None])))
        advance("prompt")
    return found


def found_by_graph(graph, prompts: list[RetrievalPrompt], device: str | None = None) -> list[bool]:
    """Keys found by a DecoderGraph in PyTorch, layer-major (one layer loaded at a time)."""
    found: list[bool] = []
    each: Callable = lambda window, pieces: found.append(_found(prompts[len(found)], pieces))  # noqa: E731
    graph_windows_streamed(graph, [prompt.ids for prompt in prompts], each, device)
    return found


def summary(prompts: list[RetrievalPrompt], found: list[bool]) -> dict:
    """Accuracy per length, and each try."""
    lengths: dict[str, dict] = {}
    for prompt, hit in zip(prompts, found, strict=True):
        entry = lengths.setdefault(str(prompt.length), {"tries": []})
        entry["tries"].append({"depth": round(prompt.depth, 3), "tokens": len(prompt.ids), "key": prompt.key,
                               "found": hit})  # fmt: skip
    for entry in lengths.values():
        entry["accuracy"] = sum(t["found"] for t in entry["tries"]) / len(entry["tries"])
    return {"lengths": lengths, "accuracy": sum(found) / len(found) if found else 0.0}
