"""Forced scoring (`mt score`): the log-probability of a given translation, as beam search scores it."""

import json
from pathlib import Path

import pytest
from conftest import run_mt

from mt.decoding import score
from mt.translate import Translator

FIXTURE = Path(__file__).parent / "fixtures" / "run_0.1.0"
RUN, SOURCE = FIXTURE / "run", FIXTURE / "data" / "test.src"


@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_the_score_of_beam_searchs_own_output_is_what_beam_search_reported(length_penalty):
    translator = Translator(RUN, device="cpu")
    options = translator.options(beam=4, nbest=4, length_penalty=length_penalty)
    lines = SOURCE.read_text().splitlines()
    sources = translator.tokenizer.encode_src(lines)
    hypotheses = translator.translate_ids(sources, options)
    pairs = [(src, hyp) for src, hyps in zip(sources, hypotheses) for hyp in hyps]
    scores = score(translator.engine, [s for s, _ in pairs], [h.tokens for _, h in pairs], options)
    for (_, hyp), found in zip(pairs, scores):
        assert len(found.pieces) == len(hyp.tokens) + 1  # and the closing EOS
        assert found.total == pytest.approx(hyp.log_prob, abs=1e-4)
        assert found.normalised == pytest.approx(hyp.score, abs=1e-4)


def test_mt_score_prints_one_line_per_pair_and_refuses_misaligned_files(tmp_path):
    lines = SOURCE.read_text().splitlines()[:5]
    (tmp_path / "src").write_text("".join(f"{line}\n" for line in lines))
    translations = run_mt("translate", str(RUN), stdin="".join(f"{line}\n" for line in lines)).stdout
    (tmp_path / "tgt").write_text(translations)
    result = run_mt("score", str(RUN), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"))
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 5 and all(len(row) == 3 for row in rows)
    assert all(float(normalised) <= 0 and float(total) <= 0 for normalised, total, _ in rows)
    as_json = run_mt("score", str(RUN), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"), "--json")
    first = json.loads(as_json.stdout.splitlines()[0])
    assert first["total"] == pytest.approx(sum(first["pieces"]), abs=1e-3)
    assert first["total"] == pytest.approx(float(rows[0][1]), abs=1e-3)
    (tmp_path / "short").write_text("1 2\n")
    result = run_mt("score", str(RUN), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "short"), check=False)
    assert result.returncode == 2 and "has 5 lines" in result.stderr and "line-aligned" in result.stderr


def test_a_ctranslate2_export_scores_as_the_model_does(tmp_path):
    pytest.importorskip("ctranslate2")
    run_mt("export", str(RUN), "--quantization", "float32", "-o", str(tmp_path / "export"))
    lines = SOURCE.read_text().splitlines()
    ours, theirs = Translator(RUN, device="cpu"), Translator(tmp_path / "export", device="cpu")
    assert type(theirs.engine).__name__ == "CTranslate2Engine"
    targets = [" ".join(reversed(line.split())) for line in lines]
    for a, b in zip(ours.score(lines, targets), theirs.score(lines, targets)):
        assert b.pieces == pytest.approx(a.pieces, abs=1e-3)
