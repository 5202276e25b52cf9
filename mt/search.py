"""Greedy and batched beam search over `Transformer.step`.

Scores: a hypothesis y of a source x scores  log P(y | x) / len(y) ** length_penalty,  where
len(y) counts the generated pieces including the final EOS. length_penalty 0 ranks by raw
log-probability; 1 (the default) by average log-probability per piece.

A hypothesis has at most  max_len_a * len(x) + max_len_b  pieces (len(x) without EOS); at that
length EOS is forced. With `no_repeat_ngram` N > 0, no hypothesis contains the same N-gram twice.

Beam search stops a sentence (`beam_stop`) once K hypotheses have finished and
  exact:       no open hypothesis can still beat the K-th finished one, however it goes on (its
               outputs are those of a search that never stops early);
  heuristic:   no open hypothesis would beat it by ending at the next step (Hugging Face's rule;
               with length_penalty 0 the same as exact);
  k_finished:  at once (fairseq's and CTranslate2's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mt.model import Transformer
from mt.stepping import Models, NextPieces, as_models, select
from mt.vocab import BOS, EOS, PAD

if TYPE_CHECKING:  # the options record lives with the decoding path that builds it
    from mt.decoding import DecodeOptions


@dataclass
class Hypothesis:
    tokens: list[int]  # generated pieces, without BOS and EOS
    score: float  # log-probability / length ** length_penalty
    log_prob: float


def search_name(beam: int) -> str:
    return "greedy" if beam == 1 else f"beam {beam}"


def source_lengths(src: Tensor) -> Tensor:
    """(B, S) padded sources ending in EOS -> (B,) their lengths without EOS."""
    return (src != PAD).sum(dim=1) - 1


def max_lengths(src_lengths: Tensor, a: float, b: int, limit: int) -> Tensor:
    """(B,) the most pieces (EOS included) the hypotheses of sources this long (EOS excluded) may have."""
    return (a * src_lengths.float() + b).long().clamp(1, limit - 1)


def ban_repeated_ngrams(log_probs: Tensor, prefix: Tensor, n: int, columns: Tensor | None = None) -> None:
    """Rule out (in place) every piece that would repeat an n-gram already in its hypothesis.

    log_probs (R, V), or (R, C) with `columns` mapping piece ids to its columns (-1: none); prefix
    (R, t) with BOS first. Vectorised over all rows: the last n-1 pieces of each row are compared
    with every n-gram window of that row.
    """
    generated = prefix[:, 1:]
    if n < 1 or generated.size(1) < n:
        return
    windows = generated.unfold(1, n, 1)  # (R, W, n)
    tail = generated[:, generated.size(1) - n + 1 :]  # (R, n-1)
    repeats = (windows[:, :, : n - 1] == tail[:, None, :]).all(dim=-1)  # (R, W)
    rows, starts = repeats.nonzero().unbind(1)
    banned = windows[rows, starts, n - 1]
    if columns is not None:
        banned = columns[banned]
        rows, banned = rows[banned >= 0], banned[banned >= 0]
    log_probs[rows, banned] = -torch.inf


CHUNK_ELEMENTS = 1 << 22  # log-probabilities scored at a time (16 MB in fp32)


def best_extensions(
    next_pieces: NextPieces,
    prefix: Tensor,
    scores: Tensor,
    at_limit: Tensor,
    count: int,
    no_repeat_ngram: int = 0,
    forced: Tensor | None = None,
    sampler: Sampler | None = None,
) -> tuple[Tensor, Tensor]:
    """The `count` best one-piece extensions of each sentence's open hypotheses.

    n sentences with h open hypotheses each: next_pieces the distributions of their n*h rows,
    prefix (n*h, t), scores (n, h) their log-probabilities, at_limit (n,) sentences whose next
    piece must be EOS, forced (n,) the piece a target prefix dictates (-1: none) -> (n, count)
    scores of the extended hypotheses and their indices into h*V (hypothesis * V + piece). PAD and
    BOS are never chosen. With a `sampler` (count 1), the extension is drawn instead of the best.

    Runs over chunks of sentences, so a step never holds the (n*h, V) log-probabilities of a whole
    batch: large decoding batches do not raise the peak memory by them (with decode.max_tokens
    6144 and beam 5 a step's are ~13 MB; peak RSS of the decoding benchmark fell by ~25 MB).
    """
    n, open_per_sentence = scores.shape
    vocab = next_pieces.width  # the shortlist's candidates, or the whole vocabulary
    eos = next_pieces.column(EOS)
    sentences_per_chunk = max(1, CHUNK_ELEMENTS // (open_per_sentence * vocab))
    chunks = []
    for start in range(0, n, sentences_per_chunk):
        end = min(n, start + sentences_per_chunk)
        rows = slice(start * open_per_sentence, end * open_per_sentence)
        log_probs = next_pieces.log_probs(rows)
        if next_pieces.candidates is None:
            log_probs[:, PAD] = log_probs[:, BOS] = -torch.inf
        elif next_pieces.never:
            log_probs[:, next_pieces.never] = -torch.inf
        dictated = None
        if forced is not None:
            wanted = forced[start:end].repeat_interleave(open_per_sentence)  # per row
            dictated_rows = (wanted >= 0).nonzero().squeeze(1)
            if dictated_rows.numel():
                pieces = next_pieces.column(wanted[dictated_rows])  # a shortlist holds the prefixes' pieces
                dictated = dictated_rows, pieces, log_probs[dictated_rows, pieces].clone()
        if no_repeat_ngram:
            ban_repeated_ngrams(log_probs, prefix[rows], no_repeat_ngram, next_pieces.columns)
        if dictated is not None:  # a prefix's piece is taken at its probability, whatever else is ruled out
            dictated_rows, pieces, values = dictated
            log_probs[dictated_rows] = -torch.inf
            log_probs[dictated_rows, pieces] = values
        candidates = log_probs.view(end - start, open_per_sentence, vocab).add_(scores[start:end, :, None])
        forced = at_limit[start:end]
        if forced.any():
            # after the scores are added, so EOS stays the only choice even where they are NaN (a diverged model)
            ending = candidates[forced, :, eos]
            candidates[forced] = -torch.inf
            candidates[forced, :, eos] = ending
        candidates = candidates.view(end - start, open_per_sentence * vocab)
        if sampler is not None:
            chunks.append(sampler(candidates, eos))
        elif count == 1:  # greedy: max keeps the first of equal scores
            chunks.append(candidates.max(dim=1, keepdim=True))
        else:
            chunks.append(candidates.topk(min(count, candidates.size(1)), dim=1))
    if len(chunks) == 1:
        return chunks[0][0], next_pieces.piece_index(chunks[0][1])
    return torch.cat([c[0] for c in chunks]), next_pieces.piece_index(torch.cat([c[1] for c in chunks]))


class Sampler:
    """Draws one extension per row from its distribution, reshaped by temperature, top-k and top-p."""

    def __init__(self, options: DecodeOptions, generator: torch.Generator | None):
        self.temperature, self.top_k, self.top_p = options.temperature, options.top_k, options.top_p
        self.generator = generator

    def __call__(self, candidates: Tensor, eos: int = EOS) -> tuple[Tensor, Tensor]:
        """candidates (n, V) log-probabilities plus a constant per row -> (n, 1) the chosen's and its
        index; `eos` the column of EOS."""
        logits = candidates / self.temperature  # the row's constant leaves the softmax alone
        if 0 < self.top_k < logits.size(1):
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1:
            ordered, order = logits.sort(dim=1, descending=True)
            probs = torch.softmax(ordered, dim=1)
            outside = probs.cumsum(dim=1) - probs > self.top_p  # the most probable piece always stays
            logits = logits.scatter(1, order, ordered.masked_fill(outside, -torch.inf))
        probs = torch.softmax(logits, dim=1).nan_to_num_(0.0)
        probs[probs.sum(dim=1) == 0, eos] = 1.0  # a row with nothing left (a diverged model) ends
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        return candidates.gather(1, chosen), chosen


def prefix_table(prefixes: list[list[int]] | None, device: torch.device) -> Tensor | None:
    """(B, L) each sentence's target prefix, -1 past its end; None when there are none."""
    if not prefixes or not any(prefixes):
        return None
    table = torch.full((len(prefixes), max(len(p) for p in prefixes)), -1, dtype=torch.long)
    for row, pieces in enumerate(prefixes):
        table[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
    return table.to(device)


def forced_pieces(table: Tensor | None, active: Tensor, length: int) -> Tensor | None:
    """(n,) the piece each active sentence's prefix dictates at position `length` (1-based), -1: none."""
    if table is None or length > table.size(1):
        return None
    return table[active, length - 1]


def length_limits(
    src_lengths: Tensor, prefix_lengths: Tensor | None, options: DecodeOptions, max_positions: int
) -> Tensor:
    """(B,) the most pieces (EOS included) hypotheses of sources this long (EOS excluded) may have,
    with room for their target prefixes' pieces too."""
    limit = max_lengths(src_lengths, options.max_len_a, options.max_len_b, max_positions)
    if prefix_lengths is not None:
        limit = torch.maximum(limit, prefix_lengths + 1).clamp(max=max_positions - 1)
    return limit


def prefix_lengths(table: Tensor | None) -> Tensor | None:
    return None if table is None else (table >= 0).sum(dim=1)


STOPPING_RULES = ("exact", "heuristic", "k_finished")


def stopping_score(rule: str, log_prob: Tensor, length: int, limit: Tensor, length_penalty: float) -> Tensor:
    """(n,) the score a sentence's K-th finished hypothesis must reach for the sentence to stop, under
    `rule` (see the module docstring), given its best open hypothesis's log-probability (n,)."""
    if rule == "exact":
        return best_reachable(log_prob, length, limit, length_penalty)
    if rule == "heuristic":
        return log_prob / (length + 1) ** length_penalty
    return torch.full_like(log_prob, torch.finfo(log_prob.dtype).min)  # any finished score will do


def best_reachable(log_prob: Tensor, length: int, limit: Tensor, length_penalty: float) -> Tensor:
    """(n,) the best normalised score open hypotheses of `length` pieces and these log-probabilities can
    still reach by the sentences' length limits (n,): the log-probability can only fall, so the score
    peaks at the next length (penalty < 0) or at the limit (penalty > 0)."""
    return torch.maximum(log_prob / (length + 1) ** length_penalty, log_prob / limit.float().pow(length_penalty))


@torch.inference_mode()
def greedy_search(
    model: Transformer | Models,
    src: Tensor,
    options: DecodeOptions,
    prefixes: list[list[int]] | None = None,
    sampler: Sampler | None = None,
) -> list[Hypothesis]:
    """The most probable next piece at every step (or, with a `sampler`, a drawn one); src (B, S) ->
    one hypothesis per sentence, starting with its prefix when `prefixes` are given.

    Finished sentences leave the batch, so later steps only compute the ones still running.
    """
    models = as_models(model)
    states = models.start(src, options.use_cache)
    table = prefix_table(prefixes, src.device)
    limit = length_limits(source_lengths(src), prefix_lengths(table), options, models.max_positions)
    prefix = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)
    log_prob = torch.zeros(src.size(0), device=src.device)
    active = torch.arange(src.size(0), device=src.device)  # original sentence index of each row
    results: list[Hypothesis | None] = [None] * src.size(0)
    for length in range(1, int(limit.max()) + 1):
        next_pieces, states = models.step(prefix, states)
        forced, dictated = length >= limit, forced_pieces(table, active, length)
        best, token = best_extensions(
            next_pieces, prefix, log_prob[:, None], forced, 1, options.no_repeat_ngram, dictated, sampler
        )
        log_prob, token = best[:, 0], token[:, 0]
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        done = token == EOS
        if not done.any():
            continue
        for row in done.nonzero().squeeze(1).tolist():
            score = log_prob[row].item()
            normalised = score / length**options.length_penalty
            results[active[row]] = Hypothesis(prefix[row, 1:-1].tolist(), normalised, score)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active, prefix, log_prob, limit = active[keep], prefix[keep], log_prob[keep], limit[keep]
        states = select(states, keep, keep)
    return results  # type: ignore[return-value]


def sample(
    model: Transformer | Models,
    src: Tensor,
    options: DecodeOptions,
    prefixes: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """`options.nbest` independent samples per sentence, most probable first."""
    n = options.nbest
    repeated = [p for p in prefixes for _ in range(n)] if prefixes else None
    drawn = greedy_search(model, src.repeat_interleave(n, dim=0), options, repeated, Sampler(options, generator))
    return [sorted(drawn[i * n : (i + 1) * n], key=lambda h: h.score, reverse=True) for i in range(src.size(0))]


def search(
    model: Transformer | Models,
    src: Tensor,
    options: DecodeOptions,
    prefixes: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Sampling when `options.sampling`, else greedy search when `options.beam` is 1, beam search
    otherwise; per sentence a list of hypotheses, each starting with the sentence's prefix if given."""
    if options.sampling:
        return sample(model, src, options, prefixes, generator)
    if options.beam == 1:
        return [[h] for h in greedy_search(model, src, options, prefixes)]
    return beam_search(model, src, options, prefixes)


@torch.inference_mode()
def beam_search(
    model: Transformer | Models, src: Tensor, options: DecodeOptions, prefixes: list[list[int]] | None = None
) -> list[list[Hypothesis]]:
    """Beam search for a whole batch at once; src (B, S) -> per sentence its `options.nbest` best hypotheses.

    Each step extends the K open hypotheses of every sentence, keeps the 2K best candidates,
    moves those ending in EOS (among the top K) to the sentence's finished list and continues
    with the K best others. A sentence stops at its maximum length, or once it has K finished
    hypotheses and `options.beam_stop` says no open one is still worth following (module docstring).
    """
    k, length_penalty = options.beam, options.length_penalty
    batch = src.size(0)
    device = src.device
    models = as_models(model)
    states = models.start(src, options.use_cache)
    table = prefix_table(prefixes, device)
    limit = length_limits(source_lengths(src), prefix_lengths(table), options, models.max_positions)
    # the first step has one hypothesis (BOS) per sentence; afterwards there are K
    prefix = torch.full((batch, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(batch, 1, device=device)  # (n, hypotheses per sentence): their log-probs
    active = torch.arange(batch, device=device)  # original sentence index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    kth_finished = torch.full((batch,), -torch.inf, device=device)  # K-th best finished score
    beam_offsets = torch.arange(k, device=device)

    for length in range(1, int(limit.max()) + 1):
        n, open_per_sentence = scores.shape
        next_pieces, states = models.step(prefix, states)
        at_limit = length >= limit
        dictated = forced_pieces(table, active, length)
        top_scores, top_index = best_extensions(
            next_pieces, prefix, scores, at_limit, 2 * k, options.no_repeat_ngram, dictated
        )  # (n, 2K)
        vocab = next_pieces.vocab
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == EOS

        ends = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
        if ends.any():
            # one transfer for all hypotheses ending now, not one per hypothesis
            end_sentence, end_rank = ends.nonzero().unbind(1)
            end_rows = end_sentence * open_per_sentence + top_beam[end_sentence, end_rank]
            penalty = length**length_penalty
            for i, original, tokens, raw in zip(
                end_sentence.tolist(),
                active[end_sentence].tolist(),
                prefix[end_rows, 1:].tolist(),
                top_scores[end_sentence, end_rank].tolist(),
            ):
                hyps = finished[original]
                hyps.append(Hypothesis(tokens, raw / penalty, raw))
                if len(hyps) >= k:
                    kth_finished[i] = sorted((h.score for h in hyps), reverse=True)[k - 1]

        open_scores, pick = top_scores.masked_fill(is_eos, -torch.inf).topk(k, dim=1)  # (n, K)
        rows = (torch.arange(n, device=device)[:, None] * open_per_sentence + top_beam.gather(1, pick)).view(-1)
        prefix = torch.cat([prefix[rows], top_token.gather(1, pick).view(-1, 1)], dim=1)
        scores = open_scores
        states = select(states, rows)

        best_open = scores[:, 0]
        stop_at = stopping_score(options.beam_stop, best_open, length, limit, length_penalty)
        done = at_limit | (kth_finished >= stop_at)
        done |= ~torch.isfinite(best_open)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            keep_rows = (keep[:, None] * k + beam_offsets).view(-1)
            active, scores, limit, kth_finished = active[keep], scores[keep], limit[keep], kth_finished[keep]
            prefix = prefix[keep_rows]
            states = select(states, keep_rows, keep)

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[: options.nbest] for hyps in finished]
