"""Choose a model directory's decoding defaults on the validation set: which checkpoint (best.pt
or an average), beam size and length penalty. The test set never takes part."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from mt.config import directions, load_config, save_config
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
    direction: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Translate the validation split with every combination, score BLEU (ties: chrF), and store the
    best combination as `decode.checkpoint/beam/length_penalty` of RUN_DIR/config.yaml.

    Several run directories are tuned as an ensemble (on the first one's validation split). A
    multilingual model is tuned on the mean BLEU of its directions, or on one `direction` (de-en).
    Returns one row per combination and the chosen row.
    """
    runs = [model_dir(path) for path in (run_dir if isinstance(run_dir, list) else [run_dir])]
    if save and len(runs) > 1:
        raise MTError("an ensemble's decoding choices cannot be stored in one run's config; tune without saving")
    run = runs[0]
    config = load_config(run.config)
    sets = _validation_sets(config, direction, max_sentences)
    rows = []
    combinations = list(itertools.product(checkpoints, beams, length_penalties))
    bar = progress_bar(total=len(combinations), desc="tuning decoding", unit="setting")
    for checkpoint in checkpoints:
        translator = Translator(runs, checkpoint, device, engine="torch", weights=weights)
        ids = [translator.encode_sources(sources, tgt_lang) for tgt_lang, sources, _ in sets]
        for beam, penalty in itertools.product(beams, length_penalties):
            found = []
            for (tgt_lang, _, refs), sources in zip(sets, ids):
                options = translator.options(beam=beam, length_penalty=penalty, tgt_lang=tgt_lang)
                hyps = translator.translate_ids(sources, options)
                found.append(corpus_scores(translator.tokenizer.decode_tgt([h[0].tokens for h in hyps]), refs))
            scores = {name: sum(f[name] for f in found) / len(found) for name in ("bleu", "chrf")}
            rows.append(
                {
                    "checkpoint": checkpoint,
                    "beam": beam,
                    "length_penalty": penalty,
                    "bleu": scores["bleu"],
                    "chrf": scores["chrf"],
                    "bleu_signature": found[0]["bleu_signature"],
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


def _validation_sets(
    config, direction: str | None, max_sentences: int
) -> list[tuple[str | None, list[str], list[str]]]:
    """(target language, sources, references) of the validation split of each direction tuned on."""
    d = config.data
    chosen = directions(d)
    if direction is not None:
        chosen = [x for x in chosen if x.name == direction]
        if not chosen:
            raise MTError(
                f"--direction {direction}: the model was trained on {', '.join(x.name for x in directions(d))}"
            )
    sets = []
    for x in chosen:
        pairs = list(iter_pairs(*corpus_files(x.dir, d.valid, x.src, x.tgt), d.errors))
        pairs = pairs[:max_sentences] if max_sentences else pairs
        sets.append((x.tgt, [s for s, _ in pairs], [t for _, t in pairs]))
    return sets


def format_tuning(rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = [f"validation BLEU (sacreBLEU {rows[0]['bleu_signature']})"]
    lines.append(f"{'checkpoint':<20}{'beam':>6}{'lp':>6}{'BLEU':>8}{'chrF':>8}")
    for r in rows:
        mark = "  <- chosen" if r is best else ""
        lines.append(
            f"{r['checkpoint']:<20}{r['beam']:>6}{r['length_penalty']:>6g}{r['bleu']:>8.2f}{r['chrf']:>8.2f}{mark}"
        )
    return "\n".join(lines)
