"""RUN_DIR/README.md: what a trained model is, how it was made and how good it is, in one page.

What a run knows of itself (steps, time, parameters, its best validation) comes in as `CardFacts`:
from the training run's memory when it finishes, or read from the run directory's checkpoints by
`mt card RUN_DIR`, which can write the card again at any time. The rest comes from the run
directory's config and encoded-corpus records plus the corpus manifest; the test split, when the
corpus has one, is translated once with the model's decoding defaults and scored.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mt.config import Config, config_to_dict, directions, load_config, target_languages
from mt.data import MANIFEST, corpus_files, read_lines
from mt.device import training_precision
from mt.errors import DataError, MTError
from mt.evaluate import corpus_scores
from mt.files import atomic_write_text
from mt.run_dir import RunDir, load_step_checkpoint, load_weights
from mt.search import search_name
from mt.tokenizer import load_tokenizer
from mt.validation import direction_scores
from mt.vocab import language_tag

log = logging.getLogger(__name__)


@dataclass
class CardFacts:
    """What the card says of the training itself."""

    steps: int | None = None
    epochs: int | None = None
    elapsed: float = 0.0  # seconds of training
    world_size: int = 1
    parameters: int | None = None
    best_step: int | None = None
    best_scores: dict[str, float] = field(default_factory=dict)  # valid_bleu, valid_chrf, ... of best.pt


def facts_from_files(run: RunDir) -> CardFacts:
    """The card's facts read back from best.pt and the newest step checkpoint."""
    facts = CardFacts()
    steps = run.step_checkpoints()
    if steps:
        newest = load_step_checkpoint(steps[-1])
        facts.steps, facts.epochs, facts.elapsed = newest.progress.step, newest.progress.epoch, newest.progress.elapsed
        facts.world_size = newest.world_size
    if run.best.is_file():
        best = load_weights(run.best)
        facts.parameters, facts.best_step, facts.best_scores = best.parameter_count(), best.step, best.scores
    return facts


def _precision(device: torch.device, precision: str) -> str:
    return f"auto ({training_precision(device, precision)})" if precision == "auto" else precision


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
    manifest = _json(Path(d.dir) / MANIFEST).get("splits", {})
    lines = ["| split | pairs used | files (sha256) | origin |", "|---|---|---|---|"]
    for split in (d.train, d.valid, d.test):
        cache = _json(RunDir(run_dir).cache / f"{split}.json")
        record = manifest.get(split, {})
        if not cache and not record:
            continue
        key = cache.get("key", {})
        parts = key.get("parts", [key])  # a multilingual split: each direction's files
        files = ", ".join(
            f"`{Path(part.get(side, '?')).name}` ({part.get(f'{side}_sha256', '?')[:12]})"
            for part in parts
            for side in ("src", "tgt")
        )
        if len(parts) > 1:  # a multi-way corpus repeats its files in several directions
            files = ", ".join(dict.fromkeys(files.split(", ")))
        if not key and record.get("sha256"):
            files = ", ".join(f"`{split}.{lang}` ({digest[:12]})" for lang, digest in record["sha256"].items())
        used = cache.get("pairs", record.get("pairs", "?"))
        skipped = cache.get("skipped_too_long", 0) + cache.get("skipped_length_ratio", 0)
        note = f" ({skipped} left out by the length filters)" if skipped else ""
        lines.append(f"| {split} | {used}{note} | {files} | {record.get('source', d.dir)} |")
    return lines


def test_scores(run_dir: Path, config: Config, device: str = "auto") -> dict[str, Any] | None:
    """BLEU/chrF/TER on the corpus's test split with the model's decoding defaults (checkpoint, beam,
    length penalty), if it has a test split. A multilingual model is scored on each direction's test
    split (`directions`: name -> scores); its top-level scores are their means."""
    from mt.translate import Translator, translate_file

    run = RunDir(run_dir)
    if not run.checkpoint(config.decode.checkpoint).is_file():
        return None
    found: dict[str, dict[str, Any]] = {}
    translator = None
    for direction in directions(config.data):
        try:
            src_path, ref_path = corpus_files(direction.dir, config.data.test, direction.src, direction.tgt)
        except DataError:  # the corpus has no test split (for this direction)
            continue
        translator = translator or Translator(run, device=device, engine="torch")
        options = translator.options(tgt_lang=direction.tgt)
        hyps = translate_file(translator, src_path, options)
        found[direction.name] = {**corpus_scores(hyps, read_lines(ref_path)), "file": str(src_path)}
    if not found:
        return None
    if not config.data.directions:
        return {**next(iter(found.values())), "checkpoint": translator.checkpoint}
    first = next(iter(found.values()))
    means = {name: sum(s[name] for s in found.values()) / len(found) for name in ("bleu", "chrf", "ter")}
    total = sum(s["sentences"] for s in found.values())
    signatures = {key: value for key, value in first.items() if key.endswith("_signature")}
    summary = {**means, **signatures, "sentences": total, "file": f"{config.data.dir} ({len(found)} directions)"}
    return {**summary, "checkpoint": translator.checkpoint, "directions": found}


def card_after_training(run: RunDir, config: Config, device: torch.device, facts: CardFacts) -> dict[str, Any] | None:
    """At the end of training: score the test split (`train.score_test`, when the corpus has one) and
    write the card. Returns the test scores; a bad test split only warns (the model is saved)."""
    try:
        test = test_scores(run.path, config, str(device)) if config.train.score_test else None
    except MTError as exc:
        log.warning("no test scores for the model card: %s", exc)
        test = None
    if test:
        log.info(
            "%s: BLEU %.2f chrF %.2f with %s (%s)",
            test["file"],
            test["bleu"],
            test["chrf"],
            test["checkpoint"],
            test["bleu_signature"],
        )
    if facts.best_step is None and run.best.is_file():  # resumed from a version that did not record it
        on_disk = facts_from_files(run)
        facts.best_step, facts.best_scores = on_disk.best_step, on_disk.best_scores
    log.info("model card: %s", write_model_card(run.path, device, facts, test))
    return test


def write_model_card(run_dir: Path, device: torch.device, facts: CardFacts, test: dict[str, Any] | None = None) -> Path:
    """Write the run directory's model card; `test` scores as from `test_scores`."""
    run = RunDir(run_dir)
    run_dir = run.path
    config = load_config(run.config)
    best = facts.best_scores
    parameters = "?" if facts.parameters is None else f"{facts.parameters:,}"
    d, t, dec = config.data, config.train, config.decode
    name = ", ".join(x.name.replace("-", "->") for x in directions(d))
    hours = facts.elapsed / 3600
    lines = [
        f"# {run_dir.name}: {name} Transformer translation model (mt)",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `mt` (PyTorch {torch.__version__}).",
        "",
        "## Use",
        "",
        "```",
        *_use_lines(run_dir, config),
        "",
        "## Data",
        "",
        *_data_section(run_dir, config),
        "",
        _tokenizer_line(run_dir, config),
        "",
        "## Model and training",
        "",
        f"- {config.model.encoder_layers}+{config.model.decoder_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.heads} heads, FFN {config.model.ffn_dim}, {config.model.norm}-norm; {parameters} parameters",
        f"- {_known(facts.steps)} updates, {_known(facts.epochs)} full epochs, {hours:.2f} h of training",
        f"- hardware: {hardware(device)}; {facts.world_size} process(es); precision {_precision(device, t.precision)}",
        f"- best checkpoint ({run.best.name}): update {_known(facts.best_step)}",
        *_init_line(t),
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
            f"| {d.valid} ({'mean of the directions, ' if d.directions else ''}first {count} sentences"
            f"{' of each' if d.directions else ''}) | {search_name(t.valid_beam)} | "
            f"{best['valid_bleu']:.2f} | {best['valid_chrf']:.2f} | |"
        )
    for name, bleu in direction_scores(best).items():
        lines.append(
            f"| {d.valid} {name} (first {t.valid_sentences or 'all'}) | {search_name(t.valid_beam)} | "
            f"{bleu:.2f} | {best.get(f'valid_chrf_{name}', 0.0):.2f} | |"
        )
    if test:
        decoding = f"{test['checkpoint']}, beam {dec.beam}, length penalty {dec.length_penalty}"
        mean = " (mean of the directions)" if "directions" in test else ""
        lines.append(
            f"| {d.test}{mean} ({test['sentences']} sentences) | {decoding} | "
            f"{test['bleu']:.2f} | {test['chrf']:.2f} | {test['ter']:.2f} |"
        )
        for name, each in test.get("directions", {}).items():
            lines.append(
                f"| {d.test} {name} ({each['sentences']}) | {decoding} | "
                f"{each['bleu']:.2f} | {each['chrf']:.2f} | {each['ter']:.2f} |"
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
    atomic_write_text(run.card, "\n".join(lines))
    return run.card


def _use_lines(run_dir: Path, config: Config) -> list[str]:
    d, beam = config.data, config.decode.beam
    if not d.directions:
        return [
            f"echo 'a sentence in {d.src}' | mt translate {run_dir} --beam {beam}",
            f"mt eval {run_dir} --src FILE.{d.src} --ref FILE.{d.tgt}",
            "```",
        ]
    first = directions(d)[0]
    tags = ", ".join(f"`{language_tag(lang)}`" for lang in target_languages(d))
    return [
        f"echo 'a sentence in {first.src}' | mt translate {run_dir} --tgt-lang {first.tgt} --beam {beam}",
        f"mt eval {run_dir} --tgt-lang {first.tgt} --src FILE.{first.src} --ref FILE.{first.tgt}",
        "```",
        "",
        f"Trained directions: {', '.join(x.name for x in directions(d))}; target-language tags {tags} "
        "(reserved pieces of the SentencePiece model, put before each source). Other pairs of these "
        "languages are zero-shot; `--pivot LANG` translates through LANG instead.",
    ]


def _init_line(t) -> list[str]:
    if not t.init_from:
        return []
    optimizer = "its optimizer state and update counter kept" if t.keep_optimizer else "fresh optimizer and schedule"
    return [f"- initialised from `{t.init_from}` (its tokenizer reused; {optimizer})"]


def _known(value: int | None) -> str:
    return "?" if value is None else str(value)


def _tokenizer_line(run_dir: Path, config: Config) -> str:
    """The tokenizer as trained: its real piece counts, which a small corpus may leave below the config's."""
    tok = config.tokenizer
    try:
        tokenizer = load_tokenizer(run_dir, tok.joint)
        sizes = sorted({tokenizer.src_vocab_size, tokenizer.tgt_vocab_size})
    except MTError:
        sizes = [tok.vocab_size]
    pieces = "/".join(str(n) for n in sizes)
    short = (
        f" (tokenizer.vocab_size={tok.vocab_size}: the corpus supports no more)" if max(sizes) < tok.vocab_size else ""
    )
    return (
        f"Tokenizer: SentencePiece {tok.type}, {pieces} pieces{short} ({'joint' if tok.joint else 'one per language'})."
    )
