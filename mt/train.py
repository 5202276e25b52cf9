"""The training run, in named steps: prepare -> restore -> (update -> log -> validate & save)* -> finish.

One process or many: under `torchrun` each rank trains a DistributedDataParallel replica on its
own share of every update's batches (see mt/distributed.py); rank 0 alone prepares data, writes
files and validates. Whether to stop is decided in one place, `TrainingRun.stop_reason`, from
votes all ranks agree on.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from mt.batching import direction_shares, make_batches, sample_directions
from mt.config import Config, check_resumable, load_config, parse_duration, save_config
from mt.device import release_free_heap
from mt.distributed import World, barrier, check_replicas, gather_objects, init_world, shutdown, sum_values
from mt.errors import CheckpointError, ConfigError, TrainingError
from mt.files import FileLock
from mt.model import build_model, count_parameters
from mt.model_card import CardFacts, card_after_training
from mt.optim import inverse_sqrt_lr
from mt.progress import progress_bar
from mt.run_data import prepare_run_data
from mt.run_dir import MetricsLog, Progress, RunDir, StepCheckpoint, Weights, save_checkpoint
from mt.shortlist import write_shortlist
from mt.signals import GracefulStop
from mt.trainer import StepStats, Trainer, UpdateResult, make_trainer, prefetched_batches, rng_state, set_rng_state
from mt.validation import describe, validate
from mt.warm_start import InitSource, adopt_source, find_init_source, initial_weights

log = logging.getLogger(__name__)


def train(config: Config, resume: bool = False) -> Path:
    """Train the model described by `config`; returns the run directory.

    A run directory that already has checkpoints is continued from the newest one (model,
    optimizer, schedule, random-number generators and position in the epoch). `resume=True`
    insists on that: it is an error when there is nothing to continue.
    """
    world, device = init_world(config.train.device)
    try:
        run = TrainingRun(config, world, device)
        run.lock()
        try:
            if resume and not run.run.step_checkpoints():  # before any data preparation or file written
                raise CheckpointError(f"{run.run}: no checkpoint to resume from (train without --resume to start it)")
            run.prepare()
            if not run.restore():
                run.initialise()
            run.train()
            # every rank leaves together: a rank that tears its process group down while rank 0 still
            # writes the shortlist and model card was seen to abort in gloo (SIGABRT, a failed torchrun)
            barrier(world)
        finally:
            run.unlock()
        return run.run.path
    finally:
        shutdown(world)


class TrainingRun:
    """One training run of a run directory; each method is one named step of it."""

    def __init__(self, config: Config, world: World = World(), device: torch.device = torch.device("cpu")):
        t = config.train
        if t.max_epochs is None and t.max_steps is None and t.max_time is None:
            raise ConfigError("train: set at least one of max_epochs, max_steps, max_time")
        self.config, self.world, self.device = config, world, device
        self.run = RunDir(t.run_dir)
        self.training_lock = FileLock(self.run.training_lock)
        self.budget = parse_duration(t.max_time) if t.max_time else math.inf
        self.session_start = time.monotonic()  # the budget counts data preparation too
        self.start = self.session_start  # minus the training time of earlier sessions, once restored
        self.progress = Progress()
        self.validation_seconds = 0.0  # the last validation's duration: the time budget keeps room for one more
        self.paused_seconds = 0.0  # of the current metrics window, spent validating and saving
        self.window, self.window_start = StepStats(0.0, 0, 0, 0), time.monotonic()
        self.bad_in_a_row = 0
        self.resumed = False
        self.signals = GracefulStop()
        self.metrics = MetricsLog(None)
        self.init_source: InitSource | None = None

    # -- prepare and restore -------------------------------------------------------------------

    def lock(self) -> None:
        """Hold the run directory's lock (rank 0, for the whole job): a second trainer of it refuses to start."""
        if self.world.is_main:
            try:
                self.training_lock.acquire()
            except BlockingIOError as exc:
                raise CheckpointError(
                    f"{self.run}: another `mt train` is training this run directory ({exc}); "
                    "wait for it to finish or stop it, or use another train.run_dir"
                ) from None

    def unlock(self) -> None:
        self.training_lock.release()

    def prepare(self) -> None:
        """Run directory, tokenizer, encoded corpora, model and optimizer (no checkpoint is read yet)."""
        if self.config.train.init_from and not self.run.step_checkpoints():
            self.init_source = find_init_source(self.config.train.init_from, self.config.train.keep_optimizer)
            self.config = adopt_source(self.config, self.run, self.init_source, self.world.is_main)
        t = self.config.train
        if self.run.is_run_dir():
            saved = load_config(self.run.config)
            changed = check_resumable(
                saved, self.config, self.run.fixed_sections(saved.tokenizer.joint), self.run.config
            )
            if changed:
                log.info("continuing with changed settings: %s", ", ".join(changed))
        if self.world.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run.config)
            self.run.remove_partial_writes()
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.tokenizer, self.corpus, self.valid = prepare_run_data(
            self.config, self.run, self.world.is_main, lambda: barrier(self.world)
        )
        release_free_heap()  # what SentencePiece training and corpus encoding freed
        tok = self.tokenizer
        self.model = build_model(self.config.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.joint).to(self.device)
        torch.manual_seed(t.seed + self.world.rank)  # same initial weights on every rank, different dropout masks
        self.trainer: Trainer = make_trainer(self.model, t, self.device, self.world)
        self.fingerprint = tok.fingerprint()
        self.vocab = [tok.src_vocab_size, tok.tgt_vocab_size]

    def restore(self) -> bool:
        """Continue from the newest step checkpoint, if any; the loaded copy is freed once restored."""
        latest = self.run.latest_checkpoint(self.device)
        if latest is None:
            return False
        path, checkpoint = latest
        if checkpoint.tokenizer != self.fingerprint or checkpoint.vocab != self.vocab:
            raise CheckpointError(f"{path}: trained with another tokenizer than the one in {self.run}")
        self.load_weights(checkpoint.model, path)
        self.trainer.load_state_dict(checkpoint.trainer)
        self.progress = checkpoint.progress
        if len(checkpoint.rng) == self.world.size:
            set_rng_state(checkpoint.rng[self.world.rank])
        else:
            log.warning(
                "the run was saved with %d processes, now %d: random draws differ", len(checkpoint.rng), self.world.size
            )
        self.resumed, p = True, self.progress
        line = "%s has checkpoints: continuing from %s (step %d, epoch %d, %d batches into epoch %d)"
        log.info(line, self.run, path.name, p.step, p.epoch, p.batches_done, p.epoch + 1)
        return True

    def load_weights(self, state: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:  # e.g. config.yaml's model section edited by hand
            first = str(exc).splitlines()[1:2] or str(exc).splitlines()[:1]
            raise CheckpointError(
                f"{path}: its weights do not fit the model of {self.run.config} ({first[0].strip()})"
            ) from None

    def initialise(self) -> None:
        """A new run with `train.init_from`: the source's weights (and with `keep_optimizer` its
        optimizer state and step counter); data position, epochs and best scores start afresh."""
        source, t = self.init_source, self.config.train
        if source is None:
            return
        record = initial_weights(source, self.fingerprint, self.vocab, t.keep_optimizer, self.device)
        self.load_weights(record.model, source.checkpoint)
        if isinstance(record, StepCheckpoint):
            self.trainer.load_state_dict(record.trainer)
            self.progress.step = record.progress.step
        line = "initialised from %s (its update %s)%s"
        kept = f"; optimizer and schedule continue from update {self.progress.step}" if t.keep_optimizer else ""
        step = record.progress.step if isinstance(record, StepCheckpoint) else record.step
        log.info(line, source.checkpoint, "?" if step is None else step, kept)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> str:
        """Update until `stop_reason` says so; then the final checkpoint, replica check and model card.

        Returns why it stopped: max_steps, max_epochs, max_time, patience or signal.
        """
        t, p, world = self.config.train, self.progress, self.world
        line = "%d training pairs, %d validation pairs, vocabulary %d/%d, %s parameters, device %s, %d process(es)"
        parameters = f"{count_parameters(self.model):,}"
        log.info(line, len(self.corpus), len(self.valid), *self.vocab, parameters, self.device, world.size)
        if len(self.corpus.parts) > 1:
            sizes = [len(pairs) for _, pairs in self.corpus.parts]
            shares = direction_shares(sizes, t.direction_temperature)
            each = ", ".join(f"{name} {n}/{share}" for (name, _), n, share in zip(self.corpus.parts, sizes, shares))
            log.info("directions (pairs / drawn per epoch at temperature %g): %s", t.direction_temperature, each)
        self.metrics = MetricsLog(
            self.run.metrics if world.is_main else None, self.run.tensorboard if t.tensorboard else None
        )
        event = "resume" if self.resumed else "start"
        started = {"init_from": t.init_from} if t.init_from and not self.resumed else {}
        precision = self.trainer.precision  # train.precision with auto resolved
        self.metrics.write(
            event=event, step=p.step, world_size=world.size, device=str(self.device), precision=precision, **started
        )
        self.start = self.session_start - p.elapsed  # and the training time of earlier sessions of the run
        self.window_start = time.monotonic()  # throughput counts training only, not the preparation
        with self.signals:
            reason = self.stop_reason(self.agree())
            while reason is None:
                reason = self.train_epoch()
                if reason == "signal":
                    break
                epoch_ended, stopping = reason is None, reason or self.stop_reason(self.agree())
                # with valid_every, epochs (say, of a small fine-tuning corpus) end unvalidated
                if stopping or not t.valid_every:
                    self.validate_and_save(epoch_end=epoch_ended)
                reason = stopping or self.stop_reason(self.agree())
        self.finish(reason)
        return reason

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This epoch's batches (pair indices) in training order; an update takes `update_freq` per rank."""
        t = self.config.train
        per_update = t.update_freq * self.world.size
        src_lengths, tgt_lengths = self.corpus.src_lengths, self.corpus.tgt_lengths
        chosen = sample_directions([pairs for _, pairs in self.corpus.parts], t.direction_temperature, t.seed + epoch)
        if chosen is None:
            batches = make_batches(src_lengths, tgt_lengths, t.max_tokens, seed=t.seed + epoch)
        else:  # directions drawn by temperature: batches of the drawn pairs, which may mix directions
            drawn = make_batches(src_lengths[chosen], tgt_lengths[chosen], t.max_tokens, seed=t.seed + epoch)
            batches = [chosen[batch] for batch in drawn]
        if self.world.distributed and len(batches) % per_update:
            # every rank must take part in every update; the few left over wait for the next epoch's shuffle
            batches = batches[: len(batches) - len(batches) % per_update]
        return batches

    def train_epoch(self) -> str | None:
        """Train the rest of the current epoch; the reason to stop early, or None when the epoch ended."""
        p, world = self.progress, self.world
        epoch = p.epoch + 1
        batches = self.epoch_batches(epoch)
        per_update = self.config.train.update_freq * world.size
        begins = range(min(p.batches_done, len(batches)), len(batches), per_update)
        bar = progress_bar(
            total=math.ceil(len(batches) / per_update),
            initial=math.ceil(begins.start / per_update),
            desc=f"epoch {epoch}",
            unit="update",
            **({} if world.is_main else {"disable": True}),
        )
        mine = [batches[begin : begin + per_update][world.rank :: world.size] for begin in begins]
        reason = None
        for begin, update in zip(begins, prefetched_batches(self.corpus, mine, self.device)):
            result = self.update(update)
            p.batches_done = min(begin + per_update, len(batches))
            bar.update()
            if result.applied:
                self.after_update(result, epoch, bar)
            reason = self.stop_reason(result.stop_votes)
            if reason is not None:
                break
        else:
            p.epoch, p.batches_done = epoch, 0
        bar.close()
        return reason

    def update(self, batches) -> UpdateResult:
        """One update of this rank's micro-batches at the schedule's learning rate; skipped when not finite."""
        t, p = self.config.train, self.progress
        lr = inverse_sqrt_lr(p.step + 1, t.lr, t.warmup_steps)
        result = self.trainer.update(batches, lr, self.votes)
        if result.applied:
            self.bad_in_a_row = 0
            p.step += 1
            return result
        self.bad_in_a_row += 1
        log.warning(
            "epoch %d: loss or gradient is not finite (loss sum %s); update skipped (%d in a row)",
            p.epoch + 1,
            result.stats.loss_sum,
            self.bad_in_a_row,
        )
        if self.bad_in_a_row >= t.max_bad_steps:
            saved = self.run.step_checkpoints()
            raise TrainingError(
                f"{self.bad_in_a_row} updates in a row had a non-finite loss or gradient (after step {p.step}); "
                f"stopped. Last good checkpoint: {saved[-1] if saved else 'none'}. "
                "Try a lower train.lr or a longer train.warmup_steps"
            )
        return result

    def after_update(self, result: UpdateResult, epoch: int, bar) -> None:
        """A metrics line every `log_every` updates; validation every `valid_every`, else a checkpoint
        every `save_every`."""
        t, p = self.config.train, self.progress
        self.window.add(result.stats)
        if p.step % t.log_every == 0:
            self.log(epoch, bar)
        if t.valid_every and p.step % t.valid_every == 0:
            self.validate_and_save()
        elif t.save_every and p.step % t.save_every == 0:
            self.save()

    def log(self, epoch: int, bar) -> None:
        """The metrics line of the updates since the last one (already summed over ranks by each update)."""
        p, t = self.progress, self.config.train
        lr = inverse_sqrt_lr(p.step, t.lr, t.warmup_steps)
        rates = self.window.rates(time.monotonic() - self.window_start - self.paused_seconds)
        record = {"step": p.step, "epoch": epoch, "lr": lr, **rates, "elapsed": time.monotonic() - self.start}
        self.metrics.write(**record)
        loss, speed = record["loss"], record["tgt_tokens_per_s"]
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        if bar.disable and self.world.is_main:  # no progress bar (stderr is not a terminal): log lines
            log.info("epoch %d step %d loss %.3f lr %.2e %.0f tgt tok/s", epoch, p.step, loss, lr, speed)
        self.window, self.window_start, self.paused_seconds = StepStats(0.0, 0, 0, 0), time.monotonic(), 0.0
        self.corpus.release_pages()
        release_free_heap()

    # -- validation, checkpoints and stopping ----------------------------------------------------

    def validate_and_save(self, epoch_end: bool = False) -> None:
        """Validate (rank 0; all ranks learn whether it improved), keep best.pt, save a step checkpoint.

        At an epoch's end a step already validated only gets a checkpoint recording that the epoch ended.
        """
        p, world = self.progress, self.world
        if p.last_validated_step == p.step:
            if epoch_end and p.batches_done == 0:
                self.save()
            return
        began = time.monotonic()
        scores = validate(self.model, self.valid, self.tokenizer, self.config, self.device) if world.is_main else {}
        improved = world.is_main and p.improves(scores)
        shared = [float(improved), scores.get("valid_bleu", 0.0), scores.get("valid_loss", 0.0)]
        improved, bleu, loss = sum_values(world, shared if world.is_main else [0.0] * 3, self.device)
        if improved:
            p.best_bleu, p.best_loss, p.validations_without_gain = bleu, loss, 0
            p.best_step, p.best_scores = p.step, scores
            if world.is_main:
                best = Weights(self.model.state_dict(), self.fingerprint, self.vocab, p.step, p.epoch, scores)
                save_checkpoint(self.run.best, best)
        else:
            p.validations_without_gain += 1
        p.last_validated_step = p.step
        if world.is_main:
            self.metrics.write(step=p.step, epoch=p.epoch, elapsed=time.monotonic() - self.start, **scores)
            seconds = time.monotonic() - began
            log.info("step %d: %s (best BLEU %.2f; %.0fs)", p.step, describe(scores), p.best_bleu, seconds)
        self.validation_seconds = time.monotonic() - began
        self.paused_seconds += self.validation_seconds
        self.save()
        release_free_heap()  # validation's differently shaped tensors left holes in the heap

    def save(self) -> Path:
        """A step checkpoint with every rank's generator states (all ranks must call this)."""
        began = time.monotonic()
        p = self.progress
        p.elapsed = began - self.start
        rng = gather_objects(self.world, rng_state())
        path = self.run.step_checkpoint(p.step)
        if self.world.is_main:
            state = self.trainer.state_dict()
            record = StepCheckpoint(
                self.model.state_dict(), state, p, rng, self.fingerprint, self.vocab, self.world.size
            )
            save_checkpoint(path, record)
            self.run.prune_checkpoints(self.config.train.keep_checkpoints)
        self.paused_seconds += time.monotonic() - began
        return path

    def votes(self) -> list[float]:
        """This rank's votes to stop: over the time budget (keeping room for a validation), signalled."""
        over = time.monotonic() - self.start + self.validation_seconds >= self.budget
        return [float(over), float(self.signals.signal_name is not None)]

    def agree(self) -> list[float]:
        """The votes of all ranks, outside an update (which carries them in its own collective)."""
        return sum_values(self.world, self.votes(), self.device)

    def stop_reason(self, votes: list[float]) -> str | None:
        """Why the run stops now (the one place that decides), or None; `votes` summed over ranks."""
        t, p = self.config.train, self.progress
        over_budget, signalled = votes
        if signalled:
            return "signal"
        if t.max_steps is not None and p.step >= t.max_steps:
            return "max_steps"
        if over_budget:
            return "max_time"
        if t.patience and p.validations_without_gain >= t.patience:
            return "patience"
        if t.max_epochs is not None and p.epoch >= t.max_epochs:
            return "max_epochs"
        return None

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """Save on a signal; otherwise check the replicas and write the model card."""
        p = self.progress
        if reason == "signal":
            path = self.save()
            name = self.signals.signal_name or "a signal on another rank"
            line = "stopped by %s at step %d; checkpoint %s; continue with `mt train %s --resume`"
            log.info(line, name, p.step, path, self.run)
        elif reason == "patience":
            log.info("no better validation BLEU in %d validations: stopping early", self.config.train.patience)
        if self.world.distributed:
            check_replicas(self.world, self.model, self.device)
            log.info("all %d replicas hold identical parameters", self.world.size)
        if reason != "signal" and self.world.is_main:
            log.info("shortlist: %s", write_shortlist(self.run.path))
            self.write_card()
        self.metrics.close()
        if reason != "signal":
            seconds = time.monotonic() - self.start
            log.info(
                "finished after %d steps in %.0fs; best valid BLEU %.2f; model in %s",
                p.step,
                seconds,
                p.best_bleu,
                self.run,
            )

    def write_card(self) -> None:
        """Test scores (when asked for and the corpus has a test split) and the model card."""
        p = self.progress
        facts = CardFacts(p.step, p.epoch, p.elapsed, self.world.size, count_parameters(self.model))
        facts.best_step, facts.best_scores = (p.best_step if p.best_step >= 0 else None), p.best_scores
        test = card_after_training(self.run, self.config, self.device, facts)
        if test:
            each = {
                f"test_{m}_{name}": scores[m]
                for name, scores in test.get("directions", {}).items()
                for m in ("bleu", "chrf")
            }
            self.metrics.write(
                step=p.step, test_file=test["file"], test_bleu=test["bleu"], test_chrf=test["chrf"], **each
            )
