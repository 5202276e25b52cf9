"""Target prefixes (the output starts as given, the search continues) and seeded sampling."""

from pathlib import Path

import pytest
from conftest import run_mt

from mt.decoding import score
from mt.errors import MTError
from mt.translate import Translator

FIXTURE = Path(__file__).parent / "fixtures" / "run_0.1.0"
RUN, SOURCE = FIXTURE / "run", FIXTURE / "data" / "test.src"
LINES = SOURCE.read_text().splitlines()


@pytest.fixture(scope="module")
def translator():
    return Translator(RUN, device="cpu")


@pytest.mark.parametrize("beam", [1, 4])
def test_every_hypothesis_starts_with_its_prefix_and_scores_as_forced_scoring_says(translator, beam):
    sources = translator.tokenizer.encode_src(LINES)
    prefixes = [ids[:2] for ids in translator.tokenizer.encode_tgt(["9 9 9"] * len(LINES))]  # not what it would say
    options = translator.options(beam=beam, nbest=beam)
    found = translator.translate_ids(sources, options, prefixes)
    for source, prefix, hyps in zip(sources, prefixes, found):
        assert len(hyps) == beam and all(h.tokens[: len(prefix)] == prefix for h in hyps)
        assert any(len(h.tokens) > len(prefix) for h in hyps)  # the search went on after the prefix
        forced = score(translator.engine, [source] * beam, [h.tokens for h in hyps], options)
        assert [f.total for f in forced] == pytest.approx([h.log_prob for h in hyps], abs=1e-4)


def test_a_prefix_the_model_would_choose_anyway_changes_nothing(translator):
    sources = translator.tokenizer.encode_src(LINES)
    free = translator.translate_ids(sources, translator.options(beam=1))
    forced = translator.translate_ids(sources, translator.options(beam=1), [h[0].tokens[:2] for h in free])
    assert [h[0].tokens for h in forced] == [h[0].tokens for h in free]


def test_prefixes_through_the_cli_by_tsv_and_by_file(tmp_path):
    lines = LINES[:4]
    tsv = "".join(f"{line}\t5 5\n" for line in lines)
    by_tsv = run_mt("translate", str(RUN), "--tsv", "--beam", "3", stdin=tsv).stdout.splitlines()
    assert len(by_tsv) == 4 and all(out.startswith("5 5") for out in by_tsv)
    (tmp_path / "prefixes").write_text("5 5\n" * 4)
    plain = "".join(f"{line}\n" for line in lines)
    by_file = run_mt("translate", str(RUN), "--prefix-file", str(tmp_path / "prefixes"), "--beam", "3", stdin=plain)
    assert by_file.stdout.splitlines() == by_tsv
    (tmp_path / "short").write_text("5 5\n")
    short = run_mt("translate", str(RUN), "--prefix-file", str(tmp_path / "short"), stdin=plain, check=False)
    assert short.returncode == 2 and "fewer lines than the input" in short.stderr


def _sample(translator, seed: int, **settings):
    options = translator.options(sampling=True, seed=seed, nbest=3, **settings)
    return [
        [h.tokens for h in hyps] for hyps in translator.translate_ids(translator.tokenizer.encode_src(LINES), options)
    ]


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds(translator):
    flat = {"temperature": 2.0}  # a sharp tiny model needs a flatter distribution to vary
    assert _sample(translator, 1, **flat) == _sample(translator, 1, **flat)
    assert _sample(translator, 1, **flat) != _sample(translator, 2, **flat)
    varied = _sample(translator, 1, **flat)
    assert any(len({tuple(s) for s in samples}) > 1 for samples in varied)  # diverse n-best


def test_sampling_from_the_top_piece_only_is_greedy_search(translator):
    greedy = translator.translate_ids(translator.tokenizer.encode_src(LINES), translator.options(beam=1))
    for top in ({"top_k": 1}, {"top_p": 1e-6}):
        assert all(
            samples == [h[0].tokens] * 3 for samples, h in zip(_sample(translator, 5, temperature=3.0, **top), greedy)
        )


def test_sampling_through_the_cli(tmp_path):
    stdin = "".join(f"{line}\n" for line in LINES[:5])
    first = run_mt("translate", str(RUN), "--sampling", "--temperature", "2", "--seed", "3", stdin=stdin).stdout
    assert first == run_mt("translate", str(RUN), "--sampling", "--temperature", "2", "--seed", "3", stdin=stdin).stdout
    nbest = run_mt("translate", str(RUN), "--sampling", "--nbest", "4", "--top-k", "5", stdin=stdin).stdout
    assert len(nbest.splitlines()) == 20
    bad = run_mt("translate", str(RUN), "--sampling", "--top-p", "0", stdin=stdin, check=False)
    assert bad.returncode == 2 and "0 < top_p <= 1" in bad.stderr


def test_a_ctranslate2_export_takes_prefixes_and_refuses_to_sample(tmp_path, translator):
    pytest.importorskip("ctranslate2")
    run_mt("export", str(RUN), "--quantization", "float32", "-o", str(tmp_path / "export"))
    exported = Translator(tmp_path / "export", device="cpu")
    sources = translator.tokenizer.encode_src(LINES)
    prefixes = [ids[:2] for ids in translator.tokenizer.encode_tgt(["9 9 9"] * len(LINES))]
    options = translator.options(beam=1)
    theirs = exported.translate_ids(sources, options, prefixes)
    assert [h[0].tokens for h in theirs] == [h[0].tokens for h in translator.translate_ids(sources, options, prefixes)]
    with pytest.raises(MTError, match="CTranslate2's samples do not follow a seed"):
        _sample(exported, 4)
