"""Scores from sacreBLEU's own API on detokenized text, with their signatures."""

from __future__ import annotations

from typing import Any

from sacrebleu.metrics import BLEU, CHRF

from mt.errors import DataError


def corpus_scores(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU (13a tokenization, cased) and chrF of `hyps` against one reference each."""
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses but {len(refs)} references: they must be line-aligned")
    if not hyps:
        raise DataError("nothing to score: no hypotheses")
    bleu, chrf = BLEU(), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_text": str(bleu_score),
        "chrf_text": str(chrf_score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(hyps),
    }


def format_scores(scores: dict[str, Any]) -> str:
    """sacreBLEU's own score lines, each followed by its signature."""
    return "\n".join(
        f"{scores[f'{name}_text']}\n  signature: {scores[f'{name}_signature']}" for name in ("bleu", "chrf")
    )
