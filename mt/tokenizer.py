"""SentencePiece tokenization with fixed special ids, stored in the run directory.

Special ids are the same in every model `mt` trains (mt.vocab); the run directory names the
model files (mt.run_dir: one joint model, or one per language).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from mt.config import TokenizerConfig
from mt.data import iter_lines, iter_pairs
from mt.errors import CheckpointError, DataError
from mt.files import atomic_write
from mt.progress import progress_bar
from mt.run_dir import RunDir
from mt.vocab import BOS, EOS, PAD, UNK

log = logging.getLogger(__name__)


# distinct words kept while counting for BPE; past it the rarest are pruned, so memory stays bounded
WORD_TYPES_LIMIT = 2_000_000


def count_words(sentences: Iterable[str], limit: int = WORD_TYPES_LIMIT) -> Counter[str]:
    """Whitespace-separated word frequencies of `sentences`, holding at most `limit` distinct words.

    When the table is full, words seen no more than a rising floor are dropped (lossy counting):
    what survives is every frequent word, with counts low by at most the floor.
    """
    counts: Counter[str] = Counter()
    floor = 0
    for sentence in sentences:
        counts.update(sentence.split())
        if len(counts) > limit:
            floor += 1
            for word in [word for word, count in counts.items() if count <= floor]:
                del counts[word]
    return counts


def train_sentencepiece(sentences: Iterable[str], path: Path, config: TokenizerConfig, threads: int = 2) -> None:
    """Train a SentencePiece model on `sentences` and write it to `path`.

    BPE learns from word frequencies alone (SentencePiece splits at whitespace first), so it is
    given the word counts of the whole corpus: memory is the number of distinct words, whatever
    the corpus size. Unigram seeds its pieces from a suffix array over the raw text (about 20
    bytes per character), so it gets a random sample of `config.max_sentences` sentences.
    """
    model = io.BytesIO()
    failures: list[Exception] = []

    def guarded() -> Iterator[str]:
        # SentencePiece turns an exception inside its iterator (bad data, a Ctrl-C) into an opaque
        # RuntimeError: end the input instead and raise the exception itself once SentencePiece returns
        try:
            yield from progress_bar(sentences, desc=f"reading sentences for {path.name}", unit=" lines", leave=False)
        except (DataError, KeyboardInterrupt) as exc:
            failures.append(exc)

    options = dict(
        model_writer=model,
        model_type=config.type,
        vocab_size=config.vocab_size,
        character_coverage=config.character_coverage,
        # small corpora cannot fill a large vocabulary; take what they have rather than fail
        hard_vocab_limit=False,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        num_threads=threads,
        minloglevel=2,
    )
    if config.type == "bpe":
        counts = count_words(guarded())
        if failures:
            raise failures[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".spm-", dir=path.parent) as scratch:
            words = Path(scratch) / "words.tsv"
            with open(words, "w", encoding="utf-8") as handle:
                handle.writelines(f"{word}\t{count}\n" for word, count in counts.items())
            del counts
            spm.SentencePieceTrainer.train(input=str(words), input_format="tsv", input_sentence_size=0, **options)
    else:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            **options,
        )
    if failures:
        raise failures[0]
    atomic_write(path, lambda handle: handle.write(model.getvalue()))


class Tokenizer:
    """Source and target SentencePiece models (the same one when the vocabulary is joint)."""

    def __init__(self, src_path: Path, tgt_path: Path):
        self.src_path, self.tgt_path = Path(src_path), Path(tgt_path)
        self.src = self._load(self.src_path)
        self.tgt = self.src if self.tgt_path == self.src_path else self._load(self.tgt_path)

    @staticmethod
    def _load(path: Path) -> spm.SentencePieceProcessor:
        if not path.is_file():
            raise CheckpointError(f"{path}: SentencePiece model not found")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from None
        specials = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if specials != (PAD, UNK, BOS, EOS):
            raise CheckpointError(
                f"{path}: special ids {specials} differ from mt's (pad, unk, bos, eos) = (0, 1, 2, 3)"
            )
        return processor

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def fingerprint(self) -> str:
        """Hash of the model file(s), stored in checkpoints to catch a swapped tokenizer."""
        digest = hashlib.sha256(self.src_path.read_bytes())
        if not self.joint:
            digest.update(self.tgt_path.read_bytes())
        return digest.hexdigest()[:16]

    def encode_src(self, lines: list[str], threads: int = 2) -> list[list[int]]:
        return self.src.encode(lines, num_threads=threads)

    def encode_tgt(self, lines: list[str], threads: int = 2) -> list[list[int]]:
        return self.tgt.encode(lines, num_threads=threads)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)

    def src_pieces(self, line: str) -> list[str]:
        return self.src.encode(line, out_type=str)


def load_tokenizer(run_dir: Path | RunDir, joint: bool) -> Tokenizer:
    return Tokenizer(*RunDir(run_dir).tokenizer_files(joint))


def prepare_tokenizer(
    run_dir: Path | RunDir, config: TokenizerConfig, src_path: Path, tgt_path: Path, errors: str = "strict"
) -> Tokenizer:
    """Load the run directory's tokenizer, training it on the training corpus first if it has none.

    The corpus is streamed; a joint model also reads the files of `config.extra_text`.
    """
    src_model, tgt_model = RunDir(run_dir).tokenizer_files(config.joint)
    if config.joint and not src_model.is_file():
        log.info("training joint SentencePiece %s model (%d pieces)", config.type, config.vocab_size)
        for path in config.extra_text:
            if not Path(path).is_file():
                raise DataError(f"tokenizer.extra_text: {path}: file not found")
        both = (line for pair in iter_pairs(src_path, tgt_path, errors) for line in pair)
        extra = (line.strip() for path in config.extra_text for line in iter_lines(path, errors) if line.strip())
        train_sentencepiece(itertools.chain(both, extra), src_model, config)
    elif not config.joint:
        for side, path in enumerate((src_model, tgt_model)):
            if not path.is_file():
                log.info("training SentencePiece %s model %s", config.type, path.name)
                train_sentencepiece((pair[side] for pair in iter_pairs(src_path, tgt_path, errors)), path, config)
    return Tokenizer(src_model, tgt_model)
