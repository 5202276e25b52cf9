"""RUN_DIR/README.md: what a trained model is, how it was made and how good it is, in one page.

Everything comes from the run directory itself (config, checkpoints, encoded-corpus records,
metrics) plus the corpus manifest, so `mt card RUN_DIR` can write it again at any time; the
test split, when the corpus has one, is translated once with best.pt and scored.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mt.checkpoint import atomic_write_text, list_checkpoints, load_checkpoint
from mt.config import Config, config_to_dict, load_config
from mt.data import corpus_files, read_lines
from mt.errors import DataError
from mt.evaluate import corpus_scores
from mt.model import build_model, count_parameters
from mt.search import search_name

CARD = "README.md"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _data_section(run_dir: Path, config: Config) -> list[str]:
    d = config.data
    manifest = _json(Path(d.dir) / "manifest.json").get("splits", {})
    lines = ["| split | pairs used | files (sha256) | origin |", "|---|---|---|---|"]
    for split in (d.train, d.valid, d.test):
        cache = _json(run_dir / "cache" / f"{split}.json")
        record = manifest.get(split, {})
        if not cache and not record:
            continue
        key = cache.get("key", {})
        files = ", ".join(
            f"`{Path(key.get(side, '?')).name}` ({key.get(f'{side}_sha256', '?')[:12]})" for side in ("src", "tgt")
        )
        if not key and record.get("sha256"):
            files = ", ".join(f"`{split}.{lang}` ({digest[:12]})" for lang, digest in record["sha256"].items())
        used = cache.get("pairs", record.get("pairs", "?"))
        skipped = cache.get("skipped_too_long", 0) + cache.get("skipped_length_ratio", 0)
        note = f" ({skipped} left out by the length filters)" if skipped else ""
        lines.append(f"| {split} | {used}{note} | {files} | {record.get('source', d.dir)} |")
    return lines


def test_scores(run_dir: Path, config: Config, device: str = "auto") -> dict[str, Any] | None:
    """BLEU/chrF/TER on the corpus's test split with the model's decoding defaults (checkpoint, beam,
    length penalty), if it has a test split."""
    from mt.translate import Translator

    d = config.data
    try:
        src_path, ref_path = corpus_files(d.dir, d.test, d.src, d.tgt)
    except DataError:  # the corpus has no test split
        return None
    if not (run_dir / "best.pt").is_file():
        return None
    translator = Translator(run_dir, device=device)
    hyps = [t[0].text for t in translator.translate(read_lines(src_path))]
    return {**corpus_scores(hyps, read_lines(ref_path)), "file": str(src_path), "checkpoint": translator.checkpoint}


def write_model_card(run_dir: Path, device: torch.device, test: dict[str, Any] | None = None) -> Path:
    """Write RUN_DIR/README.md from the run directory's files; `test` scores as from `test_scores`."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    best = load_checkpoint(run_dir / "best.pt") if (run_dir / "best.pt").is_file() else {}
    steps = list_checkpoints(run_dir)
    newest = load_checkpoint(steps[-1]) if steps else {}
    progress, world_size = newest.get("progress", {}), newest.get("world_size", 1)
    parameters = "?"
    if best.get("vocab"):
        model = build_model(config.model, *best["vocab"], config.tokenizer.joint)  # shared weights counted once
        parameters = f"{count_parameters(model):,}"
    d, t, dec = config.data, config.train, config.decode
    name = f"{d.src}->{d.tgt}"
    hours = progress.get("elapsed", 0.0) / 3600
    lines = [
        f"# {run_dir.name}: {name} Transformer translation model (mt)",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `mt` (PyTorch {torch.__version__}).",
        "",
        "## Use",
        "",
        "```",
        f"echo 'a sentence in {d.src}' | mt translate {run_dir} --beam {dec.beam}",
        f"mt eval {run_dir} --src FILE.{d.src} --ref FILE.{d.tgt}",
        "```",
        "",
        "## Data",
        "",
        *_data_section(run_dir, config),
        "",
        f"Tokenizer: SentencePiece {config.tokenizer.type}, {config.tokenizer.vocab_size} pieces"
        f" ({'joint' if config.tokenizer.joint else 'one per language'}).",
        "",
        "## Model and training",
        "",
        f"- {config.model.encoder_layers}+{config.model.decoder_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.heads} heads, FFN {config.model.ffn_dim}, {config.model.norm}-norm; {parameters} parameters",
        f"- {progress.get('step', '?')} updates, {progress.get('epoch', '?')} full epochs, {hours:.2f} h of training",
        f"- hardware: {hardware(device)}; {world_size} process(es); precision {t.precision}",
        f"- best checkpoint (best.pt): update {best.get('step', '?')}",
        "",
        "## Scores",
        "",
        "sacreBLEU on detokenized, cased output.",
        "",
        "| set | decoding | BLEU | chrF | TER |",
        "|---|---|---|---|---|",
    ]
    if "valid_bleu" in best:
        count = t.valid_sentences or "all"
        lines.append(
            f"| {d.valid} (first {count} sentences) | {search_name(t.valid_beam)} | "
            f"{best['valid_bleu']:.2f} | {best['valid_chrf']:.2f} | |"
        )
    if test:
        lines.append(
            f"| {d.test} ({test['sentences']} sentences) | {test['checkpoint']}, beam {dec.beam}, "
            f"length penalty {dec.length_penalty} | "
            f"{test['bleu']:.2f} | {test['chrf']:.2f} | {test['ter']:.2f} |"
        )
        lines += [
            "",
            f"- BLEU signature: `{test['bleu_signature']}`",
            f"- chrF signature: `{test['chrf_signature']}`",
            f"- TER signature: `{test['ter_signature']}`",
        ]
    lines += [
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    path = run_dir / CARD
    atomic_write_text(path, "\n".join(lines))
    return path
