"""Speculative decoding with a draft: its tensors shared with the target's, the number of tokens
to draft, the acceptance it should reach, and what onnxruntime-genai measures.

- `share_tensors` writes the draft's graph beside the target's and points every tensor whose
  name, type, shape and bytes equal one of the target's at the target's data file: a
  layer-dropped draft adds almost nothing, a quantized one its own quantized tensors only.
- `top1_agreement`: how often the draft's most likely next token is the target's, teacher-forced
  on text; `greedy_text_agreement` on the target's own greedy continuations of prompts. With
  greedy search genai accepts a drafted token exactly when it is the target's choice, so the
  latter predicts the acceptance rate (within 0.02 on SmolLM2's drafts, issue 27); agreement on
  the calibration text itself runs lower, since greedy text is easier to predict than prose.
- `best_draft_tokens`: K for an acceptance rate `a` and a draft that costs `c` of a target
  step, by the expected speed-up of Leviathan et al. (2023), (1 - a^(K+1)) / ((1 - a)(K c + 1)).
- `genai_speculation`: greedy generation in onnxruntime-genai with and without the draft on
  several prompts, interleaved round by round: the tokens must be equal; the acceptance rate
  and tokens per second are measured.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from surgery.backend.evaluate import whole
from surgery.diagnostics import HintedError
from surgery.progress import advance


class GenaiUnavailable(HintedError):
    """onnxruntime-genai is not installed: the hint names the extra that brings it."""


_COPY_BYTES = 64 << 20  # tensors are compared and copied this much at a time
_ALIGN = 64


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _same_bytes(a, a_offset: int, b, b_offset: int, length: int) -> bool:
    done = 0
    while done < length:
        size = min(_COPY_BYTES, length - done)
        a.seek(a_offset + done)
        b.seek(b_offset + done)
        if a.read(size) != b.read(size):
            return False
        done += size
    return True


def share_tensors(target: Path, draft_folder: Path, name: str = "draft.onnx") -> dict[str, int]:
    """Write the draft model of `draft_folder` into `target` as `name` (+ `name`.data): tensors
    equal to one of the target's (same name, type, shape and bytes) read the target's data file,
    the rest are copied, a tensor at a time. Returns the bytes shared and the bytes of its own."""
    target_model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    theirs = {t.name: t for t in target_model.graph.initializer if _external(t)}
    model = onnx.load(str(draft_folder / "model.onnx"), load_external_data=False)
    shared = own = 0
    opened: dict[str, object] = {}

    def handle(folder: Path, location: str):
        key = str(folder / location)
        if key not in opened:
            opened[key] = open(key, "rb")  # noqa: SIM115 (closed below, all at once)
        return opened[key]

    data_name = name + ".data"
    try:
        with open(target / data_name, "wb") as out:
            for tensor in model.graph.initializer:
                where = _external(tensor)
                if where is None:
                    continue
                offset, length = int(where.get("offset", 0)), int(where["length"])
                source = handle(draft_folder, where["location"])
                twin = theirs.get(tensor.name)
                twin_where = _external(twin) if twin is not None else None
                if (
                    twin_where is not None
                    and (twin.data_type, list(twin.dims)) == (tensor.data_type, list(tensor.dims))
                    and int(twin_where["length"]) == length
                    and _same_bytes(source, offset, handle(target, twin_where["location"]),
                                    int(twin_where.get("offset", 0)), length)  # fmt: skip
                ):
                    _set_external(tensor, twin_where["location"], int(twin_where.get("offset", 0)), length)
                    shared += length
                    continue
                out.write(b"\0" * (-out.tell() % _ALIGN))
                start = out.tell()
                source.seek(offset)
                remaining = length
                while remaining:
                    chunk = source.read(min(_COPY_BYTES, remaining))
                    out.write(chunk)
                    remaining -= len(chunk)
                _set_external(tensor, data_name, start, length)
                own += length
    finally:
        for opened_file in opened.values():
            opened_file.close()
    if own == 0:
        os.remove(target / data_name)
    onnx.save(model, str(target / name))
    return {"shared_bytes": shared, "own_bytes": own}


def logits_of(model):
    """The logits function (ids (1, T) -> (T, vocabulary)) of an OnnxCausalLM, from an empty cache."""

    def run(ids: np.ndarray) -> np.ndarray:
        return model.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None]).logits[0]

    return run


def top1_agreement(target_logits, draft_logits, windows: list[np.ndarray]) -> dict[str, float | int]:
    """How often the draft's argmax equals the target's over every position of `windows`
    (teacher-forced on the same tokens, each window from an empty cache)."""
    agree = total = 0
    for ids in windows:
        batch = ids[None].astype(np.int64)
        a = whole(target_logits(batch)).argmax(-1)
        b = whole(draft_logits(batch)).argmax(-1)
        agree += int((a == b).sum())
        total += int(a.size)
        advance("window")
    return {"top1_agreement": agree / max(1, total), "positions": total}


def greedy_text_agreement(target, target_logits, draft_logits, prompts: list[np.ndarray], new_tokens: int) -> dict:
    """Top-1 agreement of draft and target on the target's own greedy continuations of `prompts`
    (`target`: an OnnxCausalLM that generates them): the text speculation will see, so the
    closest prediction of genai's acceptance. Positions predicting generated tokens only."""
    agree = total = 0
    for prompt in prompts:
        generated = target.generate([int(t) for t in prompt], new_tokens, set())
        ids = np.array([[*map(int, prompt), *generated]], np.int64)
        start = len(prompt) - 1  # the position that predicts the first generated token
        a = target_logits(ids)[start:-1].argmax(-1)
        b = draft_logits(ids)[start:-1].argmax(-1)
        agree += int((a == b).sum())
        total += int(a.size)
    return {"greedy_text_agreement": agree / max(1, total), "greedy_text_positions": total}


def expected_speedup(acceptance: float, cost: float, k: int) -> float:
    """Leviathan et al.'s expected speed-up of drafting `k` tokens at `acceptance`, the draft
    costing `cost` of a target step."""
    a = min(acceptance, 0.999999)
    return (1 - a ** (k + 1)) / ((1 - a) * (k * cost + 1))


def best_draft_tokens(acceptance: float, cost: float, most: int = 16) -> int:
    """The K of 1..`most` with the highest expected speed-up."""
    return max(range(1, most + 1), key=lambda k: expected_speedup(acceptance, cost, k))


def config_view(folder: Path, view: Path, edit) -> Path:
    """`view`: links to every file of the output `folder` but genai_config.json, which is
    `edit(config)` of the folder's: the same model run by onnxruntime-genai another way."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for entry in os.listdir(folder):
        if entry != "genai_config.json":
            os.symlink(Path(folder) / entry, view / entry)
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    edit(config)
    (view / "genai_config.json").write_text(json.dumps(config, indent=4))
    return view


def _without_draft(config: dict) -> None:
    config["model"].pop("draft", None)
    config.pop("speculative", None)


def _generate(og, model, tokenizer, prompt: str, new_tokens: int) -> tuple[list[int], float, dict]:
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    stats: dict = {}
    while not generator.is_done():
        generator.generate_next_token()
        stats = generator.get_speculative_stats() or stats  # reset once generation is done
    seconds = time.perf_counter() - start
    return [int(t) for t in generator.get_sequence(0)][len(ids) :], seconds, stats


def genai_speculation(folder: Path, scratch: Path, prompts: tuple[str, ...], new_tokens: int,
                      rounds: int = 3) -> dict:  # fmt: skip
    """Greedy generation in onnxruntime-genai from the folder as it is (with its draft) and from
    the target alone, interleaved round by round (each round opens one, generates from every
    prompt, and releases it before the other opens: the target is never held twice): whether
    the tokens are equal, the acceptance rate (drafted tokens accepted over drafted tokens
    checked) and tokens per second (the median round of each). Raises GenaiUnavailable
    without onnxruntime-genai."""
    import gc

    try:
        import onnxruntime_genai as og
    except ImportError as error:
        raise GenaiUnavailable("onnxruntime-genai is not installed", "pip install 'surgery[genai]'") from error

    folders = {"target": config_view(folder, scratch / "target-alone", _without_draft), "with_draft": folder}
    times = {name: [[] for _ in prompts] for name in folders}
    tokens: dict[str, list[list[int]]] = {}
    stats: list[dict] = [{} for _ in prompts]
    for _ in range(rounds):
        for name, path in folders.items():
            model = og.Model(str(path))
            tokenizer = og.Tokenizer(model)
            generated = []
            for position, prompt in enumerate(prompts):
                new, seconds, round_stats = _generate(og, model, tokenizer, prompt, new_tokens)
                generated.append(new)
                times[name][position].append(seconds)
                if name == "with_draft":
                    stats[position] = round_stats
            tokens[name] = generated
            del model, tokenizer
            gc.collect()
    per_prompt = []
    for position, prompt in enumerate(prompts):
        count = len(tokens["target"][position])
        evaluated = stats[position].get("draft_tokens_evaluated", 0)
        target_rate = count / statistics.median(times["target"][position])
        draft_rate = count / statistics.median(times["with_draft"][position])
        per_prompt.append({
            "prompt": prompt,
            "tokens": count,
            "equal": tokens["target"][position] == tokens["with_draft"][position],
            "acceptance": stats[position].get("draft_tokens_accepted", 0) / evaluated if evaluated else None,
            "target_tokens_per_second": target_rate,
            "with_draft_tokens_per_second": draft_rate,
            "speedup": draft_rate / target_rate,
        })  # fmt: skip
    accepted = [e["acceptance"] for e in per_prompt if e["acceptance"] is not None]
    return {
        "prompts": per_prompt,
        "tokens_equal": all(e["equal"] for e in per_prompt),
        "acceptance": statistics.mean(accepted) if accepted else None,
        "speedup": statistics.median(e["speedup"] for e in per_prompt),
        "new_tokens": new_tokens,
        "rounds": rounds,
    }


def _trimmed(present: list, length: int) -> list:
    """The KV cache cut back to its first `length` positions (the drafts that were rejected go);
    as it is when nothing was rejected (no copy of the cache on the rounds that accept all)."""
    import onnxruntime as ort

    cut = []
    for value in present:
        is_ort = isinstance(value, ort.OrtValue)
        if (value.shape() if is_ort else value.shape)[2] == length:
            cut.append(value)
            continue
        array = value.numpy() if is_ort else value
        cut.append(np.ascontiguousarray(array[:, :, :length]))
    return cut


def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: set[int],
                         k: int) -> tuple[list[int], dict[str, int]]:  # fmt: skip
    """Greedy decoding of `target` (an OnnxCausalLM with a KV cache) with `draft` proposing `k`
    tokens a round, which the target checks in one step: the target's own greedy tokens, and
    how many drafted tokens it accepted of those it checked.

    Each round the draft is fed the committed tokens it has not seen and proposes k tokens; the
    target reads the last committed token and the k drafts at once, keeps the drafts up to the
    first it would not have chosen, and adds its own token there. Both caches are then cut back
    to the committed tokens (the target's holds all but the last)."""
    committed = list(prompt_ids)
    new_tokens: list[int] = []
    accepted = checked = 0

    def feed(model, past, seen: int, tokens: list[int]):
        ids = np.array([tokens], np.int64)
        mask = np.ones((1, seen + len(tokens)), np.int64)
        positions = np.arange(seen, seen + len(tokens))[None]
        return model.step(ids, mask, positions, past)

    out = feed(target, None, 0, committed)
    committed.append(int(out.logits[0, -1].argmax()))
    new_tokens.append(committed[-1])
    target_past, target_seen = out.present, len(committed) - 1
    draft_past, draft_seen = None, 0
    while len(new_tokens) < max_new_tokens and new_tokens[-1] not in eos_token_ids:
        proposals: list[int] = []
        pending = committed[draft_seen:]
        for _ in range(min(k, max_new_tokens - len(new_tokens))):
            out = feed(draft, draft_past, draft_seen, pending)
            draft_past, draft_seen = out.present, draft_seen + len(pending)
            proposals.append(int(out.logits[0, -1].argmax()))
            pending = proposals[-1:]
        out = feed(target, target_past, target_seen, [committed[-1], *proposals])
        choices = out.logits[0].argmax(-1)
        n = 0
        while n < len(proposals) and proposals[n] == int(choices[n]):
            n += 1
        accepted, checked = accepted + n, checked + len(proposals)
        before = len(committed)
        for token in [*proposals[:n], int(choices[n])]:
            if len(new_tokens) == max_new_tokens or new_tokens[-1] in eos_token_ids:
                break
            committed.append(token)
            new_tokens.append(token)
        target_seen = len(committed) - 1
        target_past = _trimmed(out.present, target_seen)
        draft_seen = min(draft_seen, before + n)  # its cache holds the drafts that were kept, no more
        draft_past = _trimmed(draft_past, draft_seen)
    return new_tokens, {"draft_tokens_accepted": accepted, "draft_tokens_checked": checked}
