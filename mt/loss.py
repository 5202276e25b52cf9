"""Label-smoothed cross entropy over the non-padding target positions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
