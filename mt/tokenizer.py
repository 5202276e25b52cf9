"""SentencePiece tokenization with fixed special ids, stored in the run directory.

Special ids are the same in every model `mt` trains (mt.vocab); the run directory names the
model files (mt.run_dir: one joint model, or one per language).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from mt.config import TokenizerConfig
from mt.data import iter_lines, iter_pairs
from mt.errors import CheckpointError, DataError
from mt.files import atomic_write
from mt.progress import progress_bar
from mt.run_dir import RunDir
from mt.vocab import BOS, EOS, PAD, TAG_PATTERN, UNK, language_tag

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


def train_sentencepiece(
    sentences: Iterable[str], path: Path, config: TokenizerConfig, threads: int = 2, reserved: Sequence[str] = ()
) -> None:
    """Train a SentencePiece model on `sentences` and write it to `path`; `reserved` pieces (language
    tags) get the ids after the special ones and are never split.

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
        **({"user_defined_symbols": list(reserved)} if reserved else {}),
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

    @cached_property
    def language_tags(self) -> dict[str, int]:
        """The target languages of a multilingual model and the ids of their tags (reserved pieces
        such as <2fr>, right after the special ids); empty for a model of one pair."""
        tags = {}
        for index in range(BOS + 2, self.src_vocab_size):
            match = TAG_PATTERN.match(self.src.id_to_piece(index))
            if not match:
                break  # reserved pieces come first; the first ordinary one ends them
            tags[match.group(1)] = index
        return tags


def balanced_sentences(
    files_by_language: dict[str, list[Path]], total: int, seed: int = 1, errors: str = "strict"
) -> Iterator[str]:
    """The same number of sentences from every language (its files' non-blank lines): `total` shared
    equally, or as many as the largest language has; smaller languages are repeated, larger ones
    sampled, so no language dominates a joint tokenizer."""
    counts = {
        lang: sum(1 for path in paths for line in iter_lines(path, errors) if line.strip())
        for lang, paths in files_by_language.items()
    }
    quota = min(total // max(1, len(counts)), max(counts.values(), default=0))
    rng = random.Random(seed)
    for lang, paths in files_by_language.items():
        rounds, rest = divmod(quota, counts[lang]) if counts[lang] else (0, 0)
        log.info("tokenizer: %d sentences of %s (%d in its corpus)", quota if counts[lang] else 0, lang, counts[lang])
        chosen = set(rng.sample(range(counts[lang]), rest))
        for round_ in range(rounds + (1 if rest else 0)):
            lines = (line.strip() for path in paths for line in iter_lines(path, errors) if line.strip())
            yield from lines if round_ < rounds else (line for i, line in enumerate(lines) if i in chosen)


def prepare_multilingual_tokenizer(
    run_dir: Path | RunDir,
    config: TokenizerConfig,
    files_by_language: dict[str, list[Path]],
    targets: list[str],
    errors: str = "strict",
) -> Tokenizer:
    """The joint tokenizer of a multilingual run: trained (if the run has none) on every language in
    equal shares, with a reserved tag piece per target language; an existing one must have those tags."""
    path, _ = RunDir(run_dir).tokenizer_files(True)
    if not path.is_file():
        log.info(
            "training joint SentencePiece %s model (%d pieces) for %s",
            config.type,
            config.vocab_size,
            ", ".join(files_by_language),
        )
        extra = {lang: list(paths) for lang, paths in files_by_language.items()}
        if config.extra_text:
            extra["extra_text"] = [Path(p) for p in config.extra_text]
        for paths in extra.values():
            for file in paths:
                if not file.is_file():
                    raise DataError(f"{file}: file not found")
        sentences = balanced_sentences(extra, config.max_sentences, errors=errors)
        train_sentencepiece(sentences, path, config, reserved=[language_tag(lang) for lang in targets])
    tokenizer = Tokenizer(path, path)
    missing = [lang for lang in targets if lang not in tokenizer.language_tags]
    if missing:
        raise DataError(
            f"{path}: has no language tag for {', '.join(missing)} (its tags: "
            f"{', '.join(tokenizer.language_tags) or 'none'}); a new target language needs a new run directory"
        )
    return tokenizer


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
