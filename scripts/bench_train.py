#!/usr/bin/env python3
"""Training throughput of a config on this machine: `mt train`'s own update, batches and data preparation.

    python scripts/bench_train.py configs/multi30k_de_en.yaml --steps 30 [--set train.max_tokens=4096]
        [--precision bf16 --precision fp16] [--json results.json]

Prints parameters, batch shape, padding waste, tokens/s (source+target and target only), peak
RSS, and model FLOP utilisation (MFU): the model's matmul FLOPs per second over the matmul peak
measured in the same run, in the training's precision (fp32, or bf16/fp16 under autocast).
Model FLOPs count linear layers on real (non-padding) tokens (6 x parameters x tokens for
forward+backward) plus attention scores on the padded shapes. Each --precision is timed on the
same batches with a fresh model; the tokenizer and encoded corpus are prepared once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.config import load_config  # noqa: E402
from mt.device import autocast_dtype, cpu_multiplies_bf16, pick_device, release_free_heap  # noqa: E402
from mt.model import Transformer  # noqa: E402
from mt.run_dir import RunDir  # noqa: E402
from mt.train import TrainingRun  # noqa: E402
from mt.trainer import prefetched_batches  # noqa: E402


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10, rounds: int = 3
) -> float:
    """Best of `rounds` timings: a round slowed by other work on the machine must not inflate the MFU."""
    if device.type == "cuda" and dtype != torch.float32:
        size *= 4  # half-precision tensor cores need a larger product to reach their peak
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
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
    parser.add_argument(
        "--precision",
        action="append",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="train.precision to time (repeatable; default: the config's)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures of every precision to this file")
    parser.add_argument(
        "--profile", action="store_true", help="also print the operators taking most time (torch.profiler)"
    )
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    device = pick_device(config.train.device)
    source = RunDir(config.train.run_dir)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        # a scratch run directory: reuse the run's tokenizer when it has one, never write into the run
        if source.has_tokenizer(config.tokenizer.joint):
            for path in set(source.tokenizer_files(config.tokenizer.joint)):
                shutil.copy(path, scratch)
        config.train.run_dir = scratch
        for precision in args.precision or [config.train.precision]:
            config.train.precision = precision
            run = TrainingRun(config, device=device)
            run.prepare()  # after the first precision: the scratch directory's tokenizer and cache
            results.append(measure(args, run, device))
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed_updates(args, run: TrainingRun, device: torch.device, updates, totals: dict, profiler) -> float:
    """Run `updates`, adding the timed ones' tokens and FLOPs to `totals`; the seconds the timed ones took."""
    for step, update in enumerate(prefetched_batches(run.corpus, updates, device)):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        stats = run.update(update).stats
        if profiler is not None:
            profiler.step()
        if step < args.warmup:
            continue
        totals["src"] += stats.source_tokens
        totals["tgt"] += stats.target_tokens
        totals["padded"] += stats.padded_tokens
        totals["flops"] += step_flops(run.model, update[0][0], update[0][2])
        totals["sentences"] += len(update[0][0])
        if (step + 1) % run.config.train.log_every == 0:  # as `mt train` does at each metrics line
            run.corpus.release_pages()
            release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args, run: TrainingRun, device: torch.device) -> dict:
    """Time `args.steps` updates of `run`, print the figures and return them."""
    t = run.config.train
    preparation_rss = peak_rss_mb()
    batches = run.epoch_batches(0)  # shuffled with train.seed itself: the batches earlier versions timed
    updates = [[batches[step % len(batches)]] for step in range(args.warmup + args.steps)]
    dtype = autocast_dtype(device, run.trainer.precision) or torch.float32
    peak = matmul_peak_gflops(device, dtype)
    totals = {"src": 0, "tgt": 0, "padded": 0, "flops": 0.0, "sentences": 0}
    profiler = None
    if args.profile:  # the timed updates only (the profiler's own overhead slows them a little)
        schedule = torch.profiler.schedule(wait=args.warmup, warmup=0, active=args.steps)
        profiler = torch.profiler.profile(schedule=schedule)
    with profiler or contextlib.nullcontext():
        seconds = timed_updates(args, run, device, updates, totals, profiler)
    if profiler is not None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=30))

    real = totals["src"] + totals["tgt"]
    achieved = totals["flops"] / seconds / 1e9
    model = run.model
    precision = str(dtype).removeprefix("torch.")
    print(
        f"config {args.config} {' '.join(args.overrides)}; device {device}, {torch.get_num_threads()} threads, "
        f"precision {t.precision} ({precision}{', bf16 matrix instructions' if cpu_multiplies_bf16() else ''})"
    )
    print(f"parameters               {sum(p.numel() for p in model.parameters()):,}")
    print(f"steps timed              {args.steps} ({seconds:.1f} s, {seconds / args.steps * 1000:.0f} ms/step)")
    print(f"batch                    {totals['sentences'] / args.steps:.0f} pairs, {real / args.steps:.0f} real tokens")
    print(f"padding waste            {1 - real / totals['padded']:.1%} of batch positions")
    print(f"tokens/s (src+tgt)       {real / seconds:,.0f}")
    print(f"target tokens/s          {totals['tgt'] / seconds:,.0f}")
    print(f"peak RSS                 {peak_rss_mb():,.0f} MB (before the first update: {preparation_rss:,.0f} MB)")
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    if cuda_mb is not None:
        print(f"peak CUDA memory         {cuda_mb:,.0f} MB")
    print(f"matmul peak (measured)   {peak:,.0f} GFLOP/s {precision}")
    print(f"model FLOP/s             {achieved:,.0f} GFLOP/s  (MFU {achieved / peak:.1%})", flush=True)
    return {
        "config": str(args.config),
        "precision": t.precision,
        "dtype": precision,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "ms_per_step": seconds / args.steps * 1000,
        "tokens_per_s": real / seconds,
        "tgt_tokens_per_s": totals["tgt"] / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": cuda_mb,
        "matmul_peak_gflops": peak,
        "model_gflops": achieved,
        "mfu": achieved / peak,
    }


if __name__ == "__main__":
    main()
