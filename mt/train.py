"""The training loop: data -> tokenizer -> batches -> model -> loss -> AdamW, with validation,
checkpoints and a JSONL metrics log in the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mt.batching import collate, make_batches
from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.config import Config, TrainConfig, parse_duration, save_config
from mt.data import load_parallel
from mt.device import autocast, pick_device
from mt.errors import CheckpointError, ConfigError
from mt.evaluate import corpus_scores
from mt.loss import label_smoothed_nll
from mt.model import Transformer, build_model, count_parameters
from mt.optim import build_optimizer, inverse_sqrt_lr, set_lr
from mt.search import search
from mt.tokenizer import PAD, Tokenizer, prepare_tokenizer
from mt.translate import decode_batches

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (src, tgt_in, tgt_out), padded


@dataclass
class Corpus:
    src: list[list[int]]
    tgt: list[list[int]]

    @property
    def src_lengths(self) -> list[int]:
        return [len(s) + 1 for s in self.src]  # + EOS

    @property
    def tgt_lengths(self) -> list[int]:
        return [len(t) + 1 for t in self.tgt]  # + BOS or EOS

    def batch(self, indices: list[int]) -> Batch:
        """Padded (src, tgt_in, tgt_out) tensors of the pairs at `indices`."""
        return collate([self.src[i] for i in indices], [self.tgt[i] for i in indices])


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


def batch_loss(
    model: Transformer, batch: Batch, smoothing: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, StepStats]:
    """Teacher-forced (smoothed loss sum, NLL sum) of one batch, and its token counts."""
    src, tgt_in, tgt_out = (x.to(device, non_blocking=True) for x in batch)
    with autocast(device):
        hidden = model(src, tgt_in)
        real = tgt_out != PAD
        # the output projection only runs on real target positions, not on padding
        loss_sum, nll_sum = label_smoothed_nll(model.logits(hidden[real]), tgt_out[real], smoothing)
    counts = StepStats(0.0, int(real.sum()), int((src != PAD).sum()), src.numel() + tgt_out.numel())
    return loss_sum, nll_sum, counts


def accumulate_gradients(model: Transformer, batches: list[Batch], smoothing: float, device: torch.device) -> StepStats:
    """Backward over micro-batches so the gradient equals that of one batch holding all of them.

    Each micro-batch's summed loss is divided by the target tokens of *all* micro-batches, so the
    accumulated gradient is the per-token mean over the whole update, as if it were one batch.
    """
    total_targets = sum(int((tgt_out != PAD).sum()) for _, _, tgt_out in batches)
    stats = StepStats(0.0, 0, 0, 0)
    model.train()
    for batch in batches:
        loss_sum, _, counts = batch_loss(model, batch, smoothing, device)
        (loss_sum / total_targets).backward()
        counts.loss_sum = loss_sum.item()
        stats.add(counts)
    return stats


def train_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    lr: float,
    config: TrainConfig,
    device: torch.device,
) -> StepStats:
    """One update from `train.update_freq` micro-batches: accumulate gradients, clip, AdamW."""
    set_lr(optimizer, lr)
    stats = accumulate_gradients(model, batches, config.label_smoothing, device)
    if config.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def encode_corpus(tokenizer: Tokenizer, src: list[str], tgt: list[str], max_length: int | None) -> tuple[Corpus, int]:
    """Encode pairs, skipping those longer than `max_length` pieces on either side; returns the skip count."""
    src_ids, tgt_ids = tokenizer.encode_src(src), tokenizer.encode_tgt(tgt)
    if max_length is None:
        return Corpus(src_ids, tgt_ids), 0
    kept = [(s, t) for s, t in zip(src_ids, tgt_ids) if len(s) < max_length and len(t) < max_length]
    return Corpus([s for s, _ in kept], [t for _, t in kept]), len(src_ids) - len(kept)


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
    model: Transformer, corpus: Corpus, refs: list[str], tokenizer: Tokenizer, config: Config, device: torch.device
) -> dict[str, float]:
    """Loss/perplexity over the validation set and greedy BLEU/chrF on its first `valid_sentences`."""
    model.eval()
    loss_sum = nll_sum = tokens = 0.0
    for batch in make_batches(corpus.src_lengths, corpus.tgt_lengths, config.train.max_tokens):
        loss, nll, counts = batch_loss(model, corpus.batch(batch), config.train.label_smoothing, device)
        loss_sum, nll_sum, tokens = loss_sum + loss.item(), nll_sum + nll.item(), tokens + counts.target_tokens
    sources = corpus.src[: config.train.valid_sentences or len(corpus.src)]
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


def train(config: Config) -> Path:
    """Train (or continue training) the model described by `config`; returns the run directory."""
    t = config.train
    if t.max_epochs is None and t.max_steps is None and t.max_time is None:
        raise ConfigError("train: set at least one of max_epochs, max_steps, max_time")
    start = time.monotonic()
    budget = parse_duration(t.max_time) if t.max_time else math.inf
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    _seed_everything(t.seed)
    device = pick_device(t.device)

    d = config.data
    train_src, train_tgt = load_parallel(d.dir, d.train, d.src, d.tgt)
    valid_src, valid_tgt = load_parallel(d.dir, d.valid, d.src, d.tgt)
    tokenizer = prepare_tokenizer(run_dir, config.tokenizer, train_src, train_tgt)
    corpus, skipped = encode_corpus(tokenizer, train_src, train_tgt, d.max_length)
    if skipped:
        log.warning("skipped %d training pairs longer than data.max_length=%d pieces", skipped, d.max_length)
    valid, _ = encode_corpus(tokenizer, valid_src, valid_tgt, None)

    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.joint).to(device)
    optimizer = build_optimizer(model, t)
    fingerprint = tokenizer.fingerprint()
    step, epoch, best_bleu = 0, 0, -math.inf
    if (run_dir / LAST).is_file():
        state = load_checkpoint(run_dir / LAST, device)
        if state.get("tokenizer") != fingerprint:
            raise CheckpointError(f"{run_dir / LAST}: trained with a different tokenizer than {run_dir}'s")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, best_bleu = state["step"], state["epoch"], state["best_bleu"]
        log.info("continuing %s from step %d (epoch %d)", run_dir, step, epoch)
    log.info(
        "%d training pairs, %d validation pairs, vocabulary %d/%d, %s parameters, device %s",
        len(corpus.src),
        len(valid.src),
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        f"{count_parameters(model):,}",
        device,
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    vocab = [tokenizer.src_vocab_size, tokenizer.tgt_vocab_size]

    def save(valid_scores: dict[str, float]) -> None:
        nonlocal best_bleu
        base = {"step": step, "epoch": epoch, "tokenizer": fingerprint, "vocab": vocab, **valid_scores}
        if valid_scores["valid_bleu"] > best_bleu:
            best_bleu = valid_scores["valid_bleu"]
            save_checkpoint(run_dir / BEST, {"model": model.state_dict(), **base})
        save_checkpoint(
            run_dir / LAST,
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_bleu": best_bleu, **base},
        )

    def out_of_budget() -> bool:
        return (
            t.max_steps is not None and step >= t.max_steps
        ) or time.monotonic() - start + validation_seconds >= budget

    validation_seconds = 0.0
    window, window_start = StepStats(0.0, 0, 0, 0), time.monotonic()  # totals since the last metrics line
    stop = out_of_budget() or (t.max_epochs is not None and epoch >= t.max_epochs)
    while not stop:
        epoch += 1
        batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, t.max_tokens, seed=t.seed + epoch)
        updates = [batches[i : i + t.update_freq] for i in range(0, len(batches), t.update_freq)]
        bar = tqdm(updates, desc=f"epoch {epoch}", unit="update", disable=None, dynamic_ncols=True)
        for update in bar:
            lr = inverse_sqrt_lr(step + 1, t.lr, t.warmup_steps)
            window.add(train_step(model, optimizer, [corpus.batch(b) for b in update], lr, t, device))
            step += 1
            if step % t.log_every == 0:
                seconds = time.monotonic() - window_start
                real_tokens = window.target_tokens + window.source_tokens
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": window.loss_sum / window.target_tokens,
                    "lr": lr,
                    "tgt_tokens_per_s": window.target_tokens / seconds,
                    "tokens_per_s": real_tokens / seconds,
                    "padding": 1 - real_tokens / max(1, window.padded_tokens),
                    "elapsed": time.monotonic() - start,
                }
                metrics.write(**record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tgt_tokens_per_s']:.0f}")
                if bar.disable:
                    log.info(
                        "epoch %d step %d loss %.3f lr %.2e %.0f tgt tok/s",
                        epoch,
                        step,
                        record["loss"],
                        lr,
                        record["tgt_tokens_per_s"],
                    )
                window, window_start = StepStats(0.0, 0, 0, 0), time.monotonic()
            if out_of_budget():
                stop = True
                break
        bar.close()
        stop = stop or (t.max_epochs is not None and epoch >= t.max_epochs) or out_of_budget()
        began = time.monotonic()
        scores = validate(model, valid, valid_tgt, tokenizer, config, device)
        validation_seconds = time.monotonic() - began
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
            validation_seconds,
        )
    metrics.close()
    log.info(
        "finished after %d steps in %.0fs; best valid BLEU %.2f; model in %s",
        step,
        time.monotonic() - start,
        best_bleu,
        run_dir,
    )
    return run_dir
