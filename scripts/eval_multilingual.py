#!/usr/bin/env python3
"""A multilingual model on a multi-way test set: every trained direction, every zero-shot one, and
the zero-shot ones again through a pivot language.

    python scripts/eval_multilingual.py RUN_DIR [--data data/multi30k] [--split test] [--pivot en]
        [--beam 5] [--json results.json]

Prints per direction BLEU and chrF (sacreBLEU, signatures at the end), sentences/s, and the
off-target rate: the share of outputs a language identifier does not recognise as the requested
language. The identifier is py3langid (pip install py3langid; its model ships in the package, no
download), restricted to the model's languages; its own error rate on the references of each
language is printed too, as the floor that rate cannot go below.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.data import read_lines  # noqa: E402
from mt.evaluate import corpus_scores  # noqa: E402
from mt.translate import Translator, pivot_chunks  # noqa: E402


def language_identifier(languages: list[str]):
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        sys.exit("the off-target rate needs py3langid: pip install py3langid")
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    identifier.set_languages(languages)
    return identifier


def off_target(identifier, texts: list[str], lang: str) -> tuple[float, str]:
    """The % of non-blank `texts` not identified as `lang`, and the languages they were taken for."""
    found = [identifier.classify(text)[0] for text in texts if text.strip()]
    wrong = Counter(code for code in found if code != lang)
    share = 100.0 * sum(wrong.values()) / max(1, len(found))
    return share, " ".join(f"{code}:{n}" for code, n in wrong.most_common())


def translate(translator: Translator, lines: list[str], tgt: str, beam: int, pivot: str | None) -> list[str]:
    options = translator.options(beam=beam, tgt_lang=tgt)
    if pivot is None:
        return [found[0].text for found in translator.translate(lines, options)]
    first = translator.options(beam=beam, tgt_lang=pivot)
    return [found[0].text for found in pivot_chunks(translator, translator, [lines], first, options)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, help="multi-way corpus directory (default: the run's data.dir)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pivot", default="en", help="pivot language of the zero-shot directions ('' for none)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    translator = Translator(args.run_dir, device=args.device, engine="torch")
    data = args.data or Path(translator.config.data.dir)
    trained = translator.directions
    languages = sorted({lang for name in trained for lang in name.split("-")})
    targets = translator.target_languages
    texts = {lang: read_lines(data / f"{args.split}.{lang}") for lang in languages}
    identifier = language_identifier(languages)
    print(f"{args.run_dir} on {data}/{args.split}.*, beam {args.beam}; languages {', '.join(languages)}")
    floor = {lang: off_target(identifier, texts[lang], lang)[0] for lang in languages}
    print(
        "language identifier on the references (% not recognised): "
        + ", ".join(f"{lang} {rate:.1f}" for lang, rate in floor.items())
    )
    runs = [(name, None) for name in trained]
    zero_shot = [f"{s}-{t}" for s in languages for t in targets if s != t and f"{s}-{t}" not in trained]
    runs += [(name, None) for name in zero_shot]
    if args.pivot:
        runs += [(name, args.pivot) for name in zero_shot if args.pivot not in name.split("-")]
    print(f"{'direction':<12}{'kind':<14}{'BLEU':>7}{'chrF':>7}{'off-target %':>14}{'sent/s':>9}  taken for")
    results, signature = [], None
    for name, pivot in runs:
        src, tgt = name.split("-")
        started = time.perf_counter()
        hyps = translate(translator, texts[src], tgt, args.beam, pivot)
        seconds = time.perf_counter() - started
        scores = corpus_scores(hyps, texts[tgt])
        signature = scores["bleu_signature"]
        kind = "trained" if name in trained else f"pivot {pivot}" if pivot else "zero-shot"
        share, taken_for = off_target(identifier, hyps, tgt)
        row = {
            "direction": name,
            "kind": kind,
            "bleu": scores["bleu"],
            "chrf": scores["chrf"],
            "off_target": share,
            "taken_for": taken_for,
            "sent_per_s": len(hyps) / seconds,
        }
        results.append(row)
        print(
            f"{name:<12}{kind:<14}{row['bleu']:>7.2f}{row['chrf']:>7.2f}{row['off_target']:>14.1f}"
            f"{row['sent_per_s']:>9.1f}  {taken_for}",
            flush=True,
        )
    print(f"BLEU signature: {signature}")
    if args.json:
        args.json.write_text(json.dumps({"reference_off_target": floor, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
