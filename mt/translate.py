"""Load a run directory once and translate lines in order: sort by length, batch, search, detokenize."""

from __future__ import annotations

import logging
import os
import re
import select
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from mt.batching import make_batches, pad
from mt.checkpoint import load_checkpoint
from mt.config import Config, load_config
from mt.device import autocast, pick_device
from mt.errors import CheckpointError, DataError
from mt.model import Transformer, build_model, cross_attention_weights
from mt.search import Hypothesis, search
from mt.tokenizer import BOS, EOS, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

BEST = "best.pt"


@dataclass
class Translation:
    text: str
    score: float


def decode_batches(
    sources: list[list[int]],
    search: Callable[[torch.Tensor], list[list[Hypothesis]]],
    max_tokens: int,
    device: torch.device,
) -> list[list[Hypothesis]]:
    """Run `search` over batches of similar-length sources (ids without EOS); results in input order."""
    lengths = [len(s) + 1 for s in sources]
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for batch in make_batches(lengths, lengths, max_tokens):
        src = pad([sources[i] for i in batch], suffix=[EOS]).to(device)
        with autocast(device):
            for index, hyps in zip(batch, search(src)):
                results[index] = hyps
    return results


def load_model(
    run_dir: Path, config: Config, tokenizer: Tokenizer, device: torch.device, checkpoint: str = BEST
) -> Transformer:
    """Rebuild a run directory's model from its config and checkpoint, checking it fits the tokenizer."""
    path = Path(run_dir) / checkpoint  # an absolute `checkpoint` stays as it is
    if not path.is_file() and Path(checkpoint).is_file():
        path = Path(checkpoint)
    state = load_checkpoint(path, device)
    vocab = [tokenizer.src_vocab_size, tokenizer.tgt_vocab_size]
    if state.get("vocab") != vocab or state.get("tokenizer") != tokenizer.fingerprint():
        raise CheckpointError(
            f"{path}: trained with vocabulary sizes {state.get('vocab')} and another SentencePiece model "
            f"than {run_dir}'s (sizes {vocab}); were run directories mixed up?"
        )
    model = build_model(config.model, *vocab, tokenizer.joint).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model in config.yaml ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()


class Translator:
    """A model directory loaded for translation."""

    def __init__(self, run_dir: str | Path, checkpoint: str | None = None, device: str = "auto"):
        """`checkpoint` None: the model directory's default, `decode.checkpoint` of its config."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{run_dir}: not a model directory (no config.yaml); train one with `mt train`")
        self.config = load_config(run_dir / "config.yaml")
        self.tokenizer = load_tokenizer(run_dir, self.config.tokenizer.joint)
        self.device = pick_device(device)
        self.checkpoint = checkpoint or self.config.decode.checkpoint
        self.model = load_model(run_dir, self.config, self.tokenizer, self.device, self.checkpoint)
        self.max_source = self.model.max_positions - 1

    def translate_ids(
        self,
        sources: list[list[int]],
        beam: int | None = None,
        length_penalty: float | None = None,
        nbest: int = 1,
        use_cache: bool = True,
        no_repeat_ngram: int | None = None,
    ) -> list[list[Hypothesis]]:
        """Source piece ids (no EOS) -> the `nbest` best hypotheses of each, in input order.

        Settings left as None come from the `decode` section of the model's config.
        """
        d = self.config.decode
        beam = d.beam if beam is None else beam
        length_penalty = d.length_penalty if length_penalty is None else length_penalty
        no_repeat_ngram = d.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram
        settings = (beam, length_penalty, d.max_len_a, d.max_len_b, nbest, use_cache, no_repeat_ngram)
        # decode.max_tokens bounds decoder rows: source pieces times beam size
        return decode_batches(
            sources, lambda src: search(self.model, src, *settings), max(1, d.max_tokens // beam), self.device
        )

    def attention(self, line: str, beam: int | None = None) -> tuple[torch.Tensor, list[str], list[str], str]:
        """Translate one line and return the decoder's cross-attention over it.

        Returns weights (layers, heads, output pieces, source pieces), the source pieces (with
        </s>), the output pieces (with </s>), and the translation.
        """
        ids = self.tokenizer.encode_src([line.strip()])[0][: self.max_source]
        if not ids:
            raise DataError("nothing to translate: the sentence is empty")
        tokens = self.translate_ids([ids], beam)[0][0].tokens
        src = torch.tensor([ids + [EOS]], device=self.device)
        tgt_in = torch.tensor([[BOS] + tokens], device=self.device)
        weights = cross_attention_weights(self.model, src, tgt_in)[:, 0].cpu()
        src_pieces = [self.tokenizer.src.id_to_piece(i) for i in ids] + ["</s>"]
        tgt_pieces = [self.tokenizer.tgt.id_to_piece(i) for i in tokens] + ["</s>"]
        return weights, src_pieces, tgt_pieces, one_line(self.tokenizer.decode_tgt([tokens])[0])

    def translate(
        self,
        lines: Iterable[str],
        beam: int | None = None,
        length_penalty: float | None = None,
        nbest: int = 1,
        chunk_lines: int = 2000,
        no_repeat_ngram: int | None = None,
    ) -> Iterator[list[Translation]]:
        """For each input line, its `nbest` translations (best first); blank lines give one blank."""
        lines = iter(lines)
        chunks = iter(lambda: list(islice(lines, chunk_lines)), [])
        return self.translate_chunks(chunks, beam, length_penalty, nbest, no_repeat_ngram)

    def translate_chunks(
        self,
        chunks: Iterable[list[str]],
        beam: int | None = None,
        length_penalty: float | None = None,
        nbest: int = 1,
        no_repeat_ngram: int | None = None,
    ) -> Iterator[list[Translation]]:
        """Like `translate`, for input already cut into chunks (each is sorted and batched on its own)."""
        for chunk in chunks:
            yield from self._translate_chunk(chunk, beam, length_penalty, nbest, no_repeat_ngram)

    def _translate_chunk(
        self, chunk: list[str], beam, length_penalty, nbest, no_repeat_ngram
    ) -> list[list[Translation]]:
        wanted = [i for i, line in enumerate(chunk) if line.strip()]
        sources = self.tokenizer.encode_src([chunk[i].strip() for i in wanted])
        for i, ids in enumerate(sources):
            if len(ids) > self.max_source:
                log.warning("input line of %d pieces truncated to %d (model.max_positions)", len(ids), self.max_source)
                sources[i] = ids[: self.max_source]
        results: list[list[Translation]] = [[Translation("", 0.0)] for _ in chunk]
        for i, hyps in zip(
            wanted, self.translate_ids(sources, beam, length_penalty, nbest, no_repeat_ngram=no_repeat_ngram)
        ):
            texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
            results[i] = [Translation(one_line(text), h.score) for text, h in zip(texts, hyps)]
        return results


_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def one_line(text: str) -> str:
    """`text` with any line-breaking character turned into a space: one output line per input line."""
    return _LINE_BREAKS.sub(" ", text)


def read_chunks(
    fd: int, max_lines: int = 2000, block: int = 1 << 16, max_line_bytes: int = 1 << 20
) -> Iterator[list[str]]:
    """Lines from file descriptor `fd`, in chunks of at most `max_lines`.

    A chunk also ends whenever no more input is immediately available, so someone typing gets
    each translation as soon as the line is entered, while piped files are decoded in big,
    well-sorted chunks. Memory stays bounded by the chunk size: a line is cut after
    `max_line_bytes` (far more than a model reads), with a warning. Bytes that are not UTF-8 are
    replaced rather than failing, so every input line still gets its output line.
    """
    pending, lines, eof, cut = b"", [], False, False
    while not eof:
        data = os.read(fd, block)
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
        if lines and (eof or not _readable_now(fd)):
            yield lines
            lines = []


def _readable_now(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # select does not work on this kind of file (e.g. Windows pipes)
        return True
