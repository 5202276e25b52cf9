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
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mt.batching import make_batches
from mt.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoint,
)
from mt.config import Config, TrainConfig, config_to_dict, load_config, parse_duration, save_config
from mt.corpus_cache import Batch, EncodedCorpus, prepare_corpus
from mt.data import corpus_files, iter_pairs
from mt.device import autocast, release_free_heap
from mt.distributed import (
    World,
    any_rank,
    barrier,
    check_replicas,
    gather_objects,
    init_world,
    shutdown,
    sum_over_ranks,
)
from mt.errors import CheckpointError, ConfigError, DataError, MTError, TrainingError
from mt.evaluate import corpus_scores
from mt.loss import TranslationLoss
from mt.model import Transformer, build_model, count_parameters
from mt.model_card import test_scores, write_model_card
from mt.optim import build_optimizer, inverse_sqrt_lr, set_lr
from mt.progress import progress_bar
from mt.search import search
from mt.tokenizer import PAD, Tokenizer, load_tokenizer, prepare_tokenizer, tokenizer_files
from mt.translate import BEST, decode_batches

log = logging.getLogger(__name__)

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

    def step(self, batches: list[Batch], lr: float) -> tuple[StepStats, bool]:
        """One update from this rank's micro-batches: accumulate gradients, clip, AdamW.

        Returns the batch statistics and whether the update was applied: an update whose loss or
        gradient norm is not finite (on any rank) is skipped, leaving weights and optimizer as
        they were. (With fp16 the GradScaler also skips steps with overflowing gradients while it
        calibrates its scale; those are routine and count as applied.)
        """
        set_lr(self.optimizer, lr)
        stats = self.accumulate_gradients(batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip_norm if self.config.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), max_norm)
        finite = math.isfinite(stats.loss_sum) and (self.scaler is not None or bool(torch.isfinite(grad_norm)))
        if any_rank(self.world, not finite, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return stats, False
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, True

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


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
    """Loss/perplexity over the validation set; BLEU/chrF (beam `valid_beam`) on its first `valid_sentences`."""
    model.eval()
    objective = TranslationLoss(model, config.train.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, config.train.max_tokens)
    for indices in progress_bar(batches, desc="validation loss", unit="batch", leave=False):
        batch = corpus.batch(indices)
        src, tgt_in, tgt_out = (x.to(device) for x in batch)
        with autocast(device, config.train.precision):
            loss, nll = objective(src, tgt_in, tgt_out)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += batch_counts(batch).target_tokens
    count = min(config.train.valid_sentences or len(corpus), len(corpus))
    sources = [corpus.src_sentence(i) for i in range(count)]
    d = config.decode

    def decode(src):
        return search(model, src, config.train.valid_beam, d.length_penalty, d.max_len_a, d.max_len_b)

    best = [found[0].tokens for found in decode_batches(sources, decode, d.max_tokens, device)]
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
        if next(iter_pairs(src_path, tgt_path, d.errors), None) is None:
            raise DataError(f"{src_path}: no sentence pairs")
    if world.is_main:
        tokenizer = prepare_tokenizer(run_dir, config.tokenizer, *train_files, errors=d.errors)
        train_corpus = prepare_corpus(
            cache, d.train, *train_files, tokenizer, d.max_length, d.max_length_ratio, d.errors
        )
        valid_corpus = prepare_corpus(cache, d.valid, *valid_files, tokenizer, None, 0.0, d.errors)
    barrier(world)
    if not world.is_main:
        tokenizer = load_tokenizer(run_dir, config.tokenizer.joint)
        train_corpus, valid_corpus = EncodedCorpus(cache, d.train), EncodedCorpus(cache, d.valid)
    if len(train_corpus) == 0:
        raise DataError(f"{train_files[0]}: no pairs within data.max_length={d.max_length} pieces")
    return tokenizer, train_corpus, valid_corpus


@dataclass
class Progress:
    """Where a run stands; every checkpoint holds it, so a resumed run continues exactly there."""

    step: int = 0  # updates applied
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches of the current epoch (epoch + 1) already trained on, all ranks together
    elapsed: float = 0.0  # wall-clock seconds of training so far, over all sessions of the run
    best_bleu: float = -math.inf
    best_loss: float = math.inf
    validations_without_gain: int = 0
    last_validated_step: int = -1

    def improves(self, scores: dict[str, float]) -> bool:
        """A validation result beats the best so far: higher BLEU, or equal BLEU and lower loss."""
        bleu, loss = scores["valid_bleu"], scores["valid_loss"]
        return bleu > self.best_bleu or (bleu == self.best_bleu and loss < self.best_loss)


class GracefulStop:
    """While active, SIGINT/SIGTERM ask the training loop to stop after the current update.

    A second SIGINT interrupts at once (KeyboardInterrupt), for when saving takes too long.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        log.warning("%s received: finishing this update, then saving a checkpoint", self.signal_name)


def check_same_model(saved: Config, given: Config, run_dir: Path) -> None:
    """Once a run directory has a tokenizer (checkpoints), refuse a config that changes it (the model)."""
    old, new = config_to_dict(saved), config_to_dict(given)
    fixed = [
        name
        for name, made in (
            ("tokenizer", tokenizer_files(run_dir, saved.tokenizer.joint)[0].is_file()),
            ("model", bool(list_checkpoints(run_dir))),
        )
        if made
    ]
    for section in fixed:
        for key, value in new[section].items():
            if old[section].get(key) != value:
                raise ConfigError(
                    f"{run_dir / 'config.yaml'}: this run has {section}.{key}={old[section].get(key)!r}, "
                    f"the config asks for {value!r}; start a new run with another train.run_dir"
                )
    changed = [f"{s}.{k}" for s in ("data", "train", "decode") for k in new[s] if old[s].get(k) != new[s][k]]
    if changed:
        log.info("continuing with changed settings: %s", ", ".join(changed))


def _restore(
    path: Path,
    state: dict,
    run_dir: Path,
    model: Transformer,
    trainer: Trainer,
    world: World,
    fingerprint: str,
    vocab: list[int],
) -> Progress:
    """Load step checkpoint `state` into the model, optimizer and random generators; returns its progress."""
    if state.get("tokenizer") != fingerprint or state.get("vocab") != vocab:
        raise CheckpointError(f"{path}: trained with another tokenizer than the one in {run_dir}")
    model.load_state_dict(state["model"])
    trainer.load_state_dict(state["trainer"])
    progress = Progress(**state["progress"])
    if len(state["rng"]) == world.size:
        set_rng_state(state["rng"][world.rank])
    else:
        log.warning("the run was saved with %d processes, now %d: random draws differ", len(state["rng"]), world.size)
    log.info(
        "%s has checkpoints: continuing from %s (step %d, epoch %d, %d batches into epoch %d)",
        run_dir,
        path.name,
        progress.step,
        progress.epoch,
        progress.batches_done,
        progress.epoch + 1,
    )
    return progress


def train(config: Config, resume: bool = False) -> Path:
    """Train the model described by `config`; returns the run directory.

    A run directory that already has checkpoints is continued from the newest one (model,
    optimizer, schedule, random-number generators and position in the epoch). `resume=True`
    insists on that: it is an error when there is nothing to continue.
    """
    world, device = init_world(config.train.device)
    try:
        return _train(config, world, device, resume)
    finally:
        shutdown(world)


def _train(config: Config, world: World, device: torch.device, resume: bool) -> Path:
    t = config.train
    if t.max_epochs is None and t.max_steps is None and t.max_time is None:
        raise ConfigError("train: set at least one of max_epochs, max_steps, max_time")
    budget = parse_duration(t.max_time) if t.max_time else math.inf
    session_start = time.monotonic()  # the budget counts data preparation too
    run_dir = Path(t.run_dir)
    if (run_dir / "config.yaml").is_file():
        check_same_model(load_config(run_dir / "config.yaml"), config, run_dir)
    latest = load_latest_checkpoint(run_dir, device)
    if resume and latest is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (train without --resume to start the run)")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        remove_partial_writes(run_dir)
    _seed_everything(t.seed)
    tokenizer, corpus, valid = prepare_data(config, run_dir, world)
    release_free_heap()  # what SentencePiece training and corpus encoding freed
    d = config.data
    valid_refs = [tgt for _, tgt in iter_pairs(*corpus_files(d.dir, d.valid, d.src, d.tgt), d.errors)]

    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.joint).to(device)
    torch.manual_seed(t.seed + world.rank)  # same initial weights on every rank, different dropout masks
    trainer = make_trainer(model, t, device, world)
    fingerprint = tokenizer.fingerprint()
    vocab = [tokenizer.src_vocab_size, tokenizer.tgt_vocab_size]
    progress = Progress() if latest is None else _restore(*latest, run_dir, model, trainer, world, fingerprint, vocab)
    resumed = latest is not None
    del latest  # the model and optimizer hold copies of the loaded tensors: keep no second set alive
    log.info(
        "%d training pairs, %d validation pairs, vocabulary %d/%d, %s parameters, device %s, %d process(es)",
        len(corpus),
        len(valid),
        *vocab,
        f"{count_parameters(model):,}",
        device,
        world.size,
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl") if world.is_main else None
    if metrics:
        event = "resume" if resumed else "start"
        metrics.write(event=event, step=progress.step, world_size=world.size, device=str(device), precision=t.precision)
    start = session_start - progress.elapsed  # and the training time of earlier sessions of the run

    def save_checkpoint_now() -> Path:
        """Every rank's generator states go into rank 0's checkpoint (all ranks must call this)."""
        nonlocal paused_seconds
        began = time.monotonic()
        progress.elapsed = began - start
        rng = gather_objects(world, rng_state())
        path = step_checkpoint(run_dir, progress.step)
        if world.is_main:
            state = {
                "model": model.state_dict(),
                "trainer": trainer.state_dict(),
                "progress": asdict(progress),
                "rng": rng,
                "tokenizer": fingerprint,
                "vocab": vocab,
                "world_size": world.size,
            }
            save_checkpoint(path, state)
            prune_checkpoints(run_dir, t.keep_checkpoints)
        paused_seconds += time.monotonic() - began
        return path

    def validate_and_save() -> bool:
        """Validate (rank 0), keep best.pt, checkpoint; True when patience has run out."""
        began = time.monotonic()
        out_of_patience = False
        if world.is_main:
            scores = validate(model, valid, valid_refs, tokenizer, config, device)
            if progress.improves(scores):
                progress.best_bleu, progress.best_loss = scores["valid_bleu"], scores["valid_loss"]
                progress.validations_without_gain = 0
                best = {"model": model.state_dict(), "step": progress.step, "epoch": progress.epoch, **scores}
                save_checkpoint(run_dir / BEST, {**best, "tokenizer": fingerprint, "vocab": vocab})
            else:
                progress.validations_without_gain += 1
            out_of_patience = t.patience > 0 and progress.validations_without_gain >= t.patience
            metrics.write(step=progress.step, epoch=progress.epoch, elapsed=time.monotonic() - start, **scores)
            log.info(
                "step %d: valid loss %.3f ppl %.2f BLEU %.2f chrF %.2f (best BLEU %.2f; %.0fs)",
                progress.step,
                scores["valid_loss"],
                scores["valid_ppl"],
                scores["valid_bleu"],
                scores["valid_chrf"],
                progress.best_bleu,
                time.monotonic() - began,
            )
        progress.last_validated_step = progress.step
        nonlocal validation_seconds, paused_seconds
        validation_seconds = time.monotonic() - began
        paused_seconds += validation_seconds
        out_of_patience = any_rank(world, out_of_patience, device)  # rank 0 decides for all
        if out_of_patience:
            log.info("no better validation BLEU in %d validations: stopping early", t.patience)
        save_checkpoint_now()
        release_free_heap()  # validation's differently shaped tensors left holes in the heap
        return out_of_patience

    validation_seconds = 0.0  # the last validation's duration: the time budget keeps room for one more
    bad_in_a_row = 0
    window, window_start = StepStats(0.0, 0, 0, 0), time.monotonic()  # totals since the last metrics line
    paused_seconds = 0.0  # of the window, spent validating and saving: not training throughput
    per_update = t.update_freq * world.size

    def should_stop(signalled: bool) -> tuple[bool, bool]:
        """(stop for the budget, stop for a signal), agreed by all ranks (their clocks differ)."""
        over = (t.max_steps is not None and progress.step >= t.max_steps) or (
            time.monotonic() - start + validation_seconds >= budget
        )
        over_all, signalled_all = sum_over_ranks(world, [float(over), float(signalled)], device)
        return over_all > 0, signalled_all > 0

    with GracefulStop() as signals:
        finished, interrupted = should_stop(False)
        finished = finished or (t.max_epochs is not None and progress.epoch >= t.max_epochs)
        while not (finished or interrupted):
            epoch = progress.epoch + 1
            batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, t.max_tokens, seed=t.seed + epoch)
            if world.distributed and len(batches) % per_update:
                # every rank must take part in every update; the few left over wait for the next epoch's shuffle
                batches = batches[: len(batches) - len(batches) % per_update]
            first = min(progress.batches_done, len(batches))
            bar = progress_bar(
                total=math.ceil(len(batches) / per_update),
                initial=math.ceil(first / per_update),
                desc=f"epoch {epoch}",
                unit="update",
                **({} if world.is_main else {"disable": True}),
            )
            for begin in range(first, len(batches), per_update):
                update = batches[begin : begin + per_update]
                lr = inverse_sqrt_lr(progress.step + 1, t.lr, t.warmup_steps)
                stats, applied = trainer.step([corpus.batch(b) for b in update[world.rank :: world.size]], lr)
                progress.batches_done = begin + len(update)
                bar.update()
                if not applied:
                    bad_in_a_row += 1
                    log.warning(
                        "epoch %d: loss or gradient is not finite (loss sum %s); update skipped (%d in a row)",
                        epoch,
                        stats.loss_sum,
                        bad_in_a_row,
                    )
                    if bad_in_a_row >= t.max_bad_steps:
                        saved = list_checkpoints(run_dir)
                        raise TrainingError(
                            f"{bad_in_a_row} updates in a row had a non-finite loss or gradient (after step "
                            f"{progress.step}); stopped. Last good checkpoint: "
                            f"{saved[-1] if saved else 'none'}. Try a lower train.lr or a longer train.warmup_steps"
                        )
                else:
                    bad_in_a_row = 0
                    progress.step += 1
                    window.add(stats)
                    if progress.step % t.log_every == 0:
                        total = StepStats(*sum_over_ranks(world, window.as_list(), device))
                        training_seconds = time.monotonic() - window_start - paused_seconds
                        record = _window_record(total, training_seconds, progress.step, epoch, lr)
                        record = {**record, "elapsed": time.monotonic() - start}
                        if metrics:
                            metrics.write(**record)
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tgt_tokens_per_s']:.0f}"
                        )
                        if bar.disable and world.is_main:  # no progress bar (stderr is not a terminal): log lines
                            log.info(
                                "epoch %d step %d loss %.3f lr %.2e %.0f tgt tok/s",
                                epoch,
                                progress.step,
                                record["loss"],
                                lr,
                                record["tgt_tokens_per_s"],
                            )
                        window, window_start, paused_seconds = StepStats(0.0, 0, 0, 0), time.monotonic(), 0.0
                        corpus.release_pages()
                        release_free_heap()
                    if t.valid_every and progress.step % t.valid_every == 0:
                        finished = validate_and_save()
                    elif t.save_every and progress.step % t.save_every == 0:
                        save_checkpoint_now()
                over, interrupted = should_stop(signals.signal_name is not None)
                finished = finished or over
                if finished or interrupted:
                    break
            else:
                progress.epoch, progress.batches_done = epoch, 0
                finished = finished or (t.max_epochs is not None and progress.epoch >= t.max_epochs)
            bar.close()
            if interrupted:
                break
            if progress.last_validated_step != progress.step:
                finished = validate_and_save() or finished
            elif progress.batches_done == 0:
                save_checkpoint_now()  # validated at this step already: only record that the epoch ended
            finished = finished or should_stop(False)[0]

    if interrupted:
        path = save_checkpoint_now()
        log.info(
            "stopped by %s at step %d; checkpoint %s; continue with `mt train %s --resume`",
            signals.signal_name or "a signal on another rank",
            progress.step,
            path,
            run_dir,
        )
    if world.distributed:
        check_replicas(world, model, device)
        log.info("all %d replicas hold identical parameters", world.size)
    if not interrupted and world.is_main:
        try:
            test = test_scores(run_dir, config, str(device)) if t.score_test else None
        except MTError as exc:  # the model is trained and saved; a bad test split must not fail the run
            log.warning("no test scores for the model card: %s", exc)
            test = None
        if test:
            metrics.write(step=progress.step, test_file=test["file"], test_bleu=test["bleu"], test_chrf=test["chrf"])
            log.info(
                "%s: BLEU %.2f chrF %.2f with %s (%s)",
                test["file"],
                test["bleu"],
                test["chrf"],
                test["checkpoint"],
                test["bleu_signature"],
            )
        log.info("model card: %s", write_model_card(run_dir, device, test))
    if metrics:
        metrics.close()
    if not interrupted:
        log.info(
            "finished after %d steps in %.0fs; best valid BLEU %.2f; model in %s",
            progress.step,
            time.monotonic() - start,
            progress.best_bleu,
            run_dir,
        )
    return run_dir


def _window_record(window: StepStats, seconds: float, step: int, epoch: int, lr: float) -> dict:
    """The metrics line for the updates since the previous line (`window` already summed over ranks)."""
    real_tokens = window.target_tokens + window.source_tokens
    return {
        "step": step,
        "epoch": epoch,
        "loss": window.loss_sum / window.target_tokens,
        "lr": lr,
        "tgt_tokens_per_s": window.target_tokens / seconds,
        "tokens_per_s": real_tokens / seconds,
        "padding": 1 - real_tokens / max(1, window.padded_tokens),
    }
