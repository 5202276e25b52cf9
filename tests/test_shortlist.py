"""The lexical shortlist: built from co-occurrences, stored safely, and the output layer cut to it."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import run_mt, tiny_model

from mt.config import TokenizerConfig
from mt.corpus_cache import prepare_corpus
from mt.decoding import DecodeOptions, TorchEngine, decode
from mt.errors import CheckpointError
from mt.model import PROJECTION_ALIGNMENT
from mt.shortlist import Shortlist, build_shortlist
from mt.stepping import Models
from mt.tokenizer import prepare_tokenizer
from mt.vocab import EOS


def _word_corpus(tmp_path):
    # every source word has one translation; the pairs mix words at random
    rng = np.random.default_rng(0)
    words = {f"q{i}": f"z{i}" for i in range(8)}
    src_lines, tgt_lines = [], []
    for _ in range(400):
        chosen = rng.choice(list(words), size=3, replace=False)
        src_lines.append(" ".join(chosen))
        tgt_lines.append(" ".join(words[w] for w in chosen))
    (tmp_path / "c.src").write_text("\n".join(src_lines) + "\n")
    (tmp_path / "c.tgt").write_text("\n".join(tgt_lines) + "\n")
    return tmp_path / "c.src", tmp_path / "c.tgt", words


def test_each_source_piece_ranks_its_translation_first_and_the_file_loads_without_pickle(tmp_path):
    src, tgt, words = _word_corpus(tmp_path)
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=40, joint=False), src, tgt)
    corpus = prepare_corpus(tmp_path / "cache", "train", src, tgt, tokenizer, max_length=None)
    vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    shortlist = build_shortlist(corpus, *vocab, tokenizer.fingerprint(), per_source=3, frequent=2)
    for source, target in words.items():
        source_ids, target_ids = tokenizer.src.encode(source), tokenizer.tgt.encode(target)
        assert target_ids[-1] in shortlist.per_source[source_ids[-1]][:1]  # the word's own piece first
    assert shortlist.per_source.shape == (vocab[0], 3) and len(shortlist.frequent) == 2
    path = tmp_path / "shortlist.npz"
    shortlist.save(path)
    again = Shortlist.load(path, tokenizer.fingerprint())
    assert np.array_equal(again.per_source, shortlist.per_source) and again.tokenizer == shortlist.tokenizer
    with pytest.raises(CheckpointError, match="another SentencePiece model"):
        Shortlist.load(path, "0" * 16)
    candidates = again.candidates(torch.tensor([tokenizer.src.encode("q1 q2")]))
    assert EOS in candidates.tolist() and candidates.tolist() == sorted(set(candidates.tolist()))
    assert len(candidates) < vocab[1]


def test_a_shortlist_of_every_piece_changes_nothing_and_a_small_one_keeps_outputs_inside_it():
    model = tiny_model(vocab=40).eval()
    engine = TorchEngine(model, torch.device("cpu"))
    sources = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    everything = Shortlist(np.arange(40, dtype=np.int32)[None, :].repeat(40, 0), np.zeros(0, np.int32), "x")
    few = np.array([4, 20, 21, 22, 23], dtype=np.int32)
    small = Shortlist(np.tile(few, (40, 1)), np.zeros(0, np.int32), "x")
    for beam in (1, 3):
        options = DecodeOptions(beam=beam, max_len_b=6)
        plain = decode(engine, sources, options)
        engine.shortlist = everything
        full = decode(engine, sources, DecodeOptions(beam=beam, max_len_b=6, shortlist=True))
        assert [[h.tokens for h in hyps] for hyps in full] == [[h.tokens for h in hyps] for hyps in plain]
        assert [h[0].score for h in full] == pytest.approx([h[0].score for h in plain], abs=1e-5)
        engine.shortlist = small
        cut = decode(engine, sources, DecodeOptions(beam=beam, max_len_b=6, shortlist=True))
        assert all(set(h.tokens) <= set(few.tolist()) for hyps in cut for h in hyps)
        engine.shortlist = None


def test_next_pieces_over_candidates_are_the_log_softmax_of_those_logits():
    model = tiny_model(vocab=40).eval()
    candidates = torch.tensor([3, 7, 11, 30])
    src = torch.tensor([[5, 6, 7, EOS]])
    models = Models([model]).restricted(candidates)
    with torch.inference_mode():
        states = models.start(src, True)
        next_pieces, _ = models.step(torch.tensor([[2]]), states)
        got = next_pieces.log_probs(slice(0, 1))
        hidden = model.step(torch.tensor([[2]]), model.start_decoding(*model.encode(src)))[0]
        want = torch.log_softmax(model.logits(hidden)[:, candidates], dim=-1)
    # column c is piece candidates[c]; the columns padding them to PROJECTION_ALIGNMENT have probability 0
    assert got.shape == (1, PROJECTION_ALIGNMENT) and torch.allclose(got[:, :4], want, atol=1e-5)
    assert torch.isneginf(got[:, 4:]).all()
    assert next_pieces.column(torch.tensor([7, 8])).tolist() == [1, -1]
    width = next_pieces.width
    assert next_pieces.piece_index(torch.tensor([2, width + 3])).tolist() == [11, 40 + 30]  # hypothesis * V + id


def test_training_builds_a_shortlist_that_translate_and_export_use(trained, tmp_path):
    assert (trained / "run" / "shortlist.npz").is_file()
    run = tmp_path / "run"  # a copy: the shared model stays as trained
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    stdin = "1 2 3\n4 5 6 7\n9 0 1\n"
    plain = run_mt("translate", str(run), stdin=stdin).stdout
    assert run_mt("translate", str(run), "--shortlist", stdin=stdin).stdout == plain  # digits: all in the list
    run_mt("shortlist", str(run), "--per-source", "5", "--frequent", "3")
    assert run_mt("translate", str(run), "--shortlist", stdin=stdin).stdout.count("\n") == 3
    pytest.importorskip("ctranslate2")
    out = tmp_path / "exported"
    run_mt("export", str(run), "--quantization", "float32", "-o", str(out))
    assert (out / "vmap.txt").read_text().startswith("\t")
    ct2 = run_mt("translate", str(out), "--shortlist", "--beam", "1", stdin=stdin).stdout
    assert ct2 == run_mt("translate", str(run), "--shortlist", "--beam", "1", stdin=stdin).stdout


def test_asking_for_a_shortlist_a_model_lacks_is_one_line(tmp_path):
    from pathlib import Path

    old = Path(__file__).parent / "fixtures" / "run_0.1.0" / "run"  # written before shortlists existed
    result = run_mt("translate", str(old), "--shortlist", stdin="1 2 3\n", check=False)
    assert result.returncode == 2 and "no shortlist" in result.stderr


def test_a_config_asking_for_a_shortlist_the_model_lacks_decodes_with_the_whole_output_layer(trained, tmp_path):
    run = tmp_path / "run"  # as if training had been stopped before it wrote the shortlist
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("checkpoints", "shortlist.npz"))
    stdin = "1 2 3\n4 5 6 7\n"
    plain = run_mt("translate", str(run), stdin=stdin).stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["decode"]["shortlist"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_mt("translate", str(run), stdin=stdin)
    assert result.stdout == plain and "no lexical shortlist" in result.stderr
    assert run_mt("translate", str(run), "--shortlist", stdin=stdin, check=False).returncode == 2  # asked: an error


def test_an_ensemble_decodes_over_its_first_runs_shortlist(trained):
    run = str(trained / "run")
    stdin = "1 2 3\n4 5 6 7\n"
    alone = run_mt("translate", run, stdin=stdin).stdout
    assert run_mt("translate", run, run, "--shortlist", stdin=stdin).stdout == alone


def test_a_target_prefix_outside_the_shortlist_is_still_followed():
    model = tiny_model(vocab=40).eval()
    few = np.array([4, 20, 21, 22, 23], dtype=np.int32)
    engine = TorchEngine(model, torch.device("cpu"), shortlist=Shortlist(np.tile(few, (40, 1)), few[:0], "x"))
    found = decode(engine, [[5, 6, 7]], DecodeOptions(beam=2, max_len_b=6, shortlist=True), prefixes=[[30, 31]])
    assert found[0][0].tokens[:2] == [30, 31] and np.isfinite(found[0][0].score)
    assert set(found[0][0].tokens[2:]) <= set(few.tolist())


def test_sampling_and_no_repeat_ngram_stay_inside_the_shortlist():
    model = tiny_model(vocab=40).eval()
    few = np.array([4, 20, 21, 22, 23], dtype=np.int32)
    engine = TorchEngine(model, torch.device("cpu"), shortlist=Shortlist(np.tile(few, (40, 1)), few[:0], "x"))
    sampled = decode(engine, [[5, 6, 7]] * 3, DecodeOptions(sampling=True, nbest=2, max_len_b=8, shortlist=True))
    assert all(set(h.tokens) <= set(few.tolist()) for hyps in sampled for h in hyps)
    banned = decode(engine, [[5, 6, 7]], DecodeOptions(beam=3, max_len_b=12, no_repeat_ngram=1, shortlist=True))
    for h in banned[0]:
        assert len(h.tokens) == len(set(h.tokens)) and set(h.tokens) <= set(few.tolist())
