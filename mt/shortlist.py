"""A lexical shortlist: which target pieces a batch of sources may need, so decoding projects onto
those rows of the output layer only.

Built from the encoded training corpus without an aligner: for each source piece, the target
pieces that co-occur with it most by the Dice coefficient 2 c(s, t) / (c(s) + c(t)) over the
sentence pairs (c counts pairs holding the piece), plus the most frequent target pieces and EOS,
which every batch may use. Stored as plain integer arrays (`np.load` without pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mt.errors import CheckpointError
from mt.files import atomic_write
from mt.vocab import EOS

log = logging.getLogger(__name__)

CHUNK_PAIRS = 20_000  # pairs counted at a time: their (source, target) codes stay a few MB


@dataclass
class Shortlist:
    per_source: np.ndarray  # (source vocabulary, N) int32 target ids, best first; -1 where fewer
    frequent: np.ndarray  # (K,) int32 the most frequent target ids
    tokenizer: str  # fingerprint of the SentencePiece model(s) it was built with

    def candidates(self, src: Tensor) -> Tensor:
        """(B, S) source ids -> sorted unique target ids the batch may produce (EOS always among them)."""
        table = torch.from_numpy(self.per_source)
        present = torch.unique(src.cpu())
        present = present[present < table.size(0)]
        chosen = table[present].flatten()
        every = torch.cat(
            [chosen[chosen >= 0], torch.from_numpy(self.frequent), torch.tensor([EOS], dtype=torch.int32)]
        )
        return torch.unique(every.long()).to(src.device)

    def save(self, path: Path) -> None:
        arrays = {"per_source": self.per_source, "frequent": self.frequent, "tokenizer": np.array(self.tokenizer)}
        atomic_write(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: Path, tokenizer: str) -> Shortlist:
        """The shortlist at `path`, checked to belong to the SentencePiece model(s) of fingerprint `tokenizer`."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                shortlist = cls(arrays["per_source"], arrays["frequent"], str(arrays["tokenizer"]))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a shortlist ({exc})") from None
        if shortlist.tokenizer != tokenizer:
            raise CheckpointError(f"{path}: built for another SentencePiece model; build it again: mt shortlist")
        return shortlist


def build_shortlist(
    corpus,
    src_vocab: int,
    tgt_vocab: int,
    tokenizer: str,
    per_source: int = 50,
    frequent: int = 200,
    max_pairs: int = 1_000_000,
    seed: int = 1,
) -> Shortlist:
    """Count co-occurrences over (a random `max_pairs` of) `corpus`'s pairs (an EncodedCorpus) and keep,
    for each source piece, its `per_source` best target pieces by Dice, and the `frequent` commonest."""
    order = np.arange(len(corpus))
    if len(order) > max_pairs:
        order = np.sort(np.random.default_rng(seed).choice(len(order), max_pairs, replace=False))
    src_counts, tgt_counts = np.zeros(src_vocab, np.int64), np.zeros(tgt_vocab, np.int64)
    codes, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for start in range(0, len(order), CHUNK_PAIRS):
        chunk = []
        for index in order[start : start + CHUNK_PAIRS].tolist():
            src, tgt = np.unique(corpus.src_sentence(index)), np.unique(corpus.tgt_sentence(index))
            src_counts[src] += 1
            tgt_counts[tgt] += 1
            chunk.append((src[:, None].astype(np.int64) * tgt_vocab + tgt[None, :]).ravel())
        merged = np.concatenate([codes, *chunk])
        weights = np.concatenate([counts, np.ones(len(merged) - len(codes), np.int64)])
        codes, inverse = np.unique(merged, return_inverse=True)
        counts = np.bincount(inverse, weights=weights).astype(np.int64)
    sources, targets = codes // tgt_vocab, codes % tgt_vocab
    dice = 2 * counts / (src_counts[sources] + tgt_counts[targets])
    ranked = np.lexsort((-dice, sources))  # by source piece, best target first
    sources, targets = sources[ranked], targets[ranked]
    group_start = np.searchsorted(sources, sources, side="left")
    rank = np.arange(len(sources)) - group_start
    keep = rank < per_source
    table = np.full((src_vocab, per_source), -1, np.int32)
    table[sources[keep], rank[keep]] = targets[keep]
    seen = np.flatnonzero(tgt_counts)  # never PAD or BOS, which no corpus sentence holds
    commonest = seen[np.argsort(-tgt_counts[seen], kind="stable")][:frequent].astype(np.int32)
    log.info(
        "shortlist from %d pairs: %d target pieces per source piece, %d frequent ones", len(order), per_source, frequent
    )
    return Shortlist(table, commonest, tokenizer)


def write_shortlist(run_dir: Path, per_source: int = 50, frequent: int = 200) -> Path:
    """Build the shortlist of a run directory from its encoded training corpus and store it there."""
    from mt.config import load_config
    from mt.corpus_cache import EncodedCorpus
    from mt.run_dir import RunDir
    from mt.tokenizer import load_tokenizer

    run = RunDir(run_dir)
    config = load_config(run.config)
    if not (run.cache / f"{config.data.train}.json").is_file():
        raise CheckpointError(f"{run.cache}: no encoded training corpus to build a shortlist from")
    tokenizer = load_tokenizer(run, config.tokenizer.joint)
    corpus = EncodedCorpus(run.cache, config.data.train)
    vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    build_shortlist(corpus, *vocab, tokenizer.fingerprint(), per_source, frequent).save(run.shortlist)
    return run.shortlist
