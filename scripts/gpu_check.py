#!/usr/bin/env python3
"""What mt does on this machine's GPU, as one table (run it through scripts/gpu_check.sh).

    scripts/gpu_check.sh [--multi30k DIR] [--steps 300] [--train-steps 800] [--out runs/gpu_check]

1. `mt train` of the Multi30k de-en preset under a 1-process torchrun (process group: NCCL on a
   GPU), `--train-steps` updates: the backend it joined, target tokens/s and validation BLEU.
2. scripts/bench_train.py: `--steps` updates of the Multi30k and WMT-base presets in bf16 and in
   fp16 with a GradScaler: target tokens/s, ms/update, MFU against the same dtype's measured
   matmul peak, peak CUDA memory.
3. The scaled-dot-product-attention kernel each of the model's attention calls runs (flash,
   memory-efficient, cuDNN or math), read from the profiler's operator names.
4. scripts/bench_decode.py on the model of step 1: greedy and beam-5 sentences/s and BLEU
   (of a model trained for a few hundred updates only: a speed check, not a quality figure).

Multi30k comes from --multi30k DIR, from data/multi30k-de-en (the {train,val,test_2016_flickr}
.{de,en}.gz files; MT_MULTI30K_SOURCE also works) or, when neither is there, a synthetic corpus of
its size (labelled so); the WMT-base preset always trains on a synthetic corpus. `--device cpu`
runs the same checks on the CPU (tiny settings with --set), which is how the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt.config import load_config  # noqa: E402
from mt.data import MULTI30K_SOURCE_ENV, MULTI30K_SPLITS, import_files  # noqa: E402
from mt.device import autocast  # noqa: E402
from mt.model import build_model  # noqa: E402

PRESETS = {"multi30k": ROOT / "configs/multi30k_de_en.yaml", "wmt-base": ROOT / "configs/wmt14_en_de_base.yaml"}
KERNELS = (("cudnn", "cuDNN"), ("flash", "flash"), ("efficient", "memory-efficient"), ("math", "math"))


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def run(command: list, log_file: Path) -> None:
    """Run a step, its output into `log_file`; a failing step stops the check with the log's end."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_file, "w") as out:
        result = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode:
        tail = log_file.read_text().splitlines()[-15:]
        sys.exit(
            f"gpu_check: {' '.join(map(str, command[:4]))}... failed (exit {result.returncode}):\n" + "\n".join(tail)
        )
    log(f"{log_file.name}: {time.perf_counter() - started:.0f} s")


def synthetic_corpus(out: Path, pairs: int) -> Path:
    if not (out / "valid.tgt").is_file():
        run(
            [sys.executable, ROOT / "scripts/make_synthetic_corpus.py", out, "--pairs", pairs],
            out.parent / f"{out.name}.log",
        )
    return out


def multi30k_corpus(args) -> tuple[Path, str, str, str]:
    """(data dir, source language, target language, what it is) for the Multi30k preset."""
    prepared = ROOT / "data/multi30k-de-en"
    source = args.multi30k or os.environ.get(MULTI30K_SOURCE_ENV)
    if not args.multi30k and (prepared / "manifest.json").is_file():
        return prepared, "de", "en", "Multi30k"
    if source and Path(source).is_dir():
        out = args.out / "multi30k-de-en"
        for split, stem in MULTI30K_SPLITS.items():  # local files: no `datasets` needed for this
            src, tgt = (Path(source) / f"{stem}.{lang}.gz" for lang in ("de", "en"))
            import_files(out, split, src, tgt, pair="de-en", force=True)
        return out, "de", "en", "Multi30k"
    return synthetic_corpus(args.out / "synthetic-29k", 29_000), "src", "tgt", "synthetic 29k pairs"


def data_overrides(data_dir: Path, src: str, tgt: str) -> list[str]:
    return ["--set", f"data.dir={data_dir}", "--set", f"data.src={src}", "--set", f"data.tgt={tgt}"]


def user_overrides(args) -> list[str]:
    return [part for value in args.overrides for part in ("--set", value)]


def torchrun_training(args, data: list[str], run_dir: Path) -> dict:
    """`mt train` under torchrun with one process; its backend, speed and validation BLEU."""
    if (run_dir / "config.yaml").is_file():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.{int(time.time())}"))  # a fresh run, not a resume
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "mt"]
    command += ["train", PRESETS["multi30k"], "--max-steps", args.train_steps, *data, *user_overrides(args)]
    command += ["--set", f"train.run_dir={run_dir}", "--set", "train.score_test=false"]
    command += ["--set", f"train.device={args.device}", "--set", f"train.log_every={min(20, args.train_steps)}"]
    log_file = args.out / "torchrun.log"
    started = time.perf_counter()
    run(command, log_file)
    seconds = time.perf_counter() - started
    backend = re.search(r"backend (\w+)", log_file.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["tgt_tokens_per_s"] for m in metrics if "tgt_tokens_per_s" in m]
    bleu = [m["valid_bleu"] for m in metrics if "valid_bleu" in m]
    return {
        "backend": backend.group(1) if backend else "none (no process group)",
        "updates": max(m["step"] for m in metrics),
        "seconds": seconds,
        # the first metrics line is warm-up; with too few updates for a second, the first it is
        "tgt_tokens_per_s": sum(speeds[1:] or speeds) / len(speeds[1:] or speeds) if speeds else float("nan"),
        "valid_bleu": bleu[-1] if bleu else float("nan"),
    }


def training_throughput(args, preset: str, data: list[str], tokenizer_run: Path) -> list[dict]:
    out = args.out / f"train_{preset}.json"
    command = [sys.executable, ROOT / "scripts/bench_train.py", PRESETS[preset], "--steps", args.steps, "--warmup", 10]
    command += [*data, "--set", f"train.run_dir={tokenizer_run}", "--set", f"train.device={args.device}"]
    command += [*user_overrides(args), "--json", out]
    for precision in args.precisions:
        command += ["--precision", precision]
    run(command, args.out / f"train_{preset}.log")
    return json.loads(out.read_text())


def kernel_of(operators: set[str]) -> str:
    """The SDPA implementation among profiled operator names (aten::_scaled_dot_product_flash_attention ...)."""
    attention = [name for name in operators if "scaled_dot_product" in name or "attention_forward" in name]
    for key, label in KERNELS:
        if any(key in name for name in attention):
            return label + (" (CPU)" if any(name.endswith("_for_cpu") for name in attention) else "")
    return "none seen"


def attention_kernels(args) -> dict[str, str]:
    """Which SDPA kernel each attention call of the Multi30k model runs, in the training dtype."""
    config = load_config(PRESETS["multi30k"], args.overrides)
    device = torch.device(args.device)
    vocab = config.tokenizer.vocab_size
    model = build_model(config.model, vocab, vocab, True).to(device).eval()
    batch, src_len, tgt_len, dim = 64, 24, 22, config.model.d_model
    x_src, x_tgt = torch.randn(batch, src_len, dim, device=device), torch.randn(batch, tgt_len, dim, device=device)
    mask = torch.ones(batch, 1, 1, src_len, dtype=torch.bool, device=device)
    mask[: batch // 2, ..., -5:] = False  # padded sources, as in every real batch
    encoder, decoder = model.encoder[0], model.decoder[0]
    with torch.no_grad():
        cache = decoder.self_attn(x_tgt[:, :-1], None)[1]
    calls = {
        "encoder self-attention (padding mask)": lambda: encoder.self_attn(x_src, mask),
        "decoder self-attention (causal)": lambda: decoder.self_attn(x_tgt, None),
        "cross-attention (padding mask)": lambda: decoder.cross_attn(
            x_tgt, decoder.cross_attn.memory_keys(x_src), mask
        ),
        "decoder step (cached keys)": lambda: decoder.self_attn(x_tgt[:, -1:], None, cache, offset=tgt_len - 1),
    }
    found = {}
    precision = args.precisions[0]
    with torch.no_grad(), autocast(device, precision):
        for name, call in calls.items():
            call()  # warm-up: the first call may pick a kernel differently (lazy initialisation)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                call()
            found[f"{name}, {precision}"] = kernel_of({event.key for event in profile.key_averages()})
    return found


def decoding_speed(args, run_dir: Path, test: tuple[Path, Path]) -> list[dict]:
    out = args.out / "decode.json"
    command = [sys.executable, ROOT / "scripts/bench_decode.py", run_dir, test[0], "--ref", test[1]]
    command += ["--beam", 5, "--no-uncached", "--device", args.device, "--json", out]
    run(command, args.out / "decode.log")
    return json.loads(out.read_text())


def describe_machine(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(device)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{torch.cuda.device_count()} GPU(s), torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(check) for check, _ in rows)
    return "\n".join(f"{check:<{width}}  {result}" for check, result in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--multi30k", help=f"directory of the Multi30k .gz files (or set {MULTI30K_SOURCE_ENV})")
    parser.add_argument("--steps", type=int, default=300, help="timed updates per preset and precision")
    parser.add_argument("--train-steps", type=int, default=800, help="updates of the torchrun training")
    parser.add_argument("--presets", default="multi30k,wmt-base", help="comma-separated: multi30k, wmt-base")
    parser.add_argument("--precisions", default="bf16,fp16", help="comma-separated train.precision values")
    parser.add_argument("--wmt-pairs", type=int, default=100_000, help="synthetic pairs for the WMT-base preset")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/gpu_check")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every step")
    args = parser.parse_args()
    args.presets, args.precisions = args.presets.split(","), args.precisions.split(",")
    if unknown := set(args.presets) - set(PRESETS):
        sys.exit(f"gpu_check: --presets {','.join(sorted(unknown))}: choose from {', '.join(PRESETS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (run with --device cpu for a dry run)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data_dir, src, tgt, corpus = multi30k_corpus(args)
    multi30k = data_overrides(data_dir, src, tgt)
    run_dir = args.out / "multi30k"
    rows = [("machine", describe_machine(device)), ("Multi30k preset data", f"{corpus} ({data_dir})")]
    trained = torchrun_training(args, multi30k, run_dir)
    rows.append(
        (
            "torchrun, 1 process, Multi30k preset",
            f"backend {trained['backend']}; {trained['updates']} updates in {trained['seconds']:.0f} s "
            f"(start-up and validation included), {trained['tgt_tokens_per_s']:,.0f} tgt tok/s, "
            f"valid BLEU {trained['valid_bleu']:.1f}",
        )
    )
    for preset in args.presets:
        if preset == "multi30k":
            data, tokenizer_run = multi30k, run_dir  # the torchrun run's tokenizer
        else:
            data = data_overrides(synthetic_corpus(args.out / "synthetic-wmt", args.wmt_pairs), "src", "tgt")
            tokenizer_run = args.out / "no-run"  # bench_train trains one in its scratch directory
        for result in training_throughput(args, preset, data, tokenizer_run):
            scaler = " + GradScaler" if result["precision"] == "fp16" else ""
            memory = f", peak {result['peak_cuda_mb']:,.0f} MB" if result["peak_cuda_mb"] else ""
            rows.append(
                (
                    f"train {preset} {result['precision']}{scaler}",
                    f"{result['tgt_tokens_per_s']:,.0f} tgt tok/s, {result['ms_per_step']:.1f} ms/update, "
                    f"MFU {result['mfu']:.1%} of {result['matmul_peak_gflops'] / 1000:,.1f} TFLOP/s "
                    f"{result['dtype']}{memory}",
                )
            )
    rows += [(f"SDPA {name}", kernel) for name, kernel in attention_kernels(args).items()]
    test_split = "test" if (data_dir / "test.de").is_file() else "valid"
    for result in decoding_speed(args, run_dir, (data_dir / f"{test_split}.{src}", data_dir / f"{test_split}.{tgt}")):
        rows.append(
            (
                f"decode {result['mode']}",
                f"{result['sent_per_s']:,.1f} sent/s, {result['tok_per_s']:,.0f} tok/s, BLEU {result['bleu']:.1f} "
                f"({test_split}, {trained['updates']} updates)",
            )
        )
    rows.append(("total", f"{time.perf_counter() - started:.0f} s"))
    report = table(rows)
    (args.out / "gpu_check.txt").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
