"""Pictures of a run: learning curves from metrics.jsonl and cross-attention heatmaps (matplotlib,
the optional extra `mt[plot]`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mt.config import load_config
from mt.errors import CheckpointError, MTError
from mt.files import atomic_write
from mt.run_dir import RunDir
from mt.search import search_name


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTError("plots need matplotlib: pip install 'mt[plot]'") from None
    return plt


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation records of RUN_DIR/metrics.jsonl; of a step logged twice (a resumed
    run repeats the steps after its checkpoint) the later record counts."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {run_dir} a run directory?)")
    train: dict[int, dict] = {}
    valid: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}:{number}: not a JSON line") from None
        if "loss" in record:
            train[record["step"]] = record
        elif "valid_loss" in record:
            valid[record["step"]] = record
    return [train[s] for s in sorted(train)], [valid[s] for s in sorted(valid)]


def plot_learning_curves(run_dir: Path, out: Path) -> Path:
    """One PNG with three panels: training/validation loss, validation BLEU (and chrF), learning rate."""
    train, valid = read_metrics(run_dir)
    if not train and not valid:
        raise MTError(f"{RunDir(run_dir).metrics}: no training or validation records to plot yet")
    plt = _pyplot()
    figure, (loss_ax, bleu_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (label-smoothed)")
    loss_ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid (label-smoothed)")
    loss_ax.set(title="loss per target token", xlabel="update", ylabel="loss")
    loss_ax.legend()
    steps = [r["step"] for r in valid]
    names = sorted({key[len("valid_bleu_") :] for r in valid for key in r if key.startswith("valid_bleu_")})
    mean = " (mean of the directions)" if names else ""
    bleu_ax.plot(steps, [r["valid_bleu"] for r in valid], "o-", label=f"BLEU{mean}", linewidth=2)
    bleu_ax.plot(steps, [r["valid_chrf"] for r in valid], "s--", label=f"chrF{mean}")
    for name in names:  # a multilingual run: BLEU of each direction
        found = [(r["step"], r[f"valid_bleu_{name}"]) for r in valid if f"valid_bleu_{name}" in r]
        bleu_ax.plot(*zip(*found), ".:", label=f"BLEU {name}", alpha=0.8)
    config = RunDir(run_dir).config
    search = search_name(load_config(config).train.valid_beam) if config.is_file() else "greedy"
    bleu_ax.set(title=f"validation scores ({search})", xlabel="update", ylabel="score")
    bleu_ax.legend(fontsize="small")
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    lr_ax.set(title="learning rate", xlabel="update", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (loss_ax, bleu_ax, lr_ax):
        ax.grid(alpha=0.3)
    figure.suptitle(str(run_dir))
    return _save(figure, out, plt)


def plot_layer_attention(
    weights: torch.Tensor,
    src_pieces: list[str],
    tgt_pieces: list[str],
    translation: str,
    out: Path,
    layer: int = -1,
    head: int | None = None,
    all_heads: bool = False,
) -> Path:
    """One decoder layer's cross-attention of a translation; weights (layers, H, T, S) as from
    `Translator.attention`."""
    layers, heads = weights.shape[:2]
    if not -layers <= layer < layers:
        raise MTError(f"--layer {layer}: the decoder has {layers} layers (0..{layers - 1}, or -1 for the last)")
    if head is not None and not 0 <= head < heads:
        raise MTError(f"--head {head}: the layers have {heads} heads (0..{heads - 1})")
    title = f"layer {layer % layers} cross-attention: {translation}"
    return plot_attention(weights[layer], src_pieces, tgt_pieces, out, title, head, all_heads)


def plot_attention(
    weights: torch.Tensor,
    src_pieces: list[str],
    tgt_pieces: list[str],
    out: Path,
    title: str,
    head: int | None = None,
    all_heads: bool = False,
) -> Path:
    """Heatmap(s) of one layer's cross-attention: weights (H, T, S); rows target pieces, columns source pieces."""
    plt = _pyplot()
    if all_heads:
        panels = [(weights[h], f"head {h}") for h in range(weights.size(0))]
    elif head is not None:
        panels = [(weights[head], f"head {head}")]
    else:
        panels = [(weights.mean(dim=0), "mean over heads")]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    size = (max(4, 0.45 * len(src_pieces) + 2) * columns, max(3, 0.4 * len(tgt_pieces) + 1.5) * rows)
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, constrained_layout=True)
    for ax, (matrix, label) in zip(axes.flat, panels):
        image = ax.imshow(matrix.float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90)
        ax.set_yticks(range(len(tgt_pieces)), tgt_pieces)
        ax.set(xlabel="source pieces", ylabel="output pieces", title=label)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention")
    figure.suptitle(title)
    return _save(figure, out, plt)


def _save(figure, out: Path, plt) -> Path:
    out = Path(out)
    atomic_write(out, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return out
