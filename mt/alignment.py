"""Word alignments from cross-attention: which source word each target word attends to most.

The decoder's cross-attention of one layer, averaged over heads, is summed over the pieces of
each source word and averaged over the pieces of each target word; every target word is then
aligned to the source word with the most weight. Words are what SentencePiece marks with its
word-boundary sign, so indices count whitespace-separated words of the source line and of the
detokenized translation. Output follows the usual `i-j` (source i, target j, from 0) format.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new word


def word_of_each_piece(pieces: list[str]) -> list[int]:
    """The word index of each piece: a piece after a "▁" begins the next word. A piece of nothing
    but "▁" (SentencePiece may split it off) belongs to the word after it (the last word at the
    end), so the words counted are those of the detokenized text."""
    words: list[int | None] = []
    index, boundary, seen_text = 0, False, False
    for piece in pieces:
        boundary |= piece.startswith(WORD_START)
        if not piece.lstrip(WORD_START):
            words.append(None)
            continue
        if boundary and seen_text:
            index += 1
        boundary, seen_text = False, True
        words.append(index)
    following = index
    for position in range(len(words) - 1, -1, -1):
        if words[position] is None:
            words[position] = following
        following = words[position]
    return words  # type: ignore[return-value]


def word_alignment(attention: Tensor, src_pieces: list[str], tgt_pieces: list[str]) -> list[tuple[int, int]]:
    """attention (len(tgt_pieces), len(src_pieces)) without the EOS rows/columns -> (source word,
    target word) pairs, one per target word, in target order."""
    if not src_pieces or not tgt_pieces:
        return []
    src_words, tgt_words = word_of_each_piece(src_pieces), word_of_each_piece(tgt_pieces)
    attention = attention.float()
    by_word = attention.new_zeros(len(tgt_pieces), src_words[-1] + 1)
    by_word.index_add_(1, torch.tensor(src_words), attention)  # (target pieces, source words)
    per_target = attention.new_zeros(tgt_words[-1] + 1, src_words[-1] + 1)
    per_target.index_add_(0, torch.tensor(tgt_words), by_word)  # (target words, source words)
    return [(int(source), target) for target, source in enumerate(per_target.argmax(dim=1).tolist())]


def format_alignment(pairs: list[tuple[int, int]]) -> str:
    return " ".join(f"{source}-{target}" for source, target in pairs)
