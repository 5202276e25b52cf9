"""Batches bounded by token count: length-sorted so padding stays small, shuffled per epoch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mt.vocab import BOS, EOS, PAD

_CHUNK = 1 << 16  # lengths turned into Python ints at a time while packing batches


def make_batches(
    src_lengths: Sequence[int] | np.ndarray,
    tgt_lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    seed: int | None = None,
) -> list[np.ndarray]:
    """Group pair indices so that `batch size * longest sequence` stays within `max_tokens` on each side.

    Pairs are sorted by (source, target) length; with a seed, ties are broken randomly and the
    batch order is shuffled, so each epoch sees different batches of similar-length pairs.
    A single pair longer than `max_tokens` gets a batch of its own. Each batch is an int64 array
    of indices (views into one sorted order, so millions of pairs cost a few bytes each).
    """
    src, tgt = np.asarray(src_lengths), np.asarray(tgt_lengths)
    rng = np.random.default_rng(seed) if seed is not None else None
    order = rng.permutation(len(src)) if rng is not None else np.arange(len(src))
    if len(src) < 2**31:  # 4-byte indices: millions of pairs, a few bytes each
        order = order.astype(np.int32)
    order = order[_by_length(src, tgt, order)]  # a stable sort: equal lengths keep the random order
    longest_in_order = np.maximum(src[order], tgt[order])
    boundaries, count, longest = [], 0, 0
    for start in range(0, len(order), _CHUNK):
        for position, length in enumerate(longest_in_order[start : start + _CHUNK].tolist(), start):
            if count and (count + 1) * max(longest, length) > max_tokens:
                boundaries.append(position)
                count, longest = 0, 0
            count += 1
            longest = max(longest, length)
    batches = np.split(order, boundaries) if len(order) else []
    if rng is not None:
        rng.shuffle(batches)
    return batches


def direction_shares(sizes: Sequence[int], temperature: float) -> list[int]:
    """Pairs each direction contributes to an epoch of sum(sizes) pairs: proportional to
    size ** (1 / temperature), so a temperature above 1 gives small directions more turns."""
    total = sum(sizes)
    weights = np.array([n ** (1.0 / temperature) if n else 0.0 for n in sizes])
    if not total or not weights.sum():
        return list(sizes)
    return [int(round(total * w / weights.sum())) for w in weights]


def sample_directions(ranges: Sequence[range], temperature: float, seed: int) -> np.ndarray | None:
    """One epoch's pair indices when directions (`ranges` of a multilingual corpus) are drawn by
    temperature: a direction given more pairs than it has repeats them all and draws the rest, one
    given fewer draws without replacement. None when that is every pair once (one direction, or
    shares equal to the sizes)."""
    sizes = [len(r) for r in ranges]
    shares = direction_shares(sizes, temperature)
    if shares == sizes:
        return None
    rng = np.random.default_rng(seed)
    chosen = []
    for pairs, share in zip(ranges, shares):
        if not len(pairs):
            continue
        rounds, rest = divmod(share, len(pairs))
        whole = np.tile(np.arange(pairs.start, pairs.stop), rounds)
        chosen.append(np.concatenate([whole, pairs.start + rng.choice(len(pairs), rest, replace=False)]))
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def _by_length(src: np.ndarray, tgt: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Positions in `order` sorted by (source, target) length, stably: one 4-byte key where lengths fit."""
    if len(src) and max(int(src.max()), int(tgt.max())) < 1 << 16 and min(int(src.min()), int(tgt.min())) >= 0:
        key = (src[order].astype(np.uint32) << 16) | tgt[order].astype(np.uint32)
        return np.argsort(key, kind="stable")
    return np.lexsort((tgt[order], src[order]))


def pad(sequences: Sequence[Sequence[int]], prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> Tensor:
    """Right-pad `prefix + seq + suffix` for each sequence into a (B, L) LongTensor."""
    length = max(len(s) for s in sequences) + len(prefix) + len(suffix)
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = [*prefix, *seq, *suffix]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def collate(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Source `ids EOS`, decoder input `BOS ids`, decoder output `ids EOS`, each padded (B, L)."""
    return pad(src, suffix=[EOS]), pad(tgt, prefix=[BOS]), pad(tgt, suffix=[EOS])
