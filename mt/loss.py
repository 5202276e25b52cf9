"""Label-smoothed cross entropy over the non-padding target positions.

`label_smoothed_nll` is the plain definition on given logits. `projected_label_smoothed_nll`
computes the same loss from decoder states and the output projection without ever holding the
(positions, vocabulary) logits of a whole batch: it runs in chunks of rows and computes the
gradients of each chunk right away (the loss is the last node of the graph, so they are known
in the forward pass). A 4k-token batch with an 8k vocabulary would otherwise keep four
131 MB tensors alive (logits, log-probabilities and their gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.ops import linear
from mt.vocab import PAD

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32)


def label_smoothed_nll(logits: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """logits (N, V) and targets (N,) of real (non-padding) positions -> (smoothed loss sum, NLL sum).

    The smoothed loss spreads `smoothing` of the target mass uniformly over the vocabulary
    (Szegedy et al., 2016); the NLL is the unsmoothed loss used for perplexity.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    nll = F.nll_loss(log_probs, targets, reduction="sum")
    if smoothing == 0:
        return nll, nll.detach()
    uniform = -log_probs.mean(dim=-1).sum()
    return (1 - smoothing) * nll + smoothing * uniform, nll.detach()


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _ProjectedLoss(torch.autograd.Function):
    """Output projection + label-smoothed NLL, chunked, with gradients computed in the forward pass.

    d loss / d logits = softmax(logits) - (1 - smoothing) * onehot(target) - smoothing / V.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, smoothing: float):
        vocab = weight.size(0)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        nll_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        step = _chunk_rows(vocab)
        for start in range(0, hidden.size(0), step):
            rows, target = hidden[start : start + step], targets[start : start + step, None]
            probs = F.linear(rows, weight).float().log_softmax(dim=-1)
            nll = -probs.gather(1, target).sum()
            nll_sum += nll
            loss_sum += (1 - smoothing) * nll - smoothing * probs.mean(dim=-1).sum()
            probs = probs.exp_()  # in place: one (rows, V) buffer per chunk
            probs.sub_(smoothing / vocab).scatter_add_(1, target, probs.new_full(target.shape, smoothing - 1))
            grad_hidden[start : start + step] = probs.to(weight.dtype) @ weight
            grad_weight += (probs.t() @ rows.to(probs.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(nll_sum)
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, None


def projected_label_smoothed_nll(
    hidden: Tensor, weight: Tensor, targets: Tensor, smoothing: float
) -> tuple[Tensor, Tensor]:
    """hidden (N, D) decoder states of real positions, weight (V, D) -> (smoothed loss sum, NLL sum).

    Equals `label_smoothed_nll(F.linear(hidden, weight), targets, smoothing)` in value and gradient.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ProjectedLoss.apply(hidden, weight, targets, smoothing)
    loss_sum = nll_sum = hidden.new_zeros((), dtype=torch.float32)
    step = _chunk_rows(weight.size(0))
    for start in range(0, hidden.size(0), step):
        rows, target = hidden[start : start + step], targets[start : start + step]
        loss, nll = label_smoothed_nll(linear(rows, weight), target, smoothing)
        loss_sum, nll_sum = loss_sum + loss, nll_sum + nll
    return loss_sum, nll_sum


class TranslationLoss(nn.Module):
    """The model and its training loss as one module, the unit that DDP and torch.compile wrap."""

    def __init__(self, model: nn.Module, smoothing: float):
        super().__init__()
        self.model, self.smoothing = model, smoothing

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced (smoothed loss sum, NLL sum) over the real target positions of a batch."""
        hidden = self.model(src, tgt_in)
        real = tgt_out != PAD
        # the output projection only runs on real target positions, not on padding
        return projected_label_smoothed_nll(hidden[real], self.model.output_weight, tgt_out[real], self.smoothing)
