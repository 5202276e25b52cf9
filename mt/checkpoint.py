"""Atomic file writes and checkpoints that load without executing code (`weights_only=True`).

A run directory keeps its training checkpoints as `checkpoints/step{N:08d}.pt` (model, optimizer,
progress and random-number-generator states: everything an exact resume needs), the last
`train.keep_checkpoints` of them, plus `best.pt` (model weights only) for translation.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from mt.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step(\d+)\.pt$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save tensors, numbers, strings and containers of them; nothing that needs code to load."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused to load: not a plain weights file (loading it would run code it contains)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0].split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an mt checkpoint (no model weights)")
    return state


def step_checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run directory's step checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _STEP_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def remove_partial_writes(run_dir: Path) -> None:
    """Delete temporary files left by a process killed while it was writing a checkpoint."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    for path in folder.glob(".step*.tmp") if folder.is_dir() else ():
        log.info("removing %s, left by an interrupted checkpoint write", path)
        path.unlink(missing_ok=True)


def load_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads, or None when the run has none.

    A damaged newest checkpoint (say, a disk that filled up) is skipped with a warning in favour
    of the one before; when none of them loads, that is an error rather than a silent fresh start.
    """
    paths = list_checkpoints(run_dir)
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.warning("%s; trying the checkpoint before it", exc)
    if paths:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_DIR}: none of the {len(paths)} checkpoints can be loaded")
    return None


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The element-wise mean of the checkpoints' model weights, with the newest one's metadata."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    newest: dict[str, Any] = {}
    for path in paths:
        state = load_checkpoint(path)
        if total and state["model"].keys() != total.keys():
            raise CheckpointError(f"{path}: its weights do not match those of {paths[0]} (another model?)")
        if newest and state.get("tokenizer") != newest.get("tokenizer"):
            raise CheckpointError(f"{path}: trained with another tokenizer than {paths[0]}")
        for name, tensor in state["model"].items():
            value = tensor.double() if tensor.is_floating_point() else tensor
            total[name] = total[name] + value if name in total and tensor.is_floating_point() else value
        newest = state
    model = {
        name: (tensor / len(paths)).to(newest["model"][name].dtype) if tensor.is_floating_point() else tensor
        for name, tensor in total.items()
    }
    keep = ("step", "epoch", "tokenizer", "vocab")
    return {"model": model, **{k: newest[k] for k in keep if k in newest}, "averaged": [str(p) for p in paths]}


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
