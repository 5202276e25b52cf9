import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mt.batching import collate, make_batches
from mt.loss import label_smoothed_nll
from mt.optim import inverse_sqrt_lr
from mt.vocab import BOS, EOS, PAD


def test_batches_cover_every_pair_once_within_the_token_bound():
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(1, 60, (500,), generator=generator).tolist()
    tgt = torch.randint(1, 60, (500,), generator=generator).tolist()
    batches = make_batches(src, tgt, max_tokens=300, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        assert len(batch) * max(max(src[i], tgt[i]) for i in batch) <= 300
    as_lists = [b.tolist() for b in batches]
    assert [b.tolist() for b in make_batches(src, tgt, 300, seed=3)] == as_lists
    assert [b.tolist() for b in make_batches(src, tgt, 300, seed=4)] != as_lists


@pytest.mark.parametrize("longest", [60, 70_000])  # one packed 4-byte key, and the lexsort beyond 16 bits
def test_batches_follow_a_stable_sort_by_source_then_target_length(longest):
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(1, longest, (2000,), generator=generator).numpy()
    tgt = torch.randint(1, longest, (2000,), generator=generator).numpy()
    unseeded = make_batches(src, tgt, max_tokens=10**9, seed=None)  # one batch: the sorted order itself
    assert len(unseeded) == 1 and np.array_equal(unseeded[0], np.lexsort((tgt, src)))
    # seeded, with a bound so tiny that every pair is its own batch: the same random tie order, then shuffled
    rng = np.random.default_rng(5)
    order = rng.permutation(len(src))
    reference = np.split(order[np.lexsort((tgt[order], src[order]))], len(src))
    rng.shuffle(reference)
    assert [b.tolist() for b in make_batches(src, tgt, max_tokens=1, seed=5)] == [b.tolist() for b in reference]


def test_an_overlong_pair_gets_its_own_batch():
    batches = make_batches([5, 500, 5], [5, 5, 5], max_tokens=100)
    assert [1] in [b.tolist() for b in batches]


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


def _pairs():
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(4, 40, (n,), generator=generator).tolist(),
            torch.randint(4, 40, (m,), generator=generator).tolist(),
        )
        for n, m in zip(range(3, 19), range(18, 2, -1))
    ]


def _sgd_update(groups, clip_norm=0.0):
    """The parameter change of one `Trainer.update` with plain SGD (lr 1): minus the gradient it applied."""
    from conftest import tiny_model

    from mt.config import TrainConfig
    from mt.trainer import make_trainer

    torch.manual_seed(0)
    model = tiny_model()
    config = TrainConfig(label_smoothing=0.1, clip_norm=clip_norm, precision="fp32")  # exact arithmetic
    trainer = make_trainer(model, config, torch.device("cpu"))
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.update([collate([p[0] for p in g], [p[1] for p in g]) for g in groups], lr=1.0)
    return [b - p.detach() for b, p in zip(before, model.parameters())], result, model


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    """A 4-way split of one batch, accumulated, equals the batch itself (update_freq)."""
    pairs = _pairs()
    whole, whole_result, _ = _sgd_update([pairs])
    split, split_result, _ = _sgd_update([pairs[i : i + 4] for i in range(0, 16, 4)])
    assert whole_result.applied and split_result.applied
    assert whole_result.stats.target_tokens == split_result.stats.target_tokens
    assert math.isclose(whole_result.stats.loss_sum, split_result.stats.loss_sum, rel_tol=1e-5)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("clip_norm", [0.0, 0.01])
def test_an_update_follows_the_per_token_mean_loss_clipped_to_clip_norm(clip_norm):
    """The gradients rescaled after backward are those of (loss sum / target tokens), clipped as clip_grad_norm_."""
    from mt.loss import TranslationLoss

    pairs = _pairs()
    applied, result, _ = _sgd_update([pairs], clip_norm)
    torch.manual_seed(0)
    from conftest import tiny_model

    model = tiny_model()
    src, tgt_in, tgt_out = collate([p[0] for p in pairs], [p[1] for p in pairs])
    loss_sum, _ = TranslationLoss(model, 0.1)(src, tgt_in, tgt_out)
    (loss_sum / result.stats.target_tokens).backward()
    if clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        assert norm > clip_norm  # the clip really acts
    for delta, p in zip(applied, model.parameters()):
        assert torch.allclose(delta, p.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_projected_loss_equals_the_plain_one_in_value_and_gradient(monkeypatch, smoothing):
    from mt import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 50)  # several chunks of 7 rows, the last one partial
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    fused, fused_nll = loss.projected_label_smoothed_nll(hidden, weight, targets, smoothing)
    (fused * 0.5).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain, plain_nll = label_smoothed_nll(F.linear(hidden, weight), targets, smoothing)
    (plain * 0.5).backward()
    assert torch.allclose(fused, plain, rtol=1e-5) and torch.allclose(fused_nll, plain_nll, rtol=1e-5)
    assert torch.allclose(fused_grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(fused_grads[1], weight.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(loss.projected_label_smoothed_nll(hidden, weight, targets, smoothing)[0], plain)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_trains_in_bf16_only_on_cpus_that_multiply_bf16(monkeypatch, native_bf16):
    from conftest import tiny_model

    import mt.device
    from mt.config import TrainConfig
    from mt.device import training_precision
    from mt.trainer import make_trainer

    monkeypatch.setattr(mt.device, "cpu_multiplies_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert training_precision(cpu, "auto") == ("bf16" if native_bf16 else "fp32")
    assert training_precision(cpu, "fp32") == "fp32" and training_precision(cpu, "bf16") == "bf16"
    assert training_precision(torch.device("mps"), "auto") == "fp32"
    model = tiny_model()
    assert make_trainer(model, TrainConfig(), cpu).precision == ("bf16" if native_bf16 else "fp32")
    assert make_trainer(model, TrainConfig(precision="fp32"), cpu).precision == "fp32"
