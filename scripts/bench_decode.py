#!/usr/bin/env python3
"""Decoding speed of a trained model: greedy and beam search, cached and uncached.

    python scripts/bench_decode.py RUN_DIR SRC_FILE [--ref REF_FILE] [--beam 5] [--device auto]
        [--variant workers=1 --variant beam_stop=heuristic,shortlist=true] [--ctranslate2 EXPORT_DIR]

Prints, per mode, sentences/s and target pieces/s (decoding time with the model loaded:
search plus detokenization), the peak resident memory so far, BLEU when --ref is given, and
the speed-up of the cached decoder over the uncached reference path. Cached modes run first,
so their peak-memory figures are not inflated by the uncached ones. Each --variant (decode
settings) and --ctranslate2 export is timed in the same run against the model's own settings.
With --rounds N every measurement runs N times, one round after another, so that the modes
interleave and a slow spell of the machine hits them all; a last table gives each mode's median.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.data import read_lines  # noqa: E402
from mt.decoding import DecodeOptions  # noqa: E402
from mt.evaluate import corpus_scores  # noqa: E402
from mt.translate import Translator  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(
    translator: Translator, sources: list[list[int]], beam: int, use_cache: bool, shortlist: bool = False, **changes
) -> tuple[dict, list[str]]:
    """Decode `sources` with the model's defaults and these changes: speed, and the detokenized outputs."""
    options = translator.options(beam=beam, use_cache=use_cache, shortlist=shortlist, **changes)
    if translator.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hyps = translator.translate_ids(sources, options)
    texts = translator.tokenizer.decode_tgt([h[0].tokens for h in hyps])
    if translator.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    pieces = sum(len(h[0].tokens) + 1 for h in hyps)  # + EOS
    return {"seconds": seconds, "sent_per_s": len(sources) / seconds, "tok_per_s": pieces / seconds}, texts


ROWS: list[dict] = []  # every row printed, for --json


def print_row(label: str, stats: dict, bleu: str) -> None:
    row = f"{label:<22}{stats['sent_per_s']:>10.1f}{stats['tok_per_s']:>10.0f}{stats['seconds']:>10.2f}"
    print(f"{row}{peak_rss_mb():>13.0f}{bleu:>8}", flush=True)
    ROWS.append({"mode": label, **stats, "peak_rss_mb": peak_rss_mb(), "bleu": None if bleu == "-" else float(bleu)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("src", type=Path)
    parser.add_argument("--ref", type=Path, help="references, to show BLEU per mode")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="override decode.max_tokens of the model's config")
    parser.add_argument("--tgt-lang", help="output language of a multilingual model (its tag starts each source)")
    parser.add_argument("--shortlist", action="store_true", help="also time the output layer over the shortlist")
    parser.add_argument("--no-uncached", action="store_true", help="skip the slow uncached reference path")
    parser.add_argument(
        "--beam-stop",
        action="append",
        default=[],
        choices=["exact", "heuristic", "k_finished"],
        help="also time beam search with this stopping rule (repeatable; the model's own is decode.beam_stop)",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also time greedy and beam search with these decode settings, e.g. workers=1 or "
        "beam_stop=heuristic,shortlist=true (repeatable); a variant's workers apply to --ctranslate2 too",
    )
    parser.add_argument(
        "--ctranslate2",
        type=Path,
        action="append",
        default=[],
        help="also time this `mt export` directory (repeatable)",
    )
    parser.add_argument(
        "--ensemble",
        type=Path,
        action="append",
        default=[],
        help="also time RUN_DIR ensembled with this run directory (repeatable: more members)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every measurement this many times, interleaved; then medians"
    )
    parser.add_argument("--json", type=Path, help="also write every row printed to this file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile beam search (torch.profiler): the operators taking most time",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    translator = Translator(args.run_dir, device=args.device, engine="torch")
    if args.max_tokens:
        translator.config.decode.max_tokens = args.max_tokens
    lines = [line.strip() for line in read_lines(args.src)]
    sources = translator.encode_sources(lines, args.tgt_lang)
    refs = read_lines(args.ref) if args.ref else None
    print(
        f"{len(sources)} sentences from {args.src}; device {translator.device}, {torch.get_num_threads()} threads, "
        f"decode.max_tokens {translator.config.decode.max_tokens}; "
        f"{sum(len(s) for s in sources) / len(sources):.2f} source pieces per sentence"
    )
    measure(translator, sources[:16], 1, True)  # warm-up: allocator, kernels
    for round_number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {round_number} of {args.rounds}")
        measure_round(args, translator, sources, refs)
    if args.rounds > 1:
        print_medians(args.rounds)
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1) + "\n")
    if args.profile:
        profile(translator, sources, args.beam, args.shortlist)


def measure_round(args, translator: Translator, sources: list[list[int]], refs: list[str] | None) -> None:
    """Every mode the arguments ask for, once."""
    print(f"{'mode':<22}{'sent/s':>10}{'tok/s':>10}{'seconds':>10}{'peak RSS MB':>13}{'BLEU':>8}")
    results = {}
    modes = [("greedy", 1, True), (f"beam{args.beam}", args.beam, True)]
    if not args.no_uncached:
        modes += [("greedy", 1, False), (f"beam{args.beam}", args.beam, False)]
    for name, beam, cached in modes:
        label = f"{name} {'cached' if cached else 'uncached'}"
        stats, texts = measure(translator, sources, beam, cached)
        results[(name, cached)] = (stats, texts)
        bleu = f"{corpus_scores(texts, refs)['bleu']:.2f}" if refs else "-"
        print_row(label, stats, bleu)
    for rule in args.beam_stop:  # greedy search has no stopping rule: beam search only
        compare_variant(translator, sources, refs, results, args.beam, {"beam_stop": rule}, greedy=False)
    for changes in args.variant:
        compare_variant(translator, sources, refs, results, args.beam, changes)
    if args.shortlist:
        compare_shortlist(translator, sources, refs, results, args.beam)
    if translator.device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    if not args.no_uncached:
        for name, _, _ in modes[:2]:
            (fast, fast_texts), (slow, slow_texts) = results[(name, True)], results[(name, False)]
            same = "identical" if fast_texts == slow_texts else "DIFFERENT"
            print(f"{name}: cached / uncached = {fast['sent_per_s'] / slow['sent_per_s']:.2f}x, outputs {same}")
    for export_dir in args.ctranslate2:
        compare_ctranslate2(export_dir, args, sources, refs, results, translator.config.decode.max_tokens)
    if args.ensemble:
        compare_ensemble(args, sources, refs, results, translator.config.decode.max_tokens)


def print_medians(rounds: int) -> None:
    """Each mode's median sentences/s over the rounds (its range in brackets), and against the first beam mode."""
    speeds: dict[str, list[float]] = {}
    for row in ROWS:
        speeds.setdefault(row["mode"], []).append(row["sent_per_s"])
    print(f"medians over {rounds} rounds (sent/s, lowest-highest)")
    base = next(statistics.median(v) for mode, v in speeds.items() if mode.startswith("beam"))
    for mode, values in speeds.items():
        median = statistics.median(values)
        against = f"  {median / base:.2f}x the model's beam" if mode.startswith("beam") else ""
        print(f"{mode:<40}{median:>8.1f}  ({min(values):.1f}-{max(values):.1f}){against}")


def profile(translator: Translator, sources, beam: int, shortlist: bool) -> None:
    """Beam search over the sentences under torch.profiler: the operators by their own time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if translator.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        stats, _ = measure(translator, sources, beam, True, shortlist=shortlist)
    print(
        f"profiled beam{beam}{' shortlist' if shortlist else ''}: {stats['sent_per_s']:.1f} sent/s under the profiler"
    )
    sort = "self_cuda_time_total" if translator.device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=25))


def parse_variant(text: str) -> dict:
    """`beam_stop=heuristic,shortlist=true` -> {"beam_stop": "heuristic", "shortlist": True}."""
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if not value:
            raise argparse.ArgumentTypeError(f"{item!r}: write KEY=VALUE")
        if key not in {f.name for f in fields(DecodeOptions)}:
            raise argparse.ArgumentTypeError(f"{key!r}: not a decode setting")
        lowered = value.lower()
        if lowered in ("true", "false"):
            changes[key] = lowered == "true"
        else:
            try:
                changes[key] = int(value)
            except ValueError:
                try:
                    changes[key] = float(value)
                except ValueError:
                    changes[key] = value
    return changes


def compare_variant(
    translator: Translator, sources, refs, results, beam: int, changes: dict, greedy: bool = True
) -> None:
    """Greedy (unless not `greedy`) and beam search with these decode settings against the model's own."""
    name = ",".join(f"{key}={value}" for key, value in changes.items())
    for search, size in ([("greedy", 1)] if greedy else []) + [(f"beam{beam}", beam)]:
        stats, texts = measure(translator, sources, size, True, **changes)
        print_against(f"{search} {name}", stats, texts, results[(search, True)], refs, "model's decode settings")


def print_against(label: str, stats: dict, texts: list[str], base: tuple[dict, list[str]], refs, against: str) -> None:
    """A row, then its speed ratio, BLEU difference and identical outputs against `base` (stats, texts)."""
    base_stats, base_texts = base
    bleu = corpus_scores(texts, refs)["bleu"] if refs else None
    print_row(label, stats, "-" if bleu is None else f"{bleu:.2f}")
    same = sum(a == b for a, b in zip(texts, base_texts))
    delta = f", BLEU {bleu - corpus_scores(base_texts, refs)['bleu']:+.2f}" if refs else ""
    ratio = stats["sent_per_s"] / base_stats["sent_per_s"]
    print(f"  {label} / {against} = {ratio:.2f}x{delta}, {same}/{len(texts)} outputs identical")


def compare_shortlist(translator: Translator, sources, refs, results, beam: int) -> None:
    """The same model with its output layer over the lexical shortlist: speed and BLEU against the whole layer."""
    for name, size in (("greedy", 1), (f"beam{beam}", beam)):
        stats, texts = measure(translator, sources, size, True, shortlist=True)
        print_against(f"{name} shortlist", stats, texts, results[(name, True)], refs, "whole output layer")


def compare_ensemble(args, sources, refs, results, max_tokens: int) -> None:
    """RUN_DIR and the --ensemble run directories as one ensemble: speed and BLEU against RUN_DIR alone."""
    members = [args.run_dir, *args.ensemble]
    ensemble = Translator(members, device=args.device, engine="torch")
    ensemble.config.decode.max_tokens = max_tokens
    measure(ensemble, sources[:16], 1, True)
    for name, beam in (("greedy", 1), (f"beam{args.beam}", args.beam)):
        stats, texts = measure(ensemble, sources, beam, True)
        alone, _ = results[(name, True)]
        label = f"{name} x{len(members)}"
        bleu = f"{corpus_scores(texts, refs)['bleu']:.2f}" if refs else "-"
        print_row(label, stats, bleu)
        ratio = alone["sent_per_s"] / stats["sent_per_s"]
        print(f"{name}: an ensemble of {len(members)} decodes {ratio:.2f}x slower than {args.run_dir} alone")


def compare_ctranslate2(export_dir: Path, args, sources, refs, results, max_tokens: int) -> None:
    """The same sentences through a CTranslate2 export: speed and BLEU against mt's cached decoder
    (and, with --shortlist and an export that has a vocabulary map, with it too)."""
    from mt.run_dir import RunDir

    engine = Translator(export_dir, device=args.device, engine="ctranslate2")
    engine.config.decode.max_tokens = max_tokens
    quantization = json.loads(RunDir(export_dir).export_info.read_text())["quantization"]
    measure(engine, sources[:16], 1, True)
    vmaps = [False, True] if args.shortlist and (export_dir / "vmap.txt").is_file() else [False]
    # None: the export's own decode.workers, then each other count a variant asks for
    for workers in dict.fromkeys([None, *(v["workers"] for v in args.variant if "workers" in v)]):
        for vmap in vmaps:
            for name, beam in (("greedy", 1), (f"beam{args.beam}", args.beam)):
                stats, texts = measure(engine, sources, beam, True, shortlist=vmap, workers=workers)
                label = f"{name} ct2 {quantization}{' vmap' if vmap else ''}"
                label += "" if workers is None else f" workers {workers}"
                print_against(label, stats, texts, results[(name, True)], refs, "mt cached")


if __name__ == "__main__":
    main()
