"""Ensembles: log-probabilities averaged at every step, each model with its own cache."""

import shutil

import pytest
import torch
from conftest import run_mt, tiny_model

from mt.batching import pad
from mt.config import TokenizerConfig
from mt.decoding import DecodeOptions, TorchEngine, decode, score
from mt.search import search
from mt.stepping import Models
from mt.tokenizer import train_sentencepiece
from mt.vocab import BOS, EOS, PAD


def _model(seed: int):
    torch.manual_seed(seed)
    model = tiny_model().eval()
    with torch.no_grad():
        model.src_embed.weight.mul_(4)  # sharper distributions: hypotheses of varied lengths
    return model


def _sources():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(4, 40, (n,), generator=generator).tolist() for n in (2, 9, 5, 14)]


@pytest.mark.parametrize("beam", [1, 4])
def test_an_ensemble_of_a_model_with_itself_is_the_model_alone(beam):
    model, src = _model(0), pad(_sources(), suffix=[EOS])
    options = DecodeOptions(beam=beam, nbest=beam)
    alone, twice = search(model, src, options), search(Models([model, model]), src, options)
    assert [[(h.tokens, h.score) for h in n] for n in alone] == [[(h.tokens, h.score) for h in n] for n in twice]


def _reference_greedy(models, weights, source: list[int], max_len: int) -> list[int]:
    """Greedy decoding the slow way: every model rerun on the whole prefix, log-probabilities averaged."""
    src = torch.tensor([source + [EOS]])
    tokens = [BOS]
    with torch.no_grad():
        for _ in range(max_len):
            tgt = torch.tensor([tokens])
            mixed = sum(w * torch.log_softmax(m.logits(m(src, tgt))[0, -1], -1) for m, w in zip(models, weights))
            mixed[PAD] = mixed[BOS] = -torch.inf
            tokens.append(int(mixed.argmax()))
            if tokens[-1] == EOS:
                break
    return tokens[1:-1] if tokens[-1] == EOS else tokens[1:]


def test_a_weighted_ensemble_equals_averaging_log_probabilities_by_hand():
    models, weights = [_model(0), _model(1)], [0.25, 0.75]
    options = DecodeOptions(beam=1, max_len_a=0.0, max_len_b=12)
    found = decode(TorchEngine(models, torch.device("cpu"), [1.0, 3.0]), _sources(), options)  # normalised to 1/4, 3/4
    for source, hyps in zip(_sources(), found):
        assert hyps[0].tokens == _reference_greedy(models, weights, source, 11)[: len(hyps[0].tokens)]
    alone = [decode(TorchEngine(m, torch.device("cpu")), _sources(), options) for m in models]
    assert found != alone[0] and found != alone[1]  # the ensemble is neither member


def test_cached_and_uncached_ensemble_beam_agree():
    ensemble, src = Models([_model(0), _model(1)]), pad(_sources(), suffix=[EOS])
    cached = search(ensemble, src, DecodeOptions(beam=4, nbest=4))
    uncached = search(ensemble, src, DecodeOptions(beam=4, nbest=4, use_cache=False))
    assert [[h.tokens for h in n] for n in cached] == [[h.tokens for h in n] for n in uncached]


def test_the_forced_score_of_an_ensemble_is_its_members_weighted_mean():
    models, sources = [_model(0), _model(1)], _sources()
    targets = [s[::-1] for s in sources]
    options = DecodeOptions(length_penalty=0.0)
    mixed = score(TorchEngine(models, torch.device("cpu"), [1.0, 3.0]), sources, targets, options)
    alone = [score(TorchEngine(m, torch.device("cpu")), sources, targets, options) for m in models]
    for pair, first, second in zip(mixed, *alone):
        assert pair.total == pytest.approx(0.25 * first.total + 0.75 * second.total, abs=1e-4)


def test_ensembles_through_the_cli(trained, tmp_path):
    run, test = trained / "run", trained / "test.src"
    lines = "".join(test.read_text().splitlines(keepends=True)[:20])
    alone = run_mt("translate", str(run), stdin=lines).stdout
    assert run_mt("translate", str(run), str(run), stdin=lines).stdout == alone
    reference = ("--src", str(test), "--ref", str(trained / "test.tgt"))
    assert run_mt("eval", str(run), str(run), *reference).stdout == run_mt("eval", str(run), *reference).stdout
    wrong = run_mt("translate", str(run), str(run), "--weight", "1", stdin=lines, check=False)
    assert wrong.returncode == 2 and "one positive weight per model (2 models, 1 weights)" in wrong.stderr
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    train_sentencepiece(["7 8 9 0 1 2"] * 50, other / "spm.model", TokenizerConfig(vocab_size=16))
    refused = run_mt("translate", str(run), str(other), stdin=lines, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "source SentencePiece model differs" in refused.stderr
