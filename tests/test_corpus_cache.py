"""The encoded corpus cache: exact ids, padded batches, reuse and rebuild."""

import io
import logging
import random

import numpy as np
import pytest

from mt.batching import collate, make_batches
from mt.config import TokenizerConfig
from mt.corpus_cache import _write_lengths, prepare_corpus
from mt.tokenizer import prepare_tokenizer


def _write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@pytest.fixture
def corpus_files(tmp_path):
    rng = random.Random(0)
    words = "der die das hund katze läuft schläft über unter wiese haus".split()
    src = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    tgt = [" ".join(reversed(s.split())).upper() for s in src]
    src[7], tgt[9] = "", "   "  # pairs with an empty side are dropped, as everywhere else
    _write(tmp_path / "train.de", src)
    _write(tmp_path / "train.en", tgt)
    return tmp_path / "train.de", tmp_path / "train.en", src, tgt


def test_cached_ids_are_the_sentencepiece_ids_and_batches_match_collate(tmp_path, corpus_files):
    src_path, tgt_path, src, tgt = corpus_files
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=60), src_path, tgt_path)
    corpus = prepare_corpus(tmp_path / "cache", "train", src_path, tgt_path, tokenizer, max_length=None)
    kept = [(s, t) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    assert len(corpus) == len(kept) == 298
    expected_src = tokenizer.encode_src([s for s, _ in kept])
    expected_tgt = tokenizer.encode_tgt([t for _, t in kept])
    assert [corpus.src_sentence(i) for i in range(len(corpus))] == expected_src
    assert [corpus.tgt_sentence(i) for i in range(len(corpus))] == expected_tgt
    assert tokenizer.decode_tgt([corpus.tgt_sentence(5)]) == [kept[5][1]]
    assert corpus.src_lengths.tolist() == [len(s) + 1 for s in expected_src]

    indices = np.array([4, 0, 17, 250])
    for got, want in zip(
        corpus.batch(indices), collate([expected_src[i] for i in indices], [expected_tgt[i] for i in indices])
    ):
        assert got.tolist() == want.tolist()
    batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, max_tokens=64, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(corpus)))
    for batch in batches:
        src_batch, _, tgt_out = corpus.batch(batch)
        assert src_batch.numel() <= 64 or len(batch) == 1
        assert tgt_out.numel() <= 64 or len(batch) == 1


def test_cache_is_reused_when_nothing_changed_and_rebuilt_when_the_corpus_changes(tmp_path, corpus_files, caplog):
    src_path, tgt_path, src, tgt = corpus_files
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=60), src_path, tgt_path)
    cache = tmp_path / "cache"
    first = prepare_corpus(cache, "train", src_path, tgt_path, tokenizer, max_length=None)
    written = (cache / "train.src.bin").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = prepare_corpus(cache, "train", src_path, tgt_path, tokenizer, max_length=None)
    assert "reusing" in caplog.text
    assert (cache / "train.src.bin").stat().st_mtime_ns == written
    assert again.tgt_sentence(3) == first.tgt_sentence(3)

    _write(tgt_path, ["WIESE HUND"] * len(tgt))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        changed = prepare_corpus(cache, "train", src_path, tgt_path, tokenizer, max_length=None)
    assert "changed" in caplog.text
    assert changed.tgt_sentence(3) == tokenizer.encode_tgt(["WIESE HUND"])[0]


def test_pairs_over_max_length_are_left_out_and_counted(tmp_path, corpus_files, caplog):
    src_path, tgt_path, _, _ = corpus_files
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=60), src_path, tgt_path)
    corpus = prepare_corpus(tmp_path / "cache", "train", src_path, tgt_path, tokenizer, max_length=None)
    limit = int(np.median(corpus.src_piece_counts))
    expected = int(((corpus.src_piece_counts >= limit) | (corpus.tgt_piece_counts >= limit)).sum())
    with caplog.at_level(logging.WARNING):
        short = prepare_corpus(tmp_path / "cache2", "train", src_path, tgt_path, tokenizer, max_length=limit)
    assert len(short) == len(corpus) - expected and f"left out {expected} pairs" in caplog.text
    assert max(short.src_piece_counts.max(), short.tgt_piece_counts.max()) < limit


def test_pairs_with_a_wild_length_ratio_are_left_out_and_counted(tmp_path, caplog):
    src = ["ein hund", "eine katze", "x", "der hund läuft"]
    tgt = ["a dog", "a cat", " ".join(["word"] * 40), "the dog runs"]
    _write(tmp_path / "train.de", src)
    _write(tmp_path / "train.en", tgt)
    paths = tmp_path / "train.de", tmp_path / "train.en"
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=30), *paths)
    with caplog.at_level(logging.WARNING):
        corpus = prepare_corpus(tmp_path / "cache", "train", *paths, tokenizer, None, max_length_ratio=9)
    assert len(corpus) == 3 and "left out 1 pairs with a length ratio over data.max_length_ratio=9" in caplog.text
    assert prepare_corpus(tmp_path / "all", "train", *paths, tokenizer, None, max_length_ratio=0).src_lengths.size == 4


@pytest.mark.parametrize("damage", ["truncated", "same-size junk", "lengths gone"])
def test_a_damaged_cache_is_encoded_again_not_reused(tmp_path, corpus_files, caplog, damage):
    src_path, tgt_path, _, _ = corpus_files
    tokenizer = prepare_tokenizer(tmp_path / "run", TokenizerConfig(vocab_size=60), src_path, tgt_path)
    cache = tmp_path / "cache"
    good = prepare_corpus(cache, "train", src_path, tgt_path, tokenizer, max_length=None)
    expected = [good.src_sentence(i) for i in range(len(good))]
    ids = cache / "train.src.bin"
    if damage == "truncated":
        ids.write_bytes(ids.read_bytes()[:-10])
    elif damage == "same-size junk":
        ids.write_bytes(bytes(len(ids.read_bytes())))
    else:
        (cache / "train.lengths.npy").unlink()
    with caplog.at_level(logging.INFO):
        again = prepare_corpus(cache, "train", src_path, tgt_path, tokenizer, max_length=None)
    assert "is damaged" in caplog.text and "reusing" not in caplog.text
    assert [again.src_sentence(i) for i in range(len(again))] == expected


def test_streamed_lengths_file_is_byte_for_byte_what_numpy_saves(tmp_path):
    """Lengths are streamed to disk while encoding; the file must stay the `.npy` earlier caches hold."""
    lengths = np.array([[3, 4], [10, 12], [1, 1]], dtype=np.int32)
    raw, streamed, saved = io.BytesIO(lengths.tobytes()), io.BytesIO(), io.BytesIO()
    _write_lengths(streamed, raw, len(lengths))
    np.save(saved, lengths)
    assert streamed.getvalue() == saved.getvalue()
