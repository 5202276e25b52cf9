#!/usr/bin/env python3
"""Time and memory of `mt train`'s data preparation: tokenizer training, then encoding the corpus.

    python scripts/make_synthetic_corpus.py /tmp/syn --pairs 4500000
    python scripts/bench_data_prep.py CONFIG [--set data.dir=/tmp/syn --set tokenizer.type=bpe ...]

Runs in a scratch run directory (removed afterwards, unless --keep) exactly what `mt train` does
before its first update (`prepare_run_data`), and prints for each phase its wall time, pairs/s and
the process's peak RSS so far, then the memory the batching of one epoch adds.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.batching import make_batches  # noqa: E402
from mt.config import load_config  # noqa: E402
from mt.data import corpus_files  # noqa: E402
from mt.run_data import prepare_run_data  # noqa: E402
from mt.run_dir import RunDir  # noqa: E402
from mt.tokenizer import prepare_tokenizer  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--keep", action="store_true", help="keep the scratch run directory")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="mt-bench-prep-"))
    config = load_config(args.config, [*args.overrides, f"train.run_dir={scratch}"])
    run = RunDir(scratch)
    d, tok = config.data, config.tokenizer
    print(f"peak RSS after imports: {peak_mb():.0f} MB")
    try:
        started = time.perf_counter()
        prepare_tokenizer(run, tok, *corpus_files(d.dir, d.train, d.src, d.tgt), errors=d.errors)
        tokenizer_s = time.perf_counter() - started
        print(f"tokenizer ({tok.type}, {tok.vocab_size} pieces): {tokenizer_s:.1f} s, peak RSS {peak_mb():.0f} MB")
        started = time.perf_counter()
        _, train, _ = prepare_run_data(config, run)  # the tokenizer is there now: this encodes the corpora
        encode_s = time.perf_counter() - started
        pairs = len(train)
        rate = pairs / encode_s
        print(f"encoding: {pairs:,} pairs in {encode_s:.1f} s = {rate:,.0f} pairs/s, peak RSS {peak_mb():.0f} MB")
        total = tokenizer_s + encode_s
        rate = pairs / total
        print(f"data preparation: {total:.1f} s = {rate:,.0f} pairs/s on the whole, peak RSS {peak_mb():.0f} MB")
        batches = make_batches(train.src_lengths, train.tgt_lengths, config.train.max_tokens, seed=1)
        print(f"batching one epoch: {len(batches):,} batches, peak RSS {peak_mb():.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
