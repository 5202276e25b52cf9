"""AdamW with an inverse-square-root schedule; the learning rate is a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from mt.config import TrainConfig


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` updates, then decay with 1/sqrt(step)."""
    step = max(step, 1)
    if warmup == 0:
        return peak / math.sqrt(step)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # biases, norms and embeddings are not weight-decayed
        (no_decay if param.dim() < 2 or "embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel: one pass over each parameter instead of a dozen elementwise ops; on 2 CPU
    # cores 7-9 ms instead of 24-47 ms for the Multi30k preset's 7.8 M parameters (~2 % of an update)
    fused = {p.device.type for p in model.parameters()} <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=1e-8, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
