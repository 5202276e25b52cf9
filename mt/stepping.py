"""What one search step asks of the model(s): `Models` (one Transformer, or an ensemble that shares
the target vocabulary, possibly cut to a batch's shortlist) and `NextPieces`, the next-piece
log-probabilities they give, computed a slice of rows at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from mt.model import PROJECTION_ALIGNMENT, DecoderState, Transformer, project
from mt.ops import ReducedWeight
from mt.vocab import BOS, PAD


class NextPieces:
    """The next-piece log-probabilities of R open hypotheses, computed for a slice of rows at a time
    (a whole batch's (R, V) never has to exist at once).

    With a shortlist the distribution covers its C candidates only: column c is piece candidates[c],
    and `column` maps piece ids to columns (-1 for a piece outside the shortlist). Columns from
    `real_width` on are padding (PAD, probability 0).
    """

    def __init__(
        self,
        hidden: list[Tensor],
        output_weights: list[Tensor | ReducedWeight],
        weights: list[float],
        vocab: int,
        candidates: Tensor | None = None,
        columns: Tensor | None = None,
        never: list[int] | None = None,
        real_width: int | None = None,
    ):
        self.hidden, self.output_weights, self.weights = hidden, output_weights, weights  # per model
        self.vocab, self.candidates = vocab, candidates  # V, and the shortlist's (C,) ids or None
        self.width = vocab if candidates is None else len(candidates)  # columns of `log_probs`
        self.real_width = self.width if real_width is None else real_width  # columns past it: padding
        self.columns = columns  # (V,) each piece's column, -1 outside the shortlist; None without one
        self.never = never or []  # a shortlist's columns of PAD and BOS, if it holds them: never chosen

    def log_probs(self, rows: slice) -> Tensor:
        """(rows, width) in fp32: one model's log-softmax, or the weighted mean of the ensemble's (over
        the shortlist's candidates only, when there is one)."""
        total = None
        for hidden, output_weight, weight in zip(self.hidden, self.output_weights, self.weights):
            logits = project(hidden[rows], output_weight)
            if self.candidates is None:
                logits = logits[:, : self.width]  # the whole vocabulary, without the weight's padding
            elif self.real_width < self.width:
                logits[:, self.real_width :] = -torch.inf  # padding columns: outside the softmax
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if len(self.hidden) > 1:
                log_probs.mul_(weight)
            total = log_probs if total is None else total.add_(log_probs)
        return total

    def column(self, pieces: Tensor | int) -> Tensor | int:
        """Piece ids -> their columns in `log_probs` (-1: not a candidate)."""
        return pieces if self.columns is None else self.columns[pieces]

    def piece_index(self, index: Tensor) -> Tensor:
        """Indices into (hypothesis, column) -> indices into (hypothesis, piece id): hypothesis * V + id."""
        if self.candidates is None:
            return index
        return index // self.width * self.vocab + self.candidates[index % self.width]


class Models:
    """The model(s) one search steps through: a Transformer, or an ensemble that shares the target
    vocabulary, each member with its own encoder output and cache; weights are normalised to sum to 1."""

    def __init__(self, models: list[Transformer], weights: list[float] | None = None, candidates: Tensor | None = None):
        weights = weights or [1.0] * len(models)
        if len(weights) != len(models) or min(weights) <= 0:
            raise ValueError(f"ensemble weights {weights}: one positive weight per model ({len(models)})")
        self.members, self.weights = models, [w / sum(weights) for w in weights]
        self.max_positions = min(m.max_positions for m in models)
        self.vocab = models[0].output_weight.size(0)
        self.candidates = candidates  # (C,) sorted target ids a shortlist allows (then PAD padding), or None: all
        self.columns, self.never, self.real_width = None, None, None
        if candidates is not None:
            self.columns = torch.full((self.vocab,), -1, dtype=torch.long, device=candidates.device)
            self.columns[candidates] = torch.arange(len(candidates), device=candidates.device)
            self.never = [column for column in self.columns[[PAD, BOS]].tolist() if column >= 0]
            # PAD columns up to a multiple of PROJECTION_ALIGNMENT, so the projection needs no padding
            # of its own (and its output no slicing, which costs log-softmax a copy); they are ruled
            # out before the softmax
            self.real_width = len(candidates)
            self.candidates = torch.cat(
                [candidates, candidates.new_full((-len(candidates) % PROJECTION_ALIGNMENT,), PAD)]
            )

    def restricted(self, candidates: Tensor | None) -> Models:
        """The same models, their output layer cut to `candidates` (a batch's shortlist) for one search."""
        return Models(self.members, self.weights, candidates)

    def start(self, src: Tensor, use_cache: bool) -> list[DecoderState]:
        """src (B, S) -> each member's decoder state (its encoder output, keys/values of the source)."""
        # a shortlist cuts each member's output projection to its candidates' columns, once per batch
        return [m.start_decoding(*m.encode(src), use_cache, self.candidates) for m in self.members]

    def step(self, prefix: Tensor, states: list[DecoderState]) -> tuple[NextPieces, list[DecoderState]]:
        """prefix (R, t) -> the next-piece distribution of each row, and the members' new states."""
        stepped = [m.step(prefix, state) for m, state in zip(self.members, states)]
        new_states = [state for _, state in stepped]
        hidden, weights = [h for h, _ in stepped], [s.output_weight for s in new_states]
        found = NextPieces(
            hidden, weights, self.weights, self.vocab, self.candidates, self.columns, self.never, self.real_width
        )
        return found, new_states


def select(states: list[DecoderState], rows: Tensor, sentences: Tensor | None = None) -> list[DecoderState]:
    return [state.select(rows, sentences) for state in states]


def as_models(model: Transformer | Models) -> Models:
    return model if isinstance(model, Models) else Models([model])
