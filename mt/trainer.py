"""One update: micro-batches -> gradients -> one combined collective -> clip -> AdamW.

fairseq's recipe for gradients of token sums: each micro-batch's backward runs on its raw loss
sum, and the gradients are rescaled once afterwards by the target tokens of the whole update (all
micro-batches on all ranks), so the update follows the per-token mean loss as if it were one
batch. That total is only known after every rank has counted its tokens: one all-reduce carries
it together with the loss, the gradient norm and the ranks' votes to stop, so an update has one
host synchronisation and one collective besides DDP's own gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from mt.config import TrainConfig
from mt.corpus_cache import Batch, EncodedCorpus
from mt.device import autocast, training_precision
from mt.distributed import World, sum_over_ranks
from mt.errors import ConfigError
from mt.loss import TranslationLoss
from mt.model import Transformer
from mt.optim import build_optimizer, set_lr
from mt.vocab import PAD

log = logging.getLogger(__name__)


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

    def rates(self, seconds: float) -> dict[str, float]:
        """Mean loss per target token, throughput over `seconds`, and the share of padding."""
        real = self.target_tokens + self.source_tokens
        return {
            "loss": self.loss_sum / self.target_tokens,
            "tgt_tokens_per_s": self.target_tokens / seconds,
            "tokens_per_s": real / seconds,
            "padding": 1 - real / max(1, self.padded_tokens),
        }


def batch_counts(batch: Batch) -> StepStats:
    src, _, tgt_out = batch
    return StepStats(0.0, int((tgt_out != PAD).sum()), int((src != PAD).sum()), src.numel() + tgt_out.numel())


@dataclass
class UpdateResult:
    stats: StepStats  # summed over all ranks
    applied: bool  # False: the loss or gradient was not finite on some rank; weights left alone
    stop_votes: list[float]  # per vote, how many ranks cast it


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
    precision: str = "fp32"  # the autocast precision of each update: train.precision, with auto resolved

    def update(self, batches: Sequence[Batch], lr: float, votes: Callable[[], list[float]] = list) -> UpdateResult:
        """One update from this rank's micro-batches; `votes()` (e.g. "over the time budget") is
        asked once the gradients are in and summed over ranks with the loss and token counts."""
        set_lr(self.optimizer, lr)
        counts = StepStats(0.0, 0, 0, 0)
        loss_sum = torch.zeros((), device=self.device)
        self.objective.train()
        for index, batch in enumerate(batches):
            counts.add(batch_counts(batch))  # from the host copy: no device synchronisation
            last = index == len(batches) - 1
            # DDP all-reduces gradients only after the last micro-batch of the update
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.objective.no_sync()
            with sync:
                src, tgt_in, tgt_out = (x.to(self.device, non_blocking=True) for x in batch)
                with autocast(self.device, self.precision):
                    batch_loss, _ = self.objective(src, tgt_in, tgt_out)
                (self.scaler.scale(batch_loss) if self.scaler else batch_loss).backward()
            loss_sum += batch_loss.detach()
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # after DDP's all-reduce every rank holds the same gradients, hence the same norm
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss_sum * 0
        # one collective for what differs between ranks; the norm rides along for the same host sync
        local = [counts.target_tokens, counts.source_tokens, counts.padded_tokens, *votes()]
        counted = torch.tensor(local, dtype=torch.float64, device=self.device)
        summed = sum_over_ranks(self.world, torch.cat([loss_sum.double().view(1), counted]))
        total_loss, targets, sources, padded, *stop_votes, grad_norm = torch.cat(
            [summed, norm.double().view(1)]
        ).tolist()
        stats = StepStats(total_loss, int(targets), int(sources), int(padded))
        finite = math.isfinite(total_loss) and (self.scaler is not None or math.isfinite(grad_norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return UpdateResult(stats, False, stop_votes)
        # DDP averaged over ranks: world size / target tokens makes it the per-token mean of the update
        scale = self.world.size / targets
        if self.config.clip_norm > 0:
            scale *= min(1.0, self.config.clip_norm / (grad_norm * scale + 1e-6))
        torch._foreach_mul_(grads, scale)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(stats, True, stop_votes)

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
    return Trainer(objective, optimizer, config, device, world, scaler, training_precision(device, config.precision))


def compile_or_eager(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile `module`; where compilation fails (no compiler, unsupported platform), run eagerly."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a failing graph falls back to eager, with a warning
        return torch.compile(module, dynamic=True)  # batch shapes vary: one graph for all of them
    except Exception as exc:  # noqa: BLE001 - any failure to set up compilation means: run eagerly
        log.warning("torch.compile unavailable (%s); training without it", exc)
        return module


def prefetched_batches(
    corpus: EncodedCorpus, updates: Sequence[Sequence[Any]], device: torch.device
) -> Iterator[list[Batch]]:
    """Each update's padded batches, the next one built on a second thread while the current one trains.

    On CUDA the batches are pinned, so their copies to the device overlap with computation.
    """

    def build(update: Sequence[Any]) -> list[Batch]:
        batches = [corpus.batch(indices) for indices in update]
        if device.type == "cuda":
            batches = [tuple(x.pin_memory() for x in batch) for batch in batches]  # type: ignore[misc]
        return batches

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mt-batches") as pool:
        upcoming = pool.submit(build, updates[0]) if updates else None
        for index in range(len(updates)):
            batches = upcoming.result()
            upcoming = pool.submit(build, updates[index + 1]) if index + 1 < len(updates) else None
            yield batches


def rng_state() -> dict[str, Any]:
    """The states of every random-number generator training draws from (Python, torch, CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
