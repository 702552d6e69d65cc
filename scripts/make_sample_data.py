"""Writes data/sample/{train,eval}.jsonl: the embedded quickstart data set.

Learnable by construction: every pair shares one prompt and one sentence template, and the chosen answer uses
words from a positive list where the rejected one uses words from a negative list, so lengths match and only
word choice tells them apart. Eval pairs use item/template combinations that never occur in train.
Layout: MedicalGPT (`conversations` + `chosen` str + `rejected` str). Run: python scripts/make_sample_data.py
"""

import itertools
import json
import random
from pathlib import Path

ITEMS = ["hotel", "laptop", "movie", "restaurant", "phone", "book", "camera", "concert", "bike", "course",
         "museum", "jacket", "game", "train ride", "coffee shop", "podcast"]
PARTS = ["service", "battery", "ending", "staff", "screen", "price", "sound", "design", "support", "story"]
GOOD = ["excellent", "wonderful", "delightful", "superb", "fantastic", "pleasant", "reliable", "brilliant",
        "charming", "outstanding", "helpful", "lovely"]
BAD = ["terrible", "awful", "disappointing", "dreadful", "broken", "unpleasant", "unreliable", "boring",
       "rude", "poor", "frustrating", "horrible"]
TEMPLATES = [
    "The {item} was {a} and the {part} felt {b}.",
    "Honestly, the {item} is {a}; its {part} was {b} too.",
    "I found the {item} {a}, and the {part} was {b}.",
    "Overall a {a} {item} with {b} {part}.",
]
PROMPTS = ["Write a short review of the {item}.", "How was the {item}?", "Give your opinion on the {item}."]


def make_pair(rng: random.Random, item: str, template: str) -> dict:
    part = rng.choice(PARTS)
    good = rng.sample(GOOD, 2)
    bad = rng.sample(BAD, 2)
    prompt = rng.choice(PROMPTS).format(item=item)
    return {
        "conversations": [{"from": "human", "value": prompt}],
        "chosen": template.format(item=item, part=part, a=good[0], b=good[1]),
        "rejected": template.format(item=item, part=part, a=bad[0], b=bad[1]),
    }


def main() -> None:
    rng = random.Random(0)
    combos = list(itertools.product(ITEMS, TEMPLATES))
    rng.shuffle(combos)
    eval_combos, train_combos = combos[:12], combos[12:]
    splits = {"train": [make_pair(rng, *rng.choice(train_combos)) for _ in range(600)],
              "eval": [make_pair(rng, *rng.choice(eval_combos)) for _ in range(100)]}
    out = Path(__file__).resolve().parent.parent / "data" / "sample"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"wrote {len(rows)} pairs to {out / name}.jsonl")


if __name__ == "__main__":
    main()
