"""Text in, text out: lines -> SentencePiece ids -> `mt.decoding.decode` -> detokenized lines, in input order."""

from __future__ import annotations

import logging
import os
import re
import select
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import BinaryIO, TextIO

import torch
from torch import Tensor

from mt.alignment import word_alignment
from mt.config import directions, load_config, target_languages
from mt.data import iter_lines, read_lines
from mt.decoding import DecodeOptions, Engine, PairScore, TorchEngine, decode, open_engine, open_ensemble, score
from mt.errors import DataError, MTError
from mt.progress import progress_bar
from mt.run_dir import model_dir
from mt.search import Hypothesis
from mt.tokenizer import load_tokenizer
from mt.vocab import language_tag

log = logging.getLogger(__name__)


@dataclass
class Translation:
    text: str
    score: float
    alignment: list[tuple[int, int]] | None = None  # (source word, target word) pairs, with `align_layer`


class Translator:
    """A model directory (or an `mt export` of one) loaded for translation: text in, text out."""

    def __init__(
        self,
        model_path: str | Path | list[str | Path],
        checkpoint: str | None = None,
        device: str = "auto",
        engine: str = "auto",
        weights: list[float] | None = None,
        precision: str | None = None,
    ):
        """`checkpoint` None: the model directory's default, `decode.checkpoint` of its config;
        `precision` None: its `decode.precision`.

        Several model directories decode as an ensemble (optionally `weights`, one per model); the
        first one's config gives the decoding defaults.
        """
        paths = list(model_path) if isinstance(model_path, (list, tuple)) else [model_path]
        runs = [model_dir(path) for path in paths]
        self.config = load_config(runs[0].config)
        self.tokenizer = load_tokenizer(runs[0], self.config.tokenizer.joint)
        self.checkpoint = checkpoint or self.config.decode.checkpoint
        if weights is not None and (len(weights) != len(runs) or min(weights) <= 0):
            raise MTError(f"--weight: give one positive weight per model ({len(runs)} models, {len(weights)} weights)")
        if len(runs) > 1:
            self.engine: Engine = open_ensemble(runs, self.tokenizer, checkpoint, device, engine, weights)
        else:
            self.engine = open_engine(runs[0], self.config, self.tokenizer, self.checkpoint, device, engine)
        self.name = str(runs[0].path)
        self._warned_no_shortlist = False
        if precision is not None:  # checked now, not at the first request of a server
            self.config.decode.precision = precision
            self.engine.check(self.options())

    @property
    def target_languages(self) -> list[str]:
        """The languages the model translates into: a multilingual model's targets, or the one target."""
        return target_languages(self.config.data) or [self.config.data.tgt]

    @property
    def directions(self) -> list[str]:
        """The directions the model was trained on (de-en, ...)."""
        return [d.name for d in directions(self.config.data)]

    def source_prefix(self, tgt_lang: str | None) -> list[int]:
        """The ids every source starts with to get output in `tgt_lang`: its tag in a multilingual
        model, nothing in a model of one pair (which can only be asked for its own target)."""
        targets = self.target_languages
        if tgt_lang is None:
            if len(targets) > 1:
                raise MTError(f"{self.name} translates into {', '.join(targets)}: choose one with --tgt-lang")
            tgt_lang = targets[0]
        if tgt_lang not in targets:
            raise MTError(f"--tgt-lang {tgt_lang}: {self.name} translates into {', '.join(targets)} only")
        if not self.config.data.directions:
            return []
        tag = self.tokenizer.language_tags.get(tgt_lang)
        if tag is None:
            raise MTError(f"{self.name}: its SentencePiece model has no tag {language_tag(tgt_lang)}")
        return [tag]

    def check_direction(self, src_lang: str | None, tgt_lang: str | None) -> None:
        """Warn when `src_lang` -> `tgt_lang` is not a direction the model was trained on (zero-shot)."""
        if src_lang is None:
            return
        wanted = f"{src_lang}-{tgt_lang or self.target_languages[0]}"
        if wanted not in self.directions:
            trained = ", ".join(self.directions)
            log.warning("%s was not trained on %s (only %s): zero-shot translation", self.name, wanted, trained)

    def encode_sources(self, lines: list[str], tgt_lang: str | None) -> list[list[int]]:
        """Source lines -> piece ids, each after the `source_prefix` of `tgt_lang`."""
        prefix = self.source_prefix(tgt_lang)
        return [prefix + ids for ids in self.tokenizer.encode_src(lines)]

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def options(self, **changes) -> DecodeOptions:
        """The model's decoding defaults (its config's decode section) with `changes` that are not None.

        A config's `decode.shortlist: true` gives way to the whole output layer where the model has
        no shortlist (a run stopped before training ended, or an ensemble's first run has none);
        `shortlist=True` does not.
        """
        options = DecodeOptions.from_config(self.config.decode, **changes)
        if options.shortlist and changes.get("shortlist") is None and not self.engine.has_shortlist:
            if not self._warned_no_shortlist:
                log.warning("%s: no lexical shortlist here; decoding with the whole output layer", self.name)
                self._warned_no_shortlist = True
            options = replace(options, shortlist=False)
        return options

    def translate_ids(
        self,
        sources: list[list[int]],
        options: DecodeOptions | None = None,
        prefixes: list[list[int]] | None = None,
    ) -> list[list[Hypothesis]]:
        """Source piece ids (no EOS) -> the `options.nbest` best hypotheses of each, in input order;
        with `prefixes` (target piece ids), each hypothesis starts with its source's prefix."""
        return decode(self.engine, sources, options or self.options(), prefixes)

    def score(
        self, sources: list[str], targets: list[str], options: DecodeOptions | None = None, chunk_lines: int = 2000
    ) -> Iterator[PairScore]:
        """How likely the model finds each given translation (forced scoring), in input order."""
        options = options or self.options()
        for start in range(0, len(sources), chunk_lines):
            src = self.encode_sources([line.strip() for line in sources[start : start + chunk_lines]], options.tgt_lang)
            tgt = self.tokenizer.encode_tgt([line.strip() for line in targets[start : start + chunk_lines]])
            yield from score(self.engine, src, tgt, options)

    def attention(self, line: str, options: DecodeOptions | None = None) -> tuple[Tensor, list[str], list[str], str]:
        """Translate one line and return the decoder's cross-attention over it.

        Returns weights (layers, heads, output pieces, source pieces), the source pieces (with
        </s>), the output pieces (with </s>), and the translation.
        """
        if not isinstance(self.engine, TorchEngine):
            raise MTError("attention weights need a run directory of mt's own model, not a CTranslate2 export")
        options = options or self.options()
        ids = self.encode_sources([line.strip()], options.tgt_lang)[0][: self.engine.max_source]
        if not ids:
            raise DataError("nothing to translate: the sentence is empty")
        tokens = self.translate_ids([ids], options)[0][0].tokens
        weights = self.engine.cross_attention(ids, tokens)
        src_pieces = [self.tokenizer.src.id_to_piece(i) for i in ids] + ["</s>"]
        tgt_pieces = [self.tokenizer.tgt.id_to_piece(i) for i in tokens] + ["</s>"]
        return weights, src_pieces, tgt_pieces, one_line(self.tokenizer.decode_tgt([tokens])[0])

    def translate(
        self, lines: Iterable[str], options: DecodeOptions | None = None, chunk_lines: int = 2000
    ) -> Iterator[list[Translation]]:
        """For each input line, its `options.nbest` translations (best first); blank lines give one blank."""
        lines = iter(lines)
        return self.translate_chunks(iter(lambda: list(islice(lines, chunk_lines)), []), options)

    def translate_chunks(
        self,
        chunks: Iterable[list[str] | list[tuple[str, str]]],
        options: DecodeOptions | None = None,
        align_layer: int | None = None,
    ) -> Iterator[list[Translation]]:
        """Like `translate`, for input already cut into chunks (each is sorted and batched on its own).

        A line may be a (source, prefix) pair: its translation starts with the prefix ("" for none)
        and the search continues after it. With `align_layer`, each translation carries its word
        alignment, from that decoder layer's cross-attention (mt.alignment).
        """
        options = options or self.options()
        if align_layer is not None:
            self._check_layer(align_layer)
        for chunk in chunks:
            yield from self._translate_chunk(chunk, options, align_layer)

    def default_align_layer(self) -> int:
        """The second to last decoder layer: the last one attends less to the word being translated
        (Garg et al. 2019 found alignments best in the penultimate layer)."""
        return -2 if self.config.model.decoder_layers >= 2 else -1

    def _check_layer(self, layer: int) -> None:
        if not isinstance(self.engine, TorchEngine):
            raise MTError("alignments need a run directory of mt's own model, not a CTranslate2 export")
        layers = self.config.model.decoder_layers
        if not -layers <= layer < layers:
            raise MTError(f"--alignment-layer {layer}: the model has decoder layers 0..{layers - 1} (or -1..-{layers})")

    def _translate_chunk(
        self, chunk: list[str] | list[tuple[str, str]], options: DecodeOptions, align_layer: int | None
    ) -> list[list[Translation]]:
        pairs = [line if isinstance(line, tuple) else (line, "") for line in chunk]
        wanted = [i for i, (source, _) in enumerate(pairs) if source.strip()]
        sources = self.encode_sources([pairs[i][0].strip() for i in wanted], options.tgt_lang)
        prefixes = [pairs[i][1].strip() for i in wanted]
        forced = self.tokenizer.encode_tgt(prefixes) if any(prefixes) else None
        blank = [Translation("", 0.0)] * options.nbest  # n-best output has nbest lines for every input line
        results: list[list[Translation]] = [list(blank) for _ in chunk]
        found = self.translate_ids(sources, options, forced)
        for i, hyps in zip(wanted, found):
            texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
            results[i] = [Translation(one_line(text), h.score) for text, h in zip(texts, hyps)]
        if align_layer is not None:
            skip = len(self.source_prefix(options.tgt_lang))  # the tag aligns with no word
            self._add_alignments([results[i] for i in wanted], sources, found, align_layer, options, skip)
        return results

    def _add_alignments(
        self,
        translations: list[list[Translation]],
        sources: list[list[int]],
        found: list[list[Hypothesis]],
        layer: int,
        options: DecodeOptions,
        skip: int = 0,
    ) -> None:
        """Word alignments from `layer`'s cross-attention; the first `skip` source pieces (a tag) left out."""
        limit = self.engine.max_source  # what decoding read of an over-long source
        pairs = [(src[:limit], h.tokens) for src, hyps in zip(sources, found) for h in hyps]
        weights = self.engine.cross_attention_of_layer([s for s, _ in pairs], [t for _, t in pairs], layer, options)
        flat = [t for group in translations for t in group]
        piece = self.tokenizer.src.id_to_piece, self.tokenizer.tgt.id_to_piece
        for translation, (src, tokens), attention in zip(flat, pairs, weights):
            src_pieces, tgt_pieces = [piece[0](i) for i in src[skip:]], [piece[1](i) for i in tokens]
            translation.alignment = word_alignment(attention[:-1, skip:-1], src_pieces, tgt_pieces)


def check_languages(
    first: Translator, second: Translator, src_lang: str | None, tgt_lang: str | None, pivot: str | None
) -> None:
    """Before any input is read: the output languages must be ones the models translate into (an
    error otherwise), and untrained directions get a zero-shot warning. With `pivot`, `first`
    translates into it and `second` on from it."""
    if pivot is None:
        first.check_direction(src_lang, tgt_lang)
        first.source_prefix(tgt_lang)
        return
    first.check_direction(src_lang, pivot)
    second.check_direction(pivot, tgt_lang)
    first.source_prefix(pivot)
    second.source_prefix(tgt_lang)


def pivot_chunks(
    first: Translator,
    second: Translator,
    chunks: Iterable[list[str]],
    first_options: DecodeOptions,
    second_options: DecodeOptions,
) -> Iterator[list[Translation]]:
    """Translate through a pivot language: each chunk by `first` (its best translation, into the pivot
    language of `first_options.tgt_lang`), that by `second` (the same model or another one).

    Scores and n-best lists are those of the second pass; a blank line stays blank.
    """
    for chunk in chunks:
        middle = [found[0].text for found in first.translate_chunks([chunk], replace(first_options, nbest=1))]
        yield from second.translate_chunks([middle], second_options)


def split_tabs(chunks: Iterable[list[str]]) -> Iterator[list[tuple[str, str]]]:
    """Chunks of `source<TAB>prefix` lines -> chunks of (source, prefix) pairs ("" where no tab)."""
    for chunk in chunks:
        yield [tuple(line.partition("\t")[::2]) for line in chunk]


def with_prefix_file(chunks: Iterable[list[str]], path: Path) -> Iterator[list[tuple[str, str]]]:
    """Chunks of input lines -> chunks of (line, prefix) pairs, the prefixes the lines of `path`."""
    prefixes = iter_lines(path)
    for chunk in chunks:
        taken = list(islice(prefixes, len(chunk)))
        if len(taken) < len(chunk):
            raise DataError(f"{path}: has fewer lines than the input (one target prefix per input line)")
        yield list(zip(chunk, taken))


def translate_file(
    translator: Translator, path: Path, options: DecodeOptions | None = None, pivot: str | None = None
) -> list[str]:
    """The best translation of each line of a text file (plain or .gz), with a progress bar; with
    `pivot`, through that language (two passes of the same model)."""
    lines = read_lines(path)
    bar = progress_bar(total=len(lines), desc="translating", unit=" lines")
    translations = []
    options = options or translator.options()
    if pivot is None:
        results = translator.translate(lines, options)
    else:
        chunks = (lines[start : start + 2000] for start in range(0, len(lines), 2000))
        results = pivot_chunks(translator, translator, chunks, replace(options, tgt_lang=pivot), options)
    for found in results:
        translations.append(found[0].text)
        bar.update()
    bar.close()
    return translations


_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def one_line(text: str) -> str:
    """`text` with any line-breaking character turned into a space: one output line per input line."""
    return _LINE_BREAKS.sub(" ", text)


def read_chunks(
    source: int | TextIO | BinaryIO, max_lines: int = 2000, block: int = 1 << 16, max_line_bytes: int = 1 << 20
) -> Iterator[list[str]]:
    """Lines from a file descriptor or stream (stdin), in chunks of at most `max_lines`.

    A chunk also ends whenever no more input is immediately available, so someone typing gets
    each translation as soon as the line is entered, while piped files are decoded in big,
    well-sorted chunks. Memory stays bounded by the chunk size: a line is cut after
    `max_line_bytes` (far more than a model reads), with a warning. Bytes that are not UTF-8 are
    replaced rather than failing, so every input line still gets its output line.
    """
    source = _descriptor_or_binary(source)
    pending, lines, eof, cut = b"", [], False, False
    while not eof:
        data = os.read(source, block) if isinstance(source, int) else source.read(block)
        eof = not data
        if cut:  # drop the rest of an over-long line, up to its newline
            newline = data.find(b"\n")
            data, cut = (b"", True) if newline < 0 else (data[newline:], False)
        pending += data
        *complete, pending = pending.split(b"\n")
        if len(pending) > max_line_bytes:
            log.warning("an input line longer than %d bytes was cut there", max_line_bytes)
            pending, cut = pending[:max_line_bytes], True
        lines.extend(line.rstrip(b"\r").decode("utf-8", errors="replace") for line in complete)
        if eof and pending:
            lines.append(pending.rstrip(b"\r").decode("utf-8", errors="replace"))
        while len(lines) >= max_lines:
            yield lines[:max_lines]
            lines = lines[max_lines:]
        if lines and (eof or not _readable_now(source)):
            yield lines
            lines = []


def _descriptor_or_binary(source: int | TextIO | BinaryIO) -> int | BinaryIO:
    """The file descriptor to read; a stream without one (an in-process caller's stdin) is read as it is."""
    if isinstance(source, int):
        return source
    try:
        return source.fileno()
    except (AttributeError, OSError, ValueError):
        return getattr(source, "buffer", source)


def _readable_now(source: int | BinaryIO) -> bool:
    if not isinstance(source, int):  # a stream without a file descriptor: read on
        return True
    try:
        return bool(select.select([source], [], [], 0)[0])
    except (OSError, ValueError):  # select does not work on this kind of file (e.g. Windows pipes)
        return True
