"""Starting a new run from another run's weights and tokenizer (`mt train --init-from`): fine-tuning.

Unlike resuming, which continues the same run, an initialised run is a new run directory: the
source's SentencePiece model is copied (never retrained, so the ids mean the same), its weights
are loaded before the first update, and the optimizer, schedule and data position start afresh
unless `train.keep_optimizer` carries the optimizer and the step counter over.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mt.config import Config, config_to_dict, load_config
from mt.errors import CheckpointError, ConfigError
from mt.files import atomic_write
from mt.run_dir import CHECKPOINT_DIR, RunDir, StepCheckpoint, Weights, load_step_checkpoint, load_weights

log = logging.getLogger(__name__)

# model settings that change no weight's shape or meaning: a fine-tuning run may choose its own
FREE_MODEL_KEYS = ("dropout", "attention_dropout", "activation_dropout")


@dataclass(frozen=True)
class InitSource:
    run: RunDir  # the run directory the weights come from (its config and tokenizer)
    checkpoint: Path
    config: Config


def find_init_source(path: str | Path, keep_optimizer: bool) -> InitSource:
    """A run directory (its decoding checkpoint, or with `keep_optimizer` its newest step checkpoint)
    or a checkpoint file inside one (RUN/best.pt, RUN/averaged.pt, RUN/checkpoints/stepN.pt)."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.is_run_dir():
            raise CheckpointError(f"--init-from {path}: not a run directory (no config.yaml)")
        config = load_config(run.config)
        steps = run.step_checkpoints()
        if keep_optimizer and not steps:
            raise CheckpointError(f"--init-from {path}: no step checkpoint, so no optimizer state to keep")
        checkpoint = steps[-1] if keep_optimizer else run.checkpoint(config.decode.checkpoint)
        return InitSource(run, checkpoint, config)
    if not path.is_file():
        raise CheckpointError(f"--init-from {path}: no such run directory or checkpoint")
    folder = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    run = RunDir(folder)
    if not run.is_run_dir():
        raise CheckpointError(f"--init-from {path}: not inside a run directory (no {run.config}), so no tokenizer")
    return InitSource(run, path, load_config(run.config))


def model_differences(source: Config, given: Config) -> list[str]:
    """The model keys on which `given` differs from `source`, the free ones apart."""
    old, new = config_to_dict(source)["model"], config_to_dict(given)["model"]
    return [
        f"model.{key} ({old[key]!r} there, {value!r} here)"
        for key, value in new.items()
        if key not in FREE_MODEL_KEYS and old.get(key) != value
    ]


def adopt_source(config: Config, run: RunDir, source: InitSource, is_main: bool) -> Config:
    """`config` for a run initialised from `source`: same model, the source's tokenizer (copied into
    `run` by the main process), `train.init_from` naming the exact checkpoint file."""
    if source.run.path.resolve() == run.path.resolve():
        raise ConfigError(f"--init-from {source.run}: that is this run's own directory; use --resume to continue it")
    differ = model_differences(source.config, config)
    if differ:
        raise ConfigError(
            f"--init-from {source.checkpoint}: the model must be the one it was trained with, but "
            f"{', '.join(differ)} differ; match them in the config (only dropouts may change)"
        )
    tokenizer = source.config.tokenizer
    if tokenizer != config.tokenizer:
        log.info("tokenizer settings taken from %s (its SentencePiece model is reused)", source.run.config)
    if is_main:
        copy_tokenizer(source.run, run, tokenizer.joint)
    train = replace(config.train, init_from=str(source.checkpoint))
    return replace(config, tokenizer=tokenizer, train=train)


def copy_tokenizer(source: RunDir, target: RunDir, joint: bool) -> None:
    """Copy the SentencePiece model file(s); files already there must be the same ones."""
    for given, wanted in zip(source.tokenizer_files(joint), target.tokenizer_files(joint)):
        if not given.is_file():
            raise CheckpointError(f"--init-from {source}: {given.name} not found")
        if wanted.is_file():
            if wanted.read_bytes() != given.read_bytes():
                raise CheckpointError(f"{wanted}: differs from {given}; this run was started from another model")
            continue
        with open(given, "rb") as handle:
            atomic_write(wanted, lambda out: shutil.copyfileobj(handle, out))


def initial_weights(
    source: InitSource, fingerprint: str, vocab: list[int], keep_optimizer: bool, device: torch.device
) -> Weights | StepCheckpoint:
    """The source checkpoint (a step checkpoint, with optimizer state, when `keep_optimizer`),
    checked to belong to the tokenizer the new run copied."""
    if keep_optimizer:
        try:
            record: Weights | StepCheckpoint = load_step_checkpoint(source.checkpoint, device)
        except CheckpointError as exc:
            raise CheckpointError(f"--keep-optimizer: {exc}") from None
    else:
        record = load_weights(source.checkpoint, device)
    if record.tokenizer != fingerprint or list(record.vocab or []) != vocab:
        raise CheckpointError(
            f"--init-from {source.checkpoint}: trained with another tokenizer than {source.run}'s SentencePiece model"
        )
    return record
