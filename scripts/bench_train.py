#!/usr/bin/env python3
"""Training throughput of a config on this machine: `mt train`'s own update, batches and data preparation.

    python scripts/bench_train.py configs/multi30k_de_en.yaml --steps 30 [--set train.max_tokens=4096]

Prints parameters, batch shape, padding waste, tokens/s (source+target and target only), peak
RSS, and model FLOP utilisation (MFU): the model's matmul FLOPs per second over the fp32
matmul peak measured in the same run. Model FLOPs count linear layers on real (non-padding)
tokens (6 x parameters x tokens for forward+backward) plus attention scores on the padded shapes.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.config import load_config  # noqa: E402
from mt.device import pick_device, release_free_heap  # noqa: E402
from mt.model import Transformer  # noqa: E402
from mt.run_dir import RunDir  # noqa: E402
from mt.train import TrainingRun  # noqa: E402
from mt.trainer import prefetched_batches  # noqa: E402


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """Best of `rounds` timings: a round slowed by other work on the machine must not inflate the MFU."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def step_flops(model: Transformer, src: torch.Tensor, tgt: torch.Tensor) -> float:
    """Forward + backward matmul FLOPs of one batch (see the module docstring)."""
    c, dim = model.config, model.dim
    encoder = sum(p.numel() for n, p in model.encoder.named_parameters() if p.dim() == 2)
    decoder = sum(p.numel() for n, p in model.decoder.named_parameters() if p.dim() == 2)
    output = model.tgt_embed.weight.numel()
    src_tokens, tgt_tokens = int((src != 0).sum()), int((tgt != 0).sum())
    batch, s, t = src.size(0), src.size(1), tgt.size(1)
    linear = 2 * (encoder * src_tokens + (decoder + output) * tgt_tokens)
    attention = 4 * batch * dim * (c.encoder_layers * s * s + c.decoder_layers * (t * t + t * s))
    return 3 * (linear + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    device = pick_device(config.train.device)
    source = RunDir(config.train.run_dir)
    with tempfile.TemporaryDirectory() as scratch:
        # a scratch run directory: reuse the run's tokenizer when it has one, never write into the run
        if source.has_tokenizer(config.tokenizer.joint):
            for path in set(source.tokenizer_files(config.tokenizer.joint)):
                shutil.copy(path, scratch)
        config.train.run_dir = scratch
        run = TrainingRun(config, device=device)
        run.prepare()
        measure(args, run, device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args, run: TrainingRun, device: torch.device) -> None:
    t = run.config.train
    preparation_rss = peak_rss_mb()
    batches = run.epoch_batches(0)  # shuffled with train.seed itself: the batches earlier versions timed
    updates = [[batches[step % len(batches)]] for step in range(args.warmup + args.steps)]
    peak = matmul_peak_gflops(device)
    totals = {"src": 0, "tgt": 0, "padded": 0, "flops": 0.0, "sentences": 0}
    for step, update in enumerate(prefetched_batches(run.corpus, updates, device)):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        stats = run.update(update).stats
        if step < args.warmup:
            continue
        totals["src"] += stats.source_tokens
        totals["tgt"] += stats.target_tokens
        totals["padded"] += stats.padded_tokens
        totals["flops"] += step_flops(run.model, update[0][0], update[0][2])
        totals["sentences"] += len(update[0][0])
        if (step + 1) % t.log_every == 0:  # as `mt train` does at each metrics line
            run.corpus.release_pages()
            release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    real = totals["src"] + totals["tgt"]
    achieved = totals["flops"] / seconds / 1e9
    model = run.model
    print(f"config {args.config} {' '.join(args.overrides)}; device {device}, {torch.get_num_threads()} threads")
    print(f"parameters               {sum(p.numel() for p in model.parameters()):,}")
    print(f"steps timed              {args.steps} ({seconds:.1f} s, {seconds / args.steps * 1000:.0f} ms/step)")
    print(f"batch                    {totals['sentences'] / args.steps:.0f} pairs, {real / args.steps:.0f} real tokens")
    print(f"padding waste            {1 - real / totals['padded']:.1%} of batch positions")
    print(f"tokens/s (src+tgt)       {real / seconds:,.0f}")
    print(f"target tokens/s          {totals['tgt'] / seconds:,.0f}")
    print(f"peak RSS                 {peak_rss_mb():,.0f} MB (before the first update: {preparation_rss:,.0f} MB)")
    if device.type == "cuda":
        print(f"peak CUDA memory         {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB")
    print(f"matmul peak (measured)   {peak:,.0f} GFLOP/s fp32")
    print(f"model FLOP/s             {achieved:,.0f} GFLOP/s  (MFU {achieved / peak:.1%})")


if __name__ == "__main__":
    main()
