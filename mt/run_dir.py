"""The run directory: the one place that names its files and knows what its checkpoints hold.

    RUN_DIR/config.yaml                    the resolved config (`mt tune` updates its decode section)
    RUN_DIR/spm.model                      joint SentencePiece model (or spm.src.model + spm.tgt.model)
    RUN_DIR/checkpoints/step{N:08d}.pt     the last train.keep_checkpoints step checkpoints (exact resume)
    RUN_DIR/best.pt                        the weights with the best validation BLEU, for translation
    RUN_DIR/metrics.jsonl, README.md       metrics log and model card
    RUN_DIR/tensorboard/                   the metrics log's numbers as TensorBoard events (train.tensorboard)
    RUN_DIR/cache/                         encoded corpora (mt.corpus_cache)
    RUN_DIR/shortlist.npz                  the lexical shortlist of the output layer (mt.shortlist)
    RUN_DIR/.training.lock                 held by the one `mt train` that trains the run (its pid)

A CTranslate2 export (`mt export`) holds config.yaml, the SentencePiece model(s), CTranslate2's
model.bin and mt_export.json. Checkpoints load with `weights_only=True`: a model file can never
run code. Their dictionaries keep the keys every earlier version wrote, so old run directories
still load, translate and resume.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mt.errors import CheckpointError, ConfigError
from mt.files import atomic_write

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CARD = "README.md"
CACHE_DIR = "cache"
CHECKPOINT_DIR = "checkpoints"
JOINT_SPM, SRC_SPM, TGT_SPM = "spm.model", "spm.src.model", "spm.tgt.model"
EXPORT_INFO, CT2_MODEL = "mt_export.json", "model.bin"
TRAINING_LOCK = ".training.lock"
TENSORBOARD_DIR = "tensorboard"
SHORTLIST = "shortlist.npz"
_STEP_FILE = re.compile(r"^step(\d+)\.pt$")
_VALID_SCORES = ("valid_loss", "valid_ppl", "valid_bleu", "valid_chrf")


@dataclass
class Weights:
    """What translation needs of a checkpoint (best.pt, an average, or a step checkpoint)."""

    model: dict[str, torch.Tensor]
    tokenizer: str | None = None  # fingerprint of the SentencePiece model(s) it was trained with
    vocab: list[int] | None = None  # [source, target] vocabulary sizes
    step: int | None = None
    epoch: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # best.pt: valid_loss, valid_ppl, valid_bleu, valid_chrf
    averaged: list[str] | None = None  # the checkpoints an average was made of

    def to_dict(self) -> dict[str, Any]:
        state = {"model": self.model, "step": self.step, "epoch": self.epoch, **self.scores}
        state |= {"tokenizer": self.tokenizer, "vocab": self.vocab}
        return state if self.averaged is None else {**state, "averaged": self.averaged}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Weights:
        # valid_loss, valid_ppl, valid_bleu, valid_chrf; a multilingual model's valid_bleu_de-en ... too
        scores = {k: v for k, v in state.items() if k in _VALID_SCORES or k.startswith(("valid_bleu_", "valid_chrf_"))}
        return cls(
            state["model"],
            state.get("tokenizer"),
            state.get("vocab"),
            state.get("step"),
            state.get("epoch"),
            scores,
            state.get("averaged"),
        )

    def parameter_count(self) -> int:
        """Numbers in the weights, tensors that share storage (tied embeddings) counted once."""
        seen: dict[tuple[int, int], int] = {}
        for tensor in self.model.values():
            seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = tensor.numel()
        return sum(seen.values())


@dataclass
class Progress:
    """Where a training run stands; every step checkpoint holds it, so a resumed run continues exactly there."""

    step: int = 0  # updates applied
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches of the current epoch (epoch + 1) already trained on, all ranks together
    elapsed: float = 0.0  # wall-clock seconds of training so far, over all sessions of the run
    best_bleu: float = -math.inf
    best_loss: float = math.inf
    validations_without_gain: int = 0
    last_validated_step: int = -1
    best_step: int = -1  # of best.pt (-1: not known, e.g. a run saved by mt 0.1.0)
    best_scores: dict[str, float] = field(default_factory=dict)  # best.pt's validation scores

    def improves(self, scores: dict[str, float]) -> bool:
        """A validation result beats the best so far: higher BLEU, or equal BLEU and lower loss."""
        bleu, loss = scores["valid_bleu"], scores["valid_loss"]
        return bleu > self.best_bleu or (bleu == self.best_bleu and loss < self.best_loss)


@dataclass
class StepCheckpoint:
    """Everything an exact resume needs: weights, optimizer, progress, random-generator states."""

    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]  # optimizer and GradScaler states
    progress: Progress
    rng: list[dict[str, Any]]  # one per rank
    tokenizer: str
    vocab: list[int]
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "progress": asdict(self.progress)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StepCheckpoint:
        known = {f.name for f in fields(Progress)}  # a checkpoint of another version may hold other fields
        return cls(
            state["model"],
            state["trainer"],
            Progress(**{k: v for k, v in state["progress"].items() if k in known}),
            state["rng"],
            state.get("tokenizer", ""),
            state.get("vocab", []),
            state.get("world_size", 1),
        )


class MetricsLog:
    """Appends one JSON object per line to a run's metrics log (or, given no path, nothing: ranks
    other than 0); with `tensorboard`, its numbers also go to TensorBoard event files there."""

    def __init__(self, path: Path | None, tensorboard: Path | None = None):
        self.handle = open(path, "a", encoding="utf-8", buffering=1) if path else None
        self.events = None
        if path and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                self.close()
                raise ConfigError(
                    "train.tensorboard: needs the tensorboard package (pip install 'mt[tensorboard]')"
                ) from None
            self.events = SummaryWriter(str(tensorboard))

    def write(self, **record) -> None:
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
        if self.events is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(_event_tag(key), value, record["step"])

    def close(self) -> None:
        if self.handle:
            self.handle.close()
        if self.events is not None:
            self.events.close()


def _event_tag(key: str) -> str:
    """valid_bleu -> valid/bleu, test_chrf -> test/chrf, loss -> train/loss: TensorBoard groups by prefix."""
    for split in ("valid", "test"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key.removeprefix(split + '_')}"
    return f"train/{key}"


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file's dictionary, loaded without running code; CheckpointError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused to load: not a plain weights file (loading it would run code it contains)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        lines = str(exc).splitlines()
        reason = lines[0].split(". ")[0] if lines else "empty file" if path.stat().st_size == 0 else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an mt checkpoint (no model weights)")
    return state


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> Weights:
    return Weights.from_dict(load_state(path, map_location))


def load_step_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> StepCheckpoint:
    state = load_state(path, map_location)
    missing = [key for key in ("trainer", "progress", "rng") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a step checkpoint (no {', '.join(missing)}): cannot resume from it")
    return StepCheckpoint.from_dict(state)


def save_checkpoint(path: Path, record: Weights | StepCheckpoint) -> None:
    """Tensors, numbers, strings and containers of them: nothing that needs code to load."""
    atomic_write(path, lambda handle: torch.save(record.to_dict(), handle))


def average_weights(paths: list[Path]) -> Weights:
    """The element-wise mean of the checkpoints' weights, with the newest one's step and tokenizer."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    newest: Weights | None = None
    for path in paths:
        weights = load_weights(path)
        if newest is not None and (
            weights.model.keys() != total.keys()
            or any(tensor.shape != total[name].shape for name, tensor in weights.model.items())
        ):
            raise CheckpointError(f"{path}: its weights do not match those of {paths[0]} (another model?)")
        if newest is not None and weights.tokenizer != newest.tokenizer:
            raise CheckpointError(f"{path}: trained with another tokenizer than {paths[0]}")
        for name, tensor in weights.model.items():
            value = tensor.double() if tensor.is_floating_point() else tensor
            total[name] = total[name] + value if name in total and tensor.is_floating_point() else value
        newest = weights
    model = {
        name: (tensor / len(paths)).to(newest.model[name].dtype) if tensor.is_floating_point() else tensor
        for name, tensor in total.items()
    }
    return Weights(model, newest.tokenizer, newest.vocab, newest.step, newest.epoch, averaged=[str(p) for p in paths])


def average_last(run: RunDir, count: int) -> Weights:
    """The average of a run's newest `count` step checkpoints."""
    if count < 1:
        raise CheckpointError("--last must be at least 1")
    paths = run.step_checkpoints()
    if len(paths) < count:
        raise CheckpointError(f"{run}: has {len(paths)} step checkpoints, fewer than --last {count}")
    return average_weights(paths[-count:])


class RunDir:
    """Paths of one run directory (or export), and the questions about what it holds."""

    def __init__(self, path: str | Path | RunDir):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.best = self.path / BEST
        self.metrics = self.path / METRICS
        self.card = self.path / CARD
        self.cache = self.path / CACHE_DIR
        self.export_info = self.path / EXPORT_INFO
        self.training_lock = self.path / TRAINING_LOCK
        self.tensorboard = self.path / TENSORBOARD_DIR
        self.shortlist = self.path / SHORTLIST

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def tokenizer_files(self, joint: bool) -> tuple[Path, Path]:
        if joint:
            return self.path / JOINT_SPM, self.path / JOINT_SPM
        return self.path / SRC_SPM, self.path / TGT_SPM

    def has_tokenizer(self, joint: bool) -> bool:
        return self.tokenizer_files(joint)[0].is_file()

    def fixed_sections(self, joint: bool) -> list[str]:
        """Config sections a continued run must keep: the tokenizer once trained, the model once saved."""
        made = {"tokenizer": self.has_tokenizer(joint), "model": bool(self.step_checkpoints())}
        return [section for section, exists in made.items() if exists]

    def is_run_dir(self) -> bool:
        return self.config.is_file()

    def is_export(self) -> bool:
        return self.export_info.is_file() and (self.path / CT2_MODEL).is_file()

    def checkpoint(self, name: str) -> Path:
        """A checkpoint named relative to the run directory (best.pt, averaged.pt), or a path of its own."""
        path = self.path / name  # an absolute `name` stays as it is
        return path if path.is_file() or not Path(name).is_file() else Path(name)

    def step_checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"step{step:08d}.pt"

    def step_checkpoints(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        folder = self.path / CHECKPOINT_DIR
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _STEP_FILE.match(path.name))]
        return [path for _, path in sorted(found)]

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` step checkpoints."""
        for path in self.step_checkpoints()[:-keep]:
            path.unlink(missing_ok=True)

    def remove_partial_writes(self) -> None:
        """Delete temporary files left by a process killed while it was writing a checkpoint."""
        folder = self.path / CHECKPOINT_DIR
        for path in folder.glob(".step*.tmp") if folder.is_dir() else ():
            log.info("removing %s, left by an interrupted checkpoint write", path)
            path.unlink(missing_ok=True)

    def latest_checkpoint(self, map_location: str | torch.device = "cpu") -> tuple[Path, StepCheckpoint] | None:
        """The newest step checkpoint that loads, or None when the run has none.

        A damaged newest checkpoint (say, a disk that filled up) is skipped with a warning in favour
        of the one before; when none of them loads, that is an error rather than a silent fresh start.
        """
        paths = self.step_checkpoints()
        for path in reversed(paths):
            try:
                return path, load_step_checkpoint(path, map_location)
            except CheckpointError as exc:
                log.warning("%s; trying the checkpoint before it", exc)
        if paths:
            raise CheckpointError(f"{self.path / CHECKPOINT_DIR}: none of the {len(paths)} checkpoints can be loaded")
        return None


def model_dir(path: str | Path) -> RunDir:
    """`path` as a run directory or export; a CheckpointError naming it when it is neither."""
    run = RunDir(path)
    if not run.is_run_dir():
        raise CheckpointError(f"{path}: not a model directory (no {CONFIG}); train one with `mt train`")
    return run
