"""Choose a model directory's decoding defaults on the validation set: which checkpoint (best.pt
or an average), beam size and length penalty. The test set never takes part."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from mt.config import load_config, save_config
from mt.data import corpus_files, iter_pairs
from mt.errors import MTError
from mt.evaluate import corpus_scores
from mt.progress import progress_bar
from mt.run_dir import model_dir
from mt.translate import Translator

log = logging.getLogger(__name__)


def tune_decoding(
    run_dir: Path | list[Path],
    checkpoints: list[str],
    beams: list[int],
    length_penalties: list[float],
    device: str = "auto",
    max_sentences: int = 0,
    save: bool = True,
    weights: list[float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Translate the validation split with every combination, score BLEU (ties: chrF), and store the
    best combination as `decode.checkpoint/beam/length_penalty` of RUN_DIR/config.yaml.

    Several run directories are tuned as an ensemble (on the first one's validation split).
    Returns one row per combination and the chosen row.
    """
    runs = [model_dir(path) for path in (run_dir if isinstance(run_dir, list) else [run_dir])]
    if save and len(runs) > 1:
        raise MTError("an ensemble's decoding choices cannot be stored in one run's config; tune without saving")
    run = runs[0]
    config = load_config(run.config)
    d = config.data
    pairs = list(iter_pairs(*corpus_files(d.dir, d.valid, d.src, d.tgt), d.errors))
    if max_sentences:
        pairs = pairs[:max_sentences]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    rows = []
    combinations = list(itertools.product(checkpoints, beams, length_penalties))
    bar = progress_bar(total=len(combinations), desc="tuning decoding", unit="setting")
    for checkpoint in checkpoints:
        translator = Translator(runs, checkpoint, device, engine="torch", weights=weights)
        ids = translator.tokenizer.encode_src(sources)
        for beam, penalty in itertools.product(beams, length_penalties):
            hyps = translator.translate_ids(ids, translator.options(beam=beam, length_penalty=penalty))
            texts = translator.tokenizer.decode_tgt([h[0].tokens for h in hyps])
            scores = corpus_scores(texts, refs)
            rows.append(
                {
                    "checkpoint": checkpoint,
                    "beam": beam,
                    "length_penalty": penalty,
                    "bleu": scores["bleu"],
                    "chrf": scores["chrf"],
                    "bleu_signature": scores["bleu_signature"],
                }
            )
            log.info("%s beam %d length penalty %g: valid BLEU %.2f", checkpoint, beam, penalty, scores["bleu"])
            bar.update()
    bar.close()
    best = max(rows, key=lambda r: (r["bleu"], r["chrf"]))
    if save:
        config.decode.checkpoint, config.decode.beam = best["checkpoint"], best["beam"]
        config.decode.length_penalty = best["length_penalty"]
        save_config(config, run.config)
    return rows, best


def format_tuning(rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = [f"validation BLEU (sacreBLEU {rows[0]['bleu_signature']})"]
    lines.append(f"{'checkpoint':<20}{'beam':>6}{'lp':>6}{'BLEU':>8}{'chrF':>8}")
    for r in rows:
        mark = "  <- chosen" if r is best else ""
        lines.append(
            f"{r['checkpoint']:<20}{r['beam']:>6}{r['length_penalty']:>6g}{r['bleu']:>8.2f}{r['chrf']:>8.2f}{mark}"
        )
    return "\n".join(lines)
