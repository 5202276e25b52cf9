import math

import torch
import torch.nn.functional as F

from mt.batching import collate, make_batches
from mt.loss import label_smoothed_nll
from mt.optim import inverse_sqrt_lr
from mt.tokenizer import BOS, EOS, PAD


def test_batches_cover_every_pair_once_within_the_token_bound():
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(1, 60, (500,), generator=generator).tolist()
    tgt = torch.randint(1, 60, (500,), generator=generator).tolist()
    batches = make_batches(src, tgt, max_tokens=300, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        assert len(batch) * max(max(src[i], tgt[i]) for i in batch) <= 300
    assert make_batches(src, tgt, 300, seed=3) == batches
    assert make_batches(src, tgt, 300, seed=4) != batches


def test_an_overlong_pair_gets_its_own_batch():
    batches = make_batches([5, 500, 5], [5, 5, 5], max_tokens=100)
    assert [1] in batches


def test_collate_adds_bos_eos_and_pads_right():
    src, tgt_in, tgt_out = collate([[5, 6], [7]], [[8], [9, 10]])
    assert src.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert tgt_in.tolist() == [[BOS, 8, PAD], [BOS, 9, 10]]
    assert tgt_out.tolist() == [[8, EOS, PAD], [9, 10, EOS]]


def test_label_smoothing_matches_torch():
    logits, targets = torch.randn(12, 30), torch.randint(0, 30, (12,))
    loss, nll = label_smoothed_nll(logits, targets, 0.1)
    assert torch.allclose(loss, F.cross_entropy(logits, targets, label_smoothing=0.1, reduction="sum"), atol=1e-4)
    assert torch.allclose(nll, F.cross_entropy(logits, targets, reduction="sum"), atol=1e-4)


def test_inverse_sqrt_schedule():
    assert inverse_sqrt_lr(50, 1e-3, 100) == 5e-4
    assert inverse_sqrt_lr(100, 1e-3, 100) == 1e-3
    assert math.isclose(inverse_sqrt_lr(400, 1e-3, 100), 5e-4)
