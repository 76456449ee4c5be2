"""Context-faithfulness QA: does the model answer from the passage it is given?

Each item is a short passage that states an invented or altered fact among distractor
sentences, and a question that asks for that fact. An answer *follows the passage* when the
greedy continuation contains the passage's answer; for altered real-world facts we also count
answers that give the real (parametric) fact instead. Items are generated from templates with
a seeded random generator, so `generate(seed)` always gives the same set.

    python benchmarks/faithfulness.py generate -o items.jsonl [--seed 0] [--per-template 50]
    python benchmarks/faithfulness.py score OUT [OUT ...] [--items items.jsonl] [--json result.json]

`score` runs any output folder of `surgery apply` (or any folder OnnxCausalLM can run).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402

COUNTRIES = {  # country: (real capital, real language)
    "France": ("Paris", "French"), "Germany": ("Berlin", "German"), "Italy": ("Rome", "Italian"),
    "Spain": ("Madrid", "Spanish"), "Japan": ("Tokyo", "Japanese"), "Egypt": ("Cairo", "Arabic"),
    "Russia": ("Moscow", "Russian"), "Greece": ("Athens", "Greek"), "Portugal": ("Lisbon", "Portuguese"),
    "Sweden": ("Stockholm", "Swedish"), "Norway": ("Oslo", "Norwegian"), "Poland": ("Warsaw", "Polish"),
    "China": ("Beijing", "Chinese"), "Turkey": ("Ankara", "Turkish"), "Austria": ("Vienna", "German"),
    "Ireland": ("Dublin", "English"), "Kenya": ("Nairobi", "Swahili"), "Peru": ("Lima", "Spanish"),
    "Canada": ("Ottawa", "English"), "Australia": ("Canberra", "English"), "Finland": ("Helsinki", "Finnish"),
    "Hungary": ("Budapest", "Hungarian"), "Brazil": ("Brasilia", "Portuguese"), "India": ("Delhi", "Hindi"),
    "Mexico": ("Mexico City", "Spanish"),
}  # fmt: skip
CITIES = ["Lyon", "Munich", "Milan", "Seville", "Osaka", "Alexandria", "Kazan", "Patras", "Porto", "Malmo",
          "Bergen", "Krakow", "Shanghai", "Izmir", "Graz", "Cork", "Mombasa", "Cusco", "Toronto", "Perth",
          "Tampere", "Debrecen", "Recife", "Mumbai", "Cancun", "Geneva", "Bruges", "Utrecht", "Salzburg"]  # fmt: skip
LANGUAGES = ["Dutch", "Finnish", "Icelandic", "Welsh", "Basque", "Latvian", "Maltese", "Estonian", "Korean",
             "Thai", "Danish", "Czech", "Romanian", "Swahili", "Greek", "Polish"]  # fmt: skip
NAMES = ["Maria Keller", "Tomas Brandt", "Aiko Tanaka", "Lena Novak", "Omar Haddad", "Priya Raman",
         "Jonas Berg", "Sofia Moreau", "Ravi Menon", "Elena Petrova", "Lucas Ferreira", "Nora Lindqvist",
         "Hugo Laurent", "Mei Chen", "Ivan Horvat", "Clara Weiss", "Samuel Okafor", "Ana Silva"]  # fmt: skip
PLACES = ["Veltrax", "Dunmore Vale", "Kestrel Bay", "Orlandia", "Maplecross", "Thornwick", "Brightwater",
          "Silverfield", "Ravenholm", "Eastwick", "Ashbury", "Glenmoor", "Highcastle", "Larkspur"]  # fmt: skip
ROLES = ["mayor", "head librarian", "chief engineer", "school principal", "harbour master", "town doctor"]
OBJECTS = ["front door", "old bicycle", "kitchen table", "garden fence", "winter coat", "car"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "pink"]
RIVERS = ["Orlan", "Vessa", "Kimbro", "Taluna", "Dravik", "Soren", "Meltha", "Quarra", "Belun", "Istra"]
FILLERS = [
    "The weather was mild for most of the year.", "Many visitors arrive by train in the summer.",
    "A small market opens every Saturday morning.", "The local football club was founded long ago.",
    "Most houses in the old town are built of stone.", "The library stays open late on Thursdays.",
    "A new bridge was finished two years ago.", "Fishing boats leave the harbour before dawn.",
    "The museum has a large collection of maps.", "Children learn to swim in the lake nearby.",
]  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One question: the prompt, the passage's answer, and the real-world answer if the fact is altered."""

    id: str
    kind: str
    prompt: str
    answer: str
    parametric: str | None


def _prompt(sentences: list[str], question: str) -> str:
    passage = " ".join(sentences)
    return f"Answer the question using the passage.\nPassage: {passage}\nQuestion: {question}\nAnswer:"


def _passage(rng: random.Random, fact: str, distractors: list[str]) -> list[str]:
    sentences = [fact, *distractors, rng.choice(FILLERS)]
    rng.shuffle(sentences)
    return sentences


def generate(seed: int = 0, per_template: int = 50) -> list[Item]:
    """The item set: five templates, `per_template` items each, fully determined by `seed`."""
    rng = random.Random(seed)
    items: list[Item] = []
    countries = list(COUNTRIES)

    def add(kind: str, i: int, fact: str, distractor: str, question: str, answer: str, real: str | None) -> None:
        sentences = _passage(rng, fact, [distractor])
        items.append(Item(f"{kind.split()[-1]}-{i}", kind, _prompt(sentences, question), answer, real))

    for i in range(per_template):
        country = rng.choice(countries)
        capital, language = COUNTRIES[country]
        city = rng.choice(CITIES)
        other = rng.choice([c for c in countries if c != country])
        add(
            "altered capital",
            i,
            f"The capital of {country} is {city}.",
            f"The capital of {other} is {COUNTRIES[other][0]}.",
            f"What is the capital of {country}?",
            city,
            capital,
        )
        spoken = rng.choice([lang for lang in LANGUAGES if lang != language])
        add(
            "altered language",
            i,
            f"People in {country} speak {spoken}.",
            f"The capital of {country} is {capital}.",
            f"What language do people in {country} speak?",
            spoken,
            language,
        )
        role, place = rng.choice(ROLES), rng.choice(PLACES)
        name, other_name = rng.sample(NAMES, 2)
        other_role = rng.choice([r for r in ROLES if r != role])
        add(
            "invented person",
            i,
            f"The {role} of {place} is {name}.",
            f"The {other_role} of {place} is {other_name}.",
            f"Who is the {role} of {place}?",
            name,
            None,
        )
        owner = rng.choice(NAMES).split()[0]
        thing, other_thing = rng.sample(OBJECTS, 2)
        color, other_color = rng.sample(COLORS, 2)
        add(
            "invented color",
            i,
            f"The {thing} in {owner}'s house is {color}.",
            f"The {other_thing} in {owner}'s house is {other_color}.",
            f"What color is the {thing} in {owner}'s house?",
            color,
            None,
        )
        river, other_river = rng.sample(RIVERS, 2)
        length, other_length = rng.sample(range(120, 990), 2)
        add(
            "invented number",
            i,
            f"The {river} river is {length} kilometres long.",
            f"The {other_river} river is {other_length} kilometres long.",
            f"How long is the {river} river?",
            str(length),
            None,
        )
    return items  # fmt: skip


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _contains(text: str, answer: str) -> bool:
    return answer.lower() in text.lower()


def score(folder: str, items: list[Item], max_new_tokens: int = 8, threads: int | None = None) -> dict:
    """Greedy answers of one output folder: share that follows the passage, and per kind."""
    import numpy as np  # noqa: F401  (onnxruntime needs it loaded first in some builds)
    from transformers import AutoTokenizer

    from surgery.backend.runtime import OnnxCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = OnnxCausalLM(folder, threads=threads)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    started = time.perf_counter()
    rows = []
    for item in items:
        ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(model.generate(ids, max_new_tokens, eos_ids), skip_special_tokens=True)
        answer = text.strip().split("\n")[0]
        rows.append(
            {
                "id": item.id,
                "kind": item.kind,
                "output": answer,
                "follows_passage": _contains(answer, item.answer),
                "parametric": item.parametric is not None and _contains(answer, item.parametric),
            }
        )
    kinds = sorted({r["kind"] for r in rows})
    return {
        "folder": folder,
        "items": len(rows),
        "accuracy": sum(r["follows_passage"] for r in rows) / len(rows),
        "parametric_answers": sum(r["parametric"] for r in rows) / len(rows),
        "by_kind": {k: _share([r["follows_passage"] for r in rows if r["kind"] == k]) for k in kinds},
        "seconds": round(time.perf_counter() - started, 1),
        "answers": rows,
    }


def load_items(path: str) -> list[Item]:
    """Items from a JSON-lines file written by `generate`."""
    with open(path, encoding="utf-8") as handle:
        return [Item(**json.loads(line)) for line in handle if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write the item set as JSON lines")
    gen.add_argument("-o", "--output", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--per-template", type=int, default=50)
    sc = commands.add_parser("score", help="answer every item with each output folder")
    sc.add_argument("folders", nargs="+", metavar="OUT")
    sc.add_argument("--items", help="JSON lines from `generate` (default: generate(seed 0))")
    sc.add_argument("--json", help="write the full result here")
    sc.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.command == "generate":
        items = generate(args.seed, args.per_template)
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(asdict(item)) + "\n" for item in items)
        print(f"wrote {len(items)} items to {args.output}")
        return
    items = load_items(args.items) if args.items else generate()
    results = [score(folder, items, threads=args.threads) for folder in args.folders]
    print(f"{'output folder':40} {'follows passage':>16} {'parametric':>11}")
    for r in results:
        print(f"{r['folder']:40} {r['accuracy']:16.1%} {r['parametric_answers']:11.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
