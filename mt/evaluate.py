"""Scores from sacreBLEU's own API on detokenized text, with their signatures, and paired
bootstrap resampling to tell whether one system really beats another."""

from __future__ import annotations

import json
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest

from mt.errors import DataError

METRICS = ("bleu", "chrf", "ter")


def _metrics() -> dict[str, Any]:
    """BLEU (13a tokenization, cased), chrF2 and TER, as sacreBLEU's command line computes them."""
    return {"bleu": BLEU(), "chrf": CHRF(), "ter": TER()}


def _check_aligned(hyps: list[str], refs: list[str], name: str = "") -> None:
    if len(hyps) != len(refs):
        where = f"{name}: " if name else ""
        raise DataError(f"{where}{len(hyps)} hypotheses but {len(refs)} references: they must be line-aligned")
    if not hyps:
        raise DataError("nothing to score: no hypotheses")


def corpus_scores(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU, chrF and TER of `hyps` against one reference each, with sacreBLEU's texts and signatures."""
    _check_aligned(hyps, refs)
    scores: dict[str, Any] = {"sentences": len(hyps)}
    for name, metric in _metrics().items():
        result = metric.corpus_score(hyps, [refs])
        scores[name] = result.score
        scores[f"{name}_text"] = str(result)
        scores[f"{name}_signature"] = str(metric.get_signature())
    return scores


def format_scores(scores: dict[str, Any]) -> str:
    """sacreBLEU's own score lines, each followed by its signature."""
    return "\n".join(f"{scores[f'{name}_text']}\n  signature: {scores[f'{name}_signature']}" for name in METRICS)


def paired_bootstrap(systems: dict[str, list[str]], refs: list[str], samples: int = 1000) -> list[dict[str, Any]]:
    """sacreBLEU's paired bootstrap resampling: every system against the first (the baseline).

    Per system and metric: the score, the mean over `samples` resamples, the half-width of the
    95% confidence interval, and (not for the baseline) the p-value of the difference to the baseline.
    """
    if len(systems) < 2:
        raise DataError("paired bootstrap needs at least two hypothesis files (the first is the baseline)")
    for name, hyps in systems.items():
        _check_aligned(hyps, refs, name)
    metrics = _metrics()
    test = PairedTest(list(systems.items()), metrics, [refs], test_type="bs", n_samples=samples)
    signatures, table = test()
    columns = [key for key in table if key != "System"]  # sacreBLEU's names (BLEU, chrF2, TER), in our order
    rows = []
    for index, name in enumerate(table["System"]):
        row: dict[str, Any] = {"system": name, "baseline": index == 0}
        for metric, column in zip(metrics, columns):
            result = table[column][index]
            values = {"score": result.score, "mean": result.mean, "ci95": result.ci, "p_value": result.p_value}
            row[metric] = {k: None if v is None else float(v) for k, v in values.items()}  # numpy -> JSON-able
            row[f"{metric}_signature"] = str(signatures[column])
        rows.append(row)
    return rows


def format_paired(rows: list[dict[str, Any]], samples: int) -> str:
    lines = [f"paired bootstrap resampling ({samples} samples); mean +- 95% CI; p-value against the baseline"]
    for row in rows:
        cells = []
        for metric in METRICS:
            r = row[metric]
            p = "" if row["baseline"] else f" (p = {r['p_value']:.4f})"
            cells.append(f"{metric.upper() if metric != 'chrf' else 'chrF'} {r['mean']:.2f} +- {r['ci95']:.2f}{p}")
        label = f"{row['system']} (baseline)" if row["baseline"] else row["system"]
        lines.append(f"{label}: " + "; ".join(cells))
    lines += [f"  {metric} signature: {rows[0][f'{metric}_signature']}" for metric in METRICS]
    return "\n".join(lines)


def score_report(
    systems: dict[str, list[str]], refs: list[str], bootstrap_samples: int = 0, as_json: bool = False
) -> str:
    """The scores of each system (hypotheses by name) as text or JSON; with `bootstrap_samples`, the
    paired bootstrap comparison of every system against the first instead."""
    if bootstrap_samples:
        rows = paired_bootstrap(systems, refs, bootstrap_samples)
        return json.dumps(rows, indent=2) if as_json else format_paired(rows, bootstrap_samples)
    results = {name: corpus_scores(hyps, refs) for name, hyps in systems.items()}
    if as_json:
        plain = {name: {k: v for k, v in r.items() if not k.endswith("_text")} for name, r in results.items()}
        return json.dumps(plain if len(plain) > 1 else next(iter(plain.values())), indent=2)
    return "\n".join((f"{name}:\n" if len(results) > 1 else "") + format_scores(r) for name, r in results.items())
