"""The training loop: data -> tokenizer -> encoded corpus -> batches -> model -> loss -> AdamW, with
validation, checkpoints and a JSONL metrics log in the run directory.

One process or many: under `torchrun` each rank trains a DistributedDataParallel replica on its
own share of every update's batches (see mt/distributed.py); rank 0 alone prepares data, writes
files and validates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mt.batching import make_batches
from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.config import Config, TrainConfig, parse_duration, save_config
from mt.corpus_cache import Batch, EncodedCorpus, prepare_corpus
from mt.data import corpus_files, iter_pairs
from mt.device import autocast
from mt.distributed import World, any_rank, barrier, check_replicas, init_world, shutdown, sum_over_ranks
from mt.errors import CheckpointError, ConfigError, DataError
from mt.evaluate import corpus_scores
from mt.loss import TranslationLoss
from mt.model import Transformer, build_model, count_parameters
from mt.optim import build_optimizer, inverse_sqrt_lr, set_lr
from mt.search import search
from mt.tokenizer import PAD, Tokenizer, load_tokenizer, prepare_tokenizer
from mt.translate import decode_batches

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
CACHE_DIR = "cache"


@dataclass
class StepStats:
    loss_sum: float  # label-smoothed loss summed over target tokens
    target_tokens: int
    source_tokens: int
    padded_tokens: int  # source + target positions including padding

    def add(self, other: StepStats) -> None:
        self.loss_sum += other.loss_sum
        self.target_tokens += other.target_tokens
        self.source_tokens += other.source_tokens
        self.padded_tokens += other.padded_tokens

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.target_tokens, self.source_tokens, self.padded_tokens]


def batch_counts(batch: Batch) -> StepStats:
    src, _, tgt_out = batch
    return StepStats(0.0, int((tgt_out != PAD).sum()), int((src != PAD).sum()), src.numel() + tgt_out.numel())


@dataclass
class Trainer:
    """What one update needs: the loss module to run (plain, DDP-wrapped or compiled), the optimizer, ...

    `objective` computes (smoothed loss sum, NLL sum) of a batch; `world` says how many replicas
    share an update.
    """

    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    world: World = World()
    scaler: torch.amp.GradScaler | None = None

    def accumulate_gradients(self, batches: list[Batch]) -> StepStats:
        """Backward over this rank's micro-batches so the gradient equals one batch holding all of them.

        Each micro-batch's summed loss is divided by the target tokens of the *whole* update (all
        micro-batches on all ranks), so the result is the per-token mean over the update, as if it
        were one batch; DDP averages over ranks, hence the factor world size.
        """
        counts = [batch_counts(batch) for batch in batches]
        local_targets = sum(c.target_tokens for c in counts)
        total_targets = sum_over_ranks(self.world, [local_targets], self.device)[0]
        stats = StepStats(0.0, 0, 0, 0)
        self.objective.train()
        for index, (batch, batch_stats) in enumerate(zip(batches, counts)):
            last = index == len(batches) - 1
            # DDP all-reduces gradients only after the last micro-batch of the update
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.objective.no_sync()
            with sync:
                src, tgt_in, tgt_out = (x.to(self.device, non_blocking=True) for x in batch)
                with autocast(self.device, self.config.precision):
                    loss_sum, _ = self.objective(src, tgt_in, tgt_out)
                scaled = loss_sum * (self.world.size / total_targets)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            batch_stats.loss_sum = loss_sum.item()
            stats.add(batch_stats)
        return stats

    def step(self, batches: list[Batch], lr: float) -> StepStats:
        """One update from this rank's micro-batches: accumulate gradients, clip, AdamW."""
        set_lr(self.optimizer, lr)
        stats = self.accumulate_gradients(batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.config.clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats


def make_trainer(model: Transformer, config: TrainConfig, device: torch.device, world: World = World()) -> Trainer:
    """Optimizer, loss module, and the wrappers the config asks for (DDP, torch.compile, GradScaler)."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    optimizer = build_optimizer(model, config)
    objective: torch.nn.Module = TranslationLoss(model, config.label_smoothing)
    if world.distributed:
        # the only buffer is the constant position table: no need to broadcast it every step
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if config.compile:
        objective = compile_or_eager(objective)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    return Trainer(objective, optimizer, config, device, world, scaler)


def compile_or_eager(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile `module`; where compilation fails (no compiler, unsupported platform), run eagerly."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a failing graph falls back to eager, with a warning
        return torch.compile(module, dynamic=True)  # batch shapes vary: one graph for all of them
    except Exception as exc:  # noqa: BLE001 - any failure to set up compilation means: run eagerly
        log.warning("torch.compile unavailable (%s); training without it", exc)
        return module


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, **record) -> None:
        self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.handle.close()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def validate(
    model: Transformer,
    corpus: EncodedCorpus,
    refs: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
) -> dict[str, float]:
    """Loss/perplexity over the validation set and greedy BLEU/chrF on its first `valid_sentences`."""
    model.eval()
    objective = TranslationLoss(model, config.train.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    for indices in make_batches(corpus.src_lengths, corpus.tgt_lengths, config.train.max_tokens):
        batch = corpus.batch(indices)
        src, tgt_in, tgt_out = (x.to(device) for x in batch)
        with autocast(device, config.train.precision):
            loss, nll = objective(src, tgt_in, tgt_out)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += batch_counts(batch).target_tokens
    count = min(config.train.valid_sentences or len(corpus), len(corpus))
    sources = [corpus.src_sentence(i) for i in range(count)]
    d = config.decode

    def greedy(src):
        return search(model, src, 1, d.length_penalty, d.max_len_a, d.max_len_b)

    best = [found[0].tokens for found in decode_batches(sources, greedy, d.max_tokens, device)]
    hyps = tokenizer.decode_tgt(best)
    scores = corpus_scores(hyps, refs[: len(hyps)])
    return {
        "valid_loss": loss_sum / tokens,
        "valid_ppl": math.exp(min(nll_sum / tokens, 50)),
        "valid_bleu": scores["bleu"],
        "valid_chrf": scores["chrf"],
    }


def prepare_data(config: Config, run_dir: Path, world: World) -> tuple[Tokenizer, EncodedCorpus, EncodedCorpus]:
    """Tokenizer and encoded train/valid corpora of the run directory; rank 0 makes them, others wait."""
    d = config.data
    train_files = corpus_files(d.dir, d.train, d.src, d.tgt)
    valid_files = corpus_files(d.dir, d.valid, d.src, d.tgt)
    cache = run_dir / CACHE_DIR
    for src_path, tgt_path in (train_files, valid_files):
        if next(iter_pairs(src_path, tgt_path), None) is None:
            raise DataError(f"{src_path}: no sentence pairs")
    if world.is_main:
        tokenizer = prepare_tokenizer(run_dir, config.tokenizer, *train_files)
        train_corpus = prepare_corpus(cache, d.train, *train_files, tokenizer, d.max_length)
        valid_corpus = prepare_corpus(cache, d.valid, *valid_files, tokenizer, None)
    barrier(world)
    if not world.is_main:
        tokenizer = load_tokenizer(run_dir, config.tokenizer.joint)
        train_corpus, valid_corpus = EncodedCorpus(cache, d.train), EncodedCorpus(cache, d.valid)
    if len(train_corpus) == 0:
        raise DataError(f"{train_files[0]}: no pairs within data.max_length={d.max_length} pieces")
    return tokenizer, train_corpus, valid_corpus


def train(config: Config) -> Path:
    """Train (or continue training) the model described by `config`; returns the run directory."""
    world, device = init_world(config.train.device)
    try:
        return _train(config, world, device)
    finally:
        shutdown(world)


def _train(config: Config, world: World, device: torch.device) -> Path:
    t = config.train
    if t.max_epochs is None and t.max_steps is None and t.max_time is None:
        raise ConfigError("train: set at least one of max_epochs, max_steps, max_time")
    start = time.monotonic()
    budget = parse_duration(t.max_time) if t.max_time else math.inf
    run_dir = Path(t.run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    _seed_everything(t.seed)
    tokenizer, corpus, valid = prepare_data(config, run_dir, world)
    d = config.data
    valid_refs = [tgt for _, tgt in iter_pairs(*corpus_files(d.dir, d.valid, d.src, d.tgt))]

    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.joint).to(device)
    torch.manual_seed(t.seed + world.rank)  # same initial weights on every rank, different dropout masks
    trainer = make_trainer(model, t, device, world)
    fingerprint = tokenizer.fingerprint()
    step, epoch, best_bleu = 0, 0, -math.inf
    if (run_dir / LAST).is_file():
        state = load_checkpoint(run_dir / LAST, device)
        if state.get("tokenizer") != fingerprint:
            raise CheckpointError(f"{run_dir / LAST}: trained with a different tokenizer than {run_dir}'s")
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        step, epoch, best_bleu = state["step"], state["epoch"], state["best_bleu"]
        log.info("continuing %s from step %d (epoch %d)", run_dir, step, epoch)
    log.info(
        "%d training pairs, %d validation pairs, vocabulary %d/%d, %s parameters, device %s, %d process(es)",
        len(corpus),
        len(valid),
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        f"{count_parameters(model):,}",
        device,
        world.size,
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl") if world.is_main else None
    if metrics:
        metrics.write(event="start", step=step, world_size=world.size, device=str(device), precision=t.precision)
    vocab = [tokenizer.src_vocab_size, tokenizer.tgt_vocab_size]

    def save(valid_scores: dict[str, float]) -> None:
        nonlocal best_bleu
        base = {
            "step": step,
            "epoch": epoch,
            "tokenizer": fingerprint,
            "vocab": vocab,
            "world_size": world.size,
            **valid_scores,
        }
        if valid_scores["valid_bleu"] > best_bleu:
            best_bleu = valid_scores["valid_bleu"]
            save_checkpoint(run_dir / BEST, {"model": model.state_dict(), **base})
        state = {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(), "best_bleu": best_bleu}
        save_checkpoint(run_dir / LAST, {**state, **base})

    def out_of_budget() -> bool:
        local = (t.max_steps is not None and step >= t.max_steps) or (
            time.monotonic() - start + validation_seconds >= budget
        )
        return any_rank(world, local, device)  # clocks differ between ranks; all stop together

    validation_seconds = 0.0
    window, window_start = StepStats(0.0, 0, 0, 0), time.monotonic()  # totals since the last metrics line
    stop = out_of_budget() or (t.max_epochs is not None and epoch >= t.max_epochs)
    per_update = t.update_freq * world.size
    while not stop:
        epoch += 1
        batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, t.max_tokens, seed=t.seed + epoch)
        if world.distributed and len(batches) % per_update:
            # every rank must take part in every update; the few batches left over wait for the next epoch's shuffle
            batches = batches[: len(batches) - len(batches) % per_update]
        updates = [batches[i : i + per_update] for i in range(0, len(batches), per_update)]
        bar = tqdm(updates, desc=f"epoch {epoch}", unit="update", disable=None if world.is_main else True)
        for update in bar:
            lr = inverse_sqrt_lr(step + 1, t.lr, t.warmup_steps)
            window.add(trainer.step([corpus.batch(b) for b in update[world.rank :: world.size]], lr))
            step += 1
            if step % t.log_every == 0:
                seconds = time.monotonic() - window_start
                total = StepStats(*sum_over_ranks(world, window.as_list(), device))
                real_tokens = total.target_tokens + total.source_tokens
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": total.loss_sum / total.target_tokens,
                    "lr": lr,
                    "tgt_tokens_per_s": total.target_tokens / seconds,
                    "tokens_per_s": real_tokens / seconds,
                    "padding": 1 - real_tokens / max(1, total.padded_tokens),
                    "elapsed": time.monotonic() - start,
                }
                if metrics:
                    metrics.write(**record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tgt_tokens_per_s']:.0f}")
                if bar.disable and world.is_main:
                    log.info(
                        "epoch %d step %d loss %.3f lr %.2e %.0f tgt tok/s",
                        epoch,
                        step,
                        record["loss"],
                        lr,
                        record["tgt_tokens_per_s"],
                    )
                window, window_start = StepStats(0.0, 0, 0, 0), time.monotonic()
                corpus.release_pages()
            if out_of_budget():
                stop = True
                break
        bar.close()
        stop = stop or (t.max_epochs is not None and epoch >= t.max_epochs) or out_of_budget()
        began = time.monotonic()
        if world.is_main:
            scores = validate(model, valid, valid_refs, tokenizer, config, device)
            save(scores)
            metrics.write(step=step, epoch=epoch, elapsed=time.monotonic() - start, **scores)
            log.info(
                "epoch %d step %d: valid loss %.3f ppl %.2f BLEU %.2f chrF %.2f (%.0fs)",
                epoch,
                step,
                scores["valid_loss"],
                scores["valid_ppl"],
                scores["valid_bleu"],
                scores["valid_chrf"],
                time.monotonic() - began,
            )
        barrier(world)
        validation_seconds = time.monotonic() - began
    if world.distributed:
        check_replicas(world, model, device)
        log.info("all %d replicas hold identical parameters", world.size)
    if metrics:
        metrics.close()
    log.info(
        "finished after %d steps in %.0fs; best valid BLEU %.2f; model in %s",
        step,
        time.monotonic() - start,
        best_bleu,
        run_dir,
    )
    return run_dir
