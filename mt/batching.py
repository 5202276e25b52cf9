"""Batches bounded by token count: length-sorted so padding stays small, shuffled per epoch."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from mt.tokenizer import BOS, EOS, PAD


def make_batches(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int, seed: int | None = None
) -> list[list[int]]:
    """Group pair indices so that `batch size * longest sequence` stays within `max_tokens` on each side.

    Pairs are sorted by (source, target) length; with a seed, ties are broken randomly and the
    batch order is shuffled, so each epoch sees different batches of similar-length pairs.
    A single pair longer than `max_tokens` gets a batch of its own.
    """
    order = list(range(len(src_lengths)))
    rng = random.Random(seed) if seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: (src_lengths[i], tgt_lengths[i]))
    batches, current, longest = [], [], 0
    for index in order:
        length = max(src_lengths[index], tgt_lengths[index])
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


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
