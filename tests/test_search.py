import dataclasses
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import mt.search
from mt.batching import pad
from mt.decoding import DecodeOptions
from mt.search import Hypothesis
from mt.vocab import BOS, EOS


def greedy_search(model, src, **settings):
    return mt.search.greedy_search(model, src, DecodeOptions(beam=1, **settings))


def beam_search(model, src, **settings):
    return mt.search.beam_search(model, src, DecodeOptions(**settings))


def _sources():
    """A batch of very different source lengths."""
    lengths = [2, 17, 5, 31, 1, 9]
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, 40, (n,), generator=generator).tolist() for n in lengths]


POSITIONS = pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])


def _random_model(position="sinusoidal"):
    model = tiny_model(position=position).eval()
    # sharpen the output distribution so hypotheses end at varied lengths
    with torch.no_grad():
        model.src_embed.weight.mul_(4)
    return model


@POSITIONS
def test_cached_and_uncached_greedy_agree(position):
    model, src = _random_model(position), pad(_sources(), suffix=[EOS])
    cached = greedy_search(model, src, use_cache=True)
    uncached = greedy_search(model, src, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in uncached]
    assert any(len(h.tokens) > 3 for h in cached)


@POSITIONS
def test_cached_and_uncached_beam_agree(position):
    model, src = _random_model(position), pad(_sources(), suffix=[EOS])
    cached = beam_search(model, src, beam=5, nbest=5, use_cache=True)
    uncached = beam_search(model, src, beam=5, nbest=5, use_cache=False)
    assert [[h.tokens for h in n] for n in cached] == [[h.tokens for h in n] for n in uncached]
    for a, b in zip(cached, uncached):
        assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))


def test_scoring_in_chunks_of_sentences_changes_no_hypothesis(monkeypatch):
    model, src = _random_model(), pad(_sources(), suffix=[EOS])

    def decode() -> list[list[Hypothesis]]:
        beams = beam_search(model, src, beam=5, nbest=5, no_repeat_ngram=2)
        return beams + [[h] for h in greedy_search(model, src, no_repeat_ngram=2)]

    whole = decode()
    monkeypatch.setattr(mt.search, "CHUNK_ELEMENTS", 2 * 5 * model.output_weight.size(0))  # 2 sentences per chunk
    chunked = decode()
    assert [[h.tokens for h in n] for n in chunked] == [[h.tokens for h in n] for n in whole]
    # matrix products over fewer rows may round differently in the last bit
    assert all(abs(a.score - b.score) < 1e-5 for x, y in zip(chunked, whole) for a, b in zip(x, y))


def test_beam_one_equals_greedy_without_length_penalty():
    model, src = _random_model(), pad(_sources(), suffix=[EOS])
    greedy = greedy_search(model, src, length_penalty=0.0)
    beam = beam_search(model, src, beam=1, length_penalty=0.0)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]


def test_beam_is_sorted_and_no_worse_than_greedy():
    model, src = _random_model(), pad(_sources(), suffix=[EOS])
    for penalty in (0.0, 1.0):
        greedy = greedy_search(model, src, length_penalty=penalty)
        beams = beam_search(model, src, beam=5, length_penalty=penalty, nbest=5)
        for g, hyps in zip(greedy, beams):
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert scores[0] >= g.score - 1e-5


def test_nbest_hypotheses_are_distinct():
    model, src = _random_model(), pad(_sources(), suffix=[EOS])
    for hyps in beam_search(model, src, beam=4, nbest=4):
        assert len(hyps) == 4
        assert len({tuple(h.tokens) for h in hyps}) == 4


def test_batch_decodes_like_each_sentence_alone():
    model, sources = _random_model(), _sources()
    batch_greedy = greedy_search(model, pad(sources, suffix=[EOS]))
    batch_beam = beam_search(model, pad(sources, suffix=[EOS]), beam=3)
    for i, ids in enumerate(sources):
        alone = pad([ids], suffix=[EOS])
        assert greedy_search(model, alone)[0].tokens == batch_greedy[i].tokens
        assert beam_search(model, alone, beam=3)[0][0].tokens == batch_beam[i][0].tokens


def test_hypotheses_respect_maximum_length():
    model, sources = _random_model(), _sources()
    src = pad(sources, suffix=[EOS])
    for ids, h in zip(sources, greedy_search(model, src, max_len_a=0.5, max_len_b=2)):
        assert len(h.tokens) + 1 <= int(0.5 * len(ids) + 2)
    for ids, hyps in zip(sources, beam_search(model, src, beam=3, max_len_a=0.5, max_len_b=2)):
        assert len(hyps[0].tokens) + 1 <= int(0.5 * len(ids) + 2)


def test_ban_repeated_ngrams():
    from mt.search import ban_repeated_ngrams

    prefix = torch.tensor([[BOS, 5, 6, 7, 5, 6], [BOS, 5, 6, 7, 8, 9]])
    log_probs = torch.zeros(2, 12)
    ban_repeated_ngrams(log_probs, prefix, 3)  # row 0 ends in "5 6", and "5 6 7" was seen
    assert torch.isinf(log_probs[0, 7]) and torch.isfinite(log_probs[0]).sum() == 11
    assert torch.isfinite(log_probs[1]).all()
    log_probs = torch.zeros(2, 12)
    ban_repeated_ngrams(log_probs, prefix, 2)  # row 0 ends in "6": "6 7" was seen
    assert torch.isinf(log_probs[0, 7]) and torch.isfinite(log_probs[1]).all()


def test_no_repeat_ngram_holds_in_greedy_and_beam_output():
    model, src = _random_model(), pad(_sources(), suffix=[EOS])
    plain = [h.tokens for h in greedy_search(model, src, max_len_b=30)]

    def bigrams(tokens):
        return list(zip(tokens, tokens[1:]))

    assert any(len(set(bigrams(t))) < len(bigrams(t)) for t in plain)  # the random model does repeat
    outputs = [h.tokens for h in greedy_search(model, src, max_len_b=30, no_repeat_ngram=2)]
    outputs += [hyps[0].tokens for hyps in beam_search(model, src, beam=3, max_len_b=30, no_repeat_ngram=2)]
    for tokens in outputs:
        assert len(set(bigrams(tokens))) == len(bigrams(tokens))


def test_beam_search_stops_early_only_when_no_open_hypothesis_can_still_win(monkeypatch):
    """The stopping bound is exact: never stopping early (a bound no score reaches) finds the same beams."""
    from mt.translate import Translator

    fixture = Path(__file__).parent / "fixtures" / "run_0.1.0"  # a trained model: hypotheses end at varied lengths
    translator = Translator(fixture / "run", device="cpu")
    model = translator.engine.model
    src = pad(translator.tokenizer.encode_src((fixture / "data" / "test.src").read_text().splitlines()), suffix=[EOS])
    steps = {"count": 0}  # decoder rows run
    step = model.step

    def counted(prefix, state):
        steps["count"] += prefix.size(0)
        return step(prefix, state)

    monkeypatch.setattr(model, "step", counted)
    for penalty in (0.0, 1.0, 2.0):
        steps["count"] = 0
        early = beam_search(model, src, beam=4, nbest=4, length_penalty=penalty, beam_stop="exact")
        early_steps = steps["count"]
        with monkeypatch.context() as patched:
            patched.setattr(mt.search, "best_reachable", lambda scores, length, limit, penalty: scores + torch.inf)
            steps["count"] = 0
            exhaustive = beam_search(model, src, beam=4, nbest=4, length_penalty=penalty, beam_stop="exact")
        assert [[h.tokens for h in n] for n in early] == [[h.tokens for h in n] for n in exhaustive]
        assert early_steps <= steps["count"]
        if penalty < 2:  # at penalty 2 the bound at the length limit stays above every finished score here
            assert early_steps < steps["count"]


def test_each_looser_stopping_rule_runs_fewer_decoder_rows(monkeypatch):
    """exact >= heuristic >= k_finished in work; heuristic is exact at length penalty 0, and every rule
    returns K finished hypotheses per sentence."""
    from mt.translate import Translator

    fixture = Path(__file__).parent / "fixtures" / "run_0.1.0"
    translator = Translator(fixture / "run", device="cpu")
    model = translator.engine.model
    src = pad(translator.tokenizer.encode_src((fixture / "data" / "test.src").read_text().splitlines()), suffix=[EOS])
    rows = {"count": 0}
    step = model.step

    def counted(prefix, state):
        rows["count"] += prefix.size(0)
        return step(prefix, state)

    monkeypatch.setattr(model, "step", counted)
    for penalty in (0.0, 1.0):
        work, outputs = {}, {}
        for rule in ("exact", "heuristic", "k_finished"):
            rows["count"] = 0
            found = beam_search(model, src, beam=4, nbest=4, length_penalty=penalty, beam_stop=rule)
            work[rule], outputs[rule] = rows["count"], [[h.tokens for h in hyps] for hyps in found]
            assert all(len(hyps) == 4 for hyps in found)
        assert work["exact"] >= work["heuristic"] >= work["k_finished"]
        assert work["exact"] > work["k_finished"]
        if penalty == 0:
            assert outputs["heuristic"] == outputs["exact"] and work["heuristic"] == work["exact"]


def test_an_unknown_stopping_rule_is_refused():
    from mt.config import DecodeConfig
    from mt.errors import MTError

    with pytest.raises(MTError, match="beam stop 'soon': choose one of exact, heuristic, k_finished"):
        DecodeOptions.from_config(DecodeConfig(), beam_stop="soon")


def test_best_reachable_bounds_every_continuation():
    """An open hypothesis's log-probability only falls; its normalised score can never exceed the bound."""
    generator = torch.Generator().manual_seed(3)
    for penalty in (0.0, 0.6, 1.0, 2.0):
        log_prob = -torch.rand(50, generator=generator) * 5  # at length 3
        limit = torch.full((50,), 12)
        bound = mt.search.best_reachable(log_prob, 3, limit, penalty)
        for extra in range(1, 10):  # any continuation: more pieces, lower log-probability
            later = log_prob - torch.rand(50, generator=generator) * extra
            assert (later / (3 + extra) ** penalty <= bound + 1e-6).all()


def test_decode_options_come_from_the_config_and_none_keeps_its_value():
    from mt.config import DecodeConfig
    from mt.errors import MTError

    config = DecodeConfig(beam=4, length_penalty=0.6, max_tokens=1000)
    options = DecodeOptions.from_config(config, beam=None, nbest=2, length_penalty=None)
    assert (options.beam, options.nbest, options.length_penalty, options.rows_per_batch) == (4, 2, 0.6, 250)
    assert DecodeOptions.from_config(config, beam=1).rows_per_batch == 1000
    with pytest.raises(MTError, match="nbest 5: must be between 1 and the beam size"):
        DecodeOptions.from_config(config, nbest=5)
    with pytest.raises(dataclasses.FrozenInstanceError):  # vary it with dataclasses.replace
        options.beam = 2


def test_every_caller_truncates_an_overlong_source_to_the_model_positions(caplog):
    from mt.decoding import decode
    from mt.translate import Translator

    translator = Translator(Path(__file__).parent / "fixtures" / "run_0.1.0" / "run", device="cpu")
    limit = translator.engine.max_source
    long, short = [5] * (limit + 20), [5] * limit
    hyps = decode(translator.engine, [long, short], translator.options(beam=2))
    assert [h[0].tokens for h in hyps][0] == hyps[1][0].tokens
    assert f"input line of {limit + 20} pieces truncated to {limit}" in caplog.text


@pytest.mark.parametrize("beam", [1, 4])
def test_batches_decoded_side_by_side_find_what_one_at_a_time_finds(monkeypatch, beam):
    import threading

    import mt.decoding
    from mt.decoding import TorchEngine, decode

    threads_used = set()
    original = mt.decoding.search

    def recorded(*args, **kwargs):
        threads_used.add((threading.current_thread().name, torch.get_num_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(mt.decoding, "search", recorded)
    engine, sources = TorchEngine(_random_model("rope"), torch.device("cpu")), _sources() * 4
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        found = {}
        for workers in (1, 2):
            threads_used.clear()
            options = DecodeOptions(beam=beam, nbest=beam, max_tokens=40 * beam, workers=workers)
            found[workers] = decode(engine, sources, options)
            assert torch.get_num_threads() == 2  # the caller's threads are given back
            if workers == 2:  # several batches ran in two threads with one intra-op thread each
                assert {count for _, count in threads_used} == {1} and len(threads_used) == 2
    finally:
        torch.set_num_threads(before)
    for one, two in zip(found[1], found[2]):
        assert [h.tokens for h in one] == [h.tokens for h in two]
        assert [h.score for h in one] == pytest.approx([h.score for h in two], abs=1e-5)


def test_workers_keep_order_pass_errors_on_and_give_the_threads_back():
    from mt.config import DecodeConfig
    from mt.device import cpu_workers, map_in_workers
    from mt.errors import MTError

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert map_in_workers(lambda x: x * x, range(7), 2) == [0, 1, 4, 9, 16, 25, 36]
        started = []

        def fails_first(x):
            started.append(x)
            if x == 0:
                raise ZeroDivisionError
            time.sleep(0.05)
            return x

        with pytest.raises(ZeroDivisionError):
            map_in_workers(fails_first, range(20), 2)
        assert len(started) < 20  # the batches still queued after the error are not run
        assert torch.get_num_threads() == 2
        assert cpu_workers(0, torch.device("cpu")) == 2 and cpu_workers(3, torch.device("cpu")) == 3
        assert cpu_workers(0, torch.device("cuda")) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(MTError, match="decode.workers -1: must be >= 0"):
        DecodeOptions.from_config(DecodeConfig(workers=-1))
