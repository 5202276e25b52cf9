import io
import pickle

import pytest
import sentencepiece as spm
import torch

from mt.config import TokenizerConfig
from mt.errors import CheckpointError
from mt.run_dir import Weights, load_state, load_weights, save_checkpoint
from mt.tokenizer import count_words, prepare_tokenizer, train_sentencepiece
from mt.vocab import BOS, EOS, PAD, UNK

SRC = [f"der kleine hund {i} läuft über die wiese" for i in range(200)]
TGT = [f"the small dog {i} runs across the meadow" for i in range(200)]


@pytest.fixture
def corpus(tmp_path):
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("\n".join(SRC) + "\n")
    tgt.write_text("\n".join(TGT) + "\n")
    return src, tgt


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_joint_tokenizer_round_trip_and_special_ids(tmp_path, corpus, kind):
    tokenizer = prepare_tokenizer(tmp_path, TokenizerConfig(type=kind, vocab_size=60), *corpus)
    assert tokenizer.joint and (tmp_path / "spm.model").is_file()
    processor = tokenizer.src
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (PAD, UNK, BOS, EOS)
    ids = tokenizer.encode_tgt(["the small dog 7 runs"])
    assert tokenizer.decode_tgt(ids) == ["the small dog 7 runs"]
    assert all(i > EOS for i in ids[0])


def test_separate_vocabularies(tmp_path, corpus):
    tokenizer = prepare_tokenizer(tmp_path, TokenizerConfig(vocab_size=40, joint=False), *corpus)
    assert not tokenizer.joint
    assert (tmp_path / "spm.src.model").is_file() and (tmp_path / "spm.tgt.model").is_file()
    # German-only characters are in the source vocabulary and unknown to the target one
    assert tokenizer.src.piece_to_id("ü") != UNK and tokenizer.tgt.piece_to_id("ü") == UNK
    before = tokenizer.fingerprint()
    again = prepare_tokenizer(tmp_path, TokenizerConfig(vocab_size=40, joint=False), *corpus)
    assert again.fingerprint() == before  # an existing tokenizer is reused, not retrained


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, Weights({"w": torch.ones(2)}, "abc", [5, 5], step=3, scores={"valid_bleu": 1.5}))
    weights = load_weights(path)
    assert weights.step == 3 and torch.equal(weights.model["w"], torch.ones(2))
    assert weights.scores == {"valid_bleu": 1.5} and weights.vocab == [5, 5] and weights.tokenizer == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state(path)
    assert "this must never run" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps({"model": _Payload()}))
    with pytest.raises(CheckpointError):
        load_state(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, Weights({"w": torch.randn(1000)}))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "missing.pt")


def test_bpe_from_word_counts_equals_sentencepiece_on_the_sentences(tmp_path, corpus):
    """BPE trains on the corpus's word counts; the model must be the one SentencePiece makes from the text."""
    lines = SRC + TGT + ["Ein „Café“ am Fluß: 3,50 € — très cher!", "  zwei   Leerzeichen\tund Tab  "]
    train_sentencepiece(iter(lines), tmp_path / "words.model", TokenizerConfig(type="bpe", vocab_size=70))
    reference = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=reference,
        model_type="bpe",
        vocab_size=70,
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        minloglevel=2,
    )
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "words.model"))
    theirs = spm.SentencePieceProcessor(model_proto=reference.getvalue())
    assert [ours.id_to_piece(i) for i in range(ours.get_piece_size())] == [
        theirs.id_to_piece(i) for i in range(theirs.get_piece_size())
    ]
    assert ours.encode(lines) == theirs.encode(lines)
    assert not list(tmp_path.glob(".spm-*"))  # the word list is removed


def test_word_counts_stay_within_their_limit_and_keep_frequent_words():
    sentences = [f"the cat w{i} sat" for i in range(1000)]  # 1000 singletons among 3 frequent words
    counts = count_words(sentences, limit=50)
    assert len(counts) <= 51
    assert counts["the"] >= 1000 - 50 and counts["cat"] >= 950 and counts["sat"] >= 950
    assert count_words(["a b a", "b a"]) == {"a": 3, "b": 2}


def test_a_ctrl_c_while_sentencepiece_reads_its_input_is_raised_as_such(tmp_path):
    """SentencePiece would turn it into an opaque RuntimeError (or go on training on what it had)."""

    def interrupted():
        yield from SRC[:50]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sentencepiece(interrupted(), tmp_path / "spm.model", TokenizerConfig(vocab_size=40))
    assert not (tmp_path / "spm.model").exists()
