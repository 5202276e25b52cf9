"""A training run's data: its tokenizer and encoded train/valid corpora, for one pair or for every
direction of a multilingual config (each source then starts with its target-language tag)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mt.config import Config, directions, target_languages
from mt.corpus_cache import CorpusPart, EncodedCorpus, prepare_parts
from mt.data import corpus_files, iter_pairs
from mt.errors import DataError
from mt.run_dir import RunDir
from mt.tokenizer import Tokenizer, load_tokenizer, prepare_multilingual_tokenizer, prepare_tokenizer

log = logging.getLogger(__name__)


def run_parts(config: Config, split: str) -> list[CorpusPart]:
    """The files of `split` for each direction of the config (checked to exist and hold pairs), named
    by direction when the config is multilingual."""
    d = config.data
    parts = []
    for direction in directions(d):
        src_path, tgt_path = corpus_files(direction.dir, split, direction.src, direction.tgt)
        if next(iter_pairs(src_path, tgt_path, d.errors), None) is None:
            raise DataError(f"{src_path}: no sentence pairs")
        parts.append(CorpusPart(src_path, tgt_path, direction.name if d.directions else ""))
    return parts


def tagged(parts: list[CorpusPart], tokenizer: Tokenizer) -> list[CorpusPart]:
    """A multilingual config's parts, each source after its direction's target-language tag."""
    return [replace(p, src_prefix=(tokenizer.language_tags[p.name.split("-")[1]],)) if p.name else p for p in parts]


def _run_tokenizer(config: Config, run: RunDir, train_parts: list[CorpusPart]) -> Tokenizer:
    """Train (where missing) and load the run's tokenizer on the training files."""
    d = config.data
    if not d.directions:
        return prepare_tokenizer(run, config.tokenizer, train_parts[0].src_path, train_parts[0].tgt_path, d.errors)
    files: dict[str, list[Path]] = {}
    for direction, part in zip(directions(d), train_parts):
        for lang, path in ((direction.src, part.src_path), (direction.tgt, part.tgt_path)):
            if path.resolve() not in [p.resolve() for p in files.setdefault(lang, [])]:
                files[lang].append(path)  # a multi-way corpus's train.en serves every direction once
    return prepare_multilingual_tokenizer(run, config.tokenizer, files, target_languages(d), d.errors)


def prepare_run_data(
    config: Config, run: RunDir, main: bool = True, wait: Callable[[], None] = lambda: None
) -> tuple[Tokenizer, EncodedCorpus, EncodedCorpus]:
    """The run directory's tokenizer and encoded train/valid corpora: made by the `main` process (trained
    and encoded where missing or changed), loaded by the others once `wait()` returns.

    A multilingual config (`data.directions`) encodes every direction into one split, one after the
    other, each source starting with its target-language tag."""
    d, cache = config.data, run.cache
    train_parts, valid_parts = run_parts(config, d.train), run_parts(config, d.valid)
    limit = config.model.max_positions
    if main:
        tokenizer = _run_tokenizer(config, run, train_parts)
        sizes = {tokenizer.src_vocab_size, tokenizer.tgt_vocab_size}
        if max(sizes) < config.tokenizer.vocab_size:  # SentencePiece takes what a small corpus has
            log.warning(
                "tokenizer.vocab_size=%d, but the corpus supports only %s pieces: the model uses those",
                config.tokenizer.vocab_size,
                "/".join(str(n) for n in sorted(sizes)),
            )
        if d.directions:
            train_parts, valid_parts = tagged(train_parts, tokenizer), tagged(valid_parts, tokenizer)
        # a pair must also fit the model's positions (with BOS/EOS), whatever data.max_length says
        longest = min(d.max_length, config.model.max_positions)
        train = prepare_parts(cache, d.train, train_parts, tokenizer, longest, d.max_length_ratio, d.errors)
        # validation pairs must fit the model's positions; their references are kept as text
        valid = prepare_parts(cache, d.valid, valid_parts, tokenizer, limit, 0.0, d.errors, texts=True)
    wait()
    if not main:
        tokenizer = load_tokenizer(run, config.tokenizer.joint)
        train, valid = EncodedCorpus(cache, d.train), EncodedCorpus(cache, d.valid)
    if len(train) == 0:
        raise DataError(
            f"{train_parts[0].src_path}: no pairs shorter than data.max_length={d.max_length} "
            f"and model.max_positions={config.model.max_positions} pieces"
        )
    for part, (_, pairs) in zip(valid_parts, valid.parts):
        if len(pairs) == 0:
            raise DataError(f"{part.src_path}: no pairs within model.max_positions={limit}")
    return tokenizer, train, valid
