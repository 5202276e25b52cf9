#!/usr/bin/env python3
"""Write a synthetic parallel corpus of any size, for memory and speed tests of data preparation
and training (it is generated, never committed).

    python scripts/make_synthetic_corpus.py OUT_DIR --pairs 2000000 [--valid 1000] [--seed 1]

OUT_DIR gets train.src/train.tgt and valid.src/valid.tgt in the layout `mt data` writes, so
`mt train` reads it with `data: {dir: OUT_DIR, src: src, tgt: tgt}`. Source sentences are 3-30
words drawn (Zipf-like) from a 20,000-word invented lexicon; the target translates each word
through a fixed dictionary and reverses the order, so there is something to learn.
"""

from __future__ import annotations

import argparse
import random
from itertools import accumulate
from pathlib import Path

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["ch", "sch", "ei", "au"]


def lexicon(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--valid", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    source_words = lexicon(rng, 20_000)
    target_words = lexicon(rng, 40_000)[20_000:]
    translation = dict(zip(source_words, target_words))
    weights = list(accumulate(1 / rank for rank in range(1, len(source_words) + 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.pairs), ("valid", args.valid)):
        with open(args.out / f"{split}.src", "w") as src, open(args.out / f"{split}.tgt", "w") as tgt:
            for _ in range(count):
                words = rng.choices(source_words, cum_weights=weights, k=rng.randint(3, 30))
                src.write(" ".join(words) + "\n")
                tgt.write(" ".join(translation[w] for w in reversed(words)) + "\n")
    print(f"wrote {args.pairs:,} training and {args.valid:,} validation pairs to {args.out}")


if __name__ == "__main__":
    main()
