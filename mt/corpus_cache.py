"""Training corpora encoded once into token-id files that training reads through numpy memmaps.

`RUN_DIR/cache/{split}.src.bin` and `.tgt.bin` hold the piece ids of every kept pair back to
back (uint16 when the vocabulary fits, int32 otherwise); `{split}.lengths.npy` holds the
(pairs, 2) piece counts; `{split}.json` records checksums of the text files and of the tokenizer
they were encoded with. A split prepared with `texts=True` (validation) also keeps the target
text of its pairs in `{split}.tgt.txt`: the references that validation BLEU scores against.
A multilingual split holds its directions one after the other, each source after its tag, and
`{split}.json` records how many pairs each direction kept (`parts`).
A later run (a resume, a second run in the same directory) reuses the files when those checksums
still match, and encodes again when the corpus or tokenizer changed.
Resident memory stays at a few bytes per pair however large the corpus: the ids stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from mt.data import file_sha256, iter_pairs
from mt.files import FileSet, atomic_write, atomic_write_text
from mt.progress import progress_bar
from mt.tokenizer import Tokenizer
from mt.vocab import BOS, EOS, PAD

log = logging.getLogger(__name__)

FORMAT = 2
CHUNK_PAIRS = 20_000  # pairs per SentencePiece call: big enough for its threads, small in memory

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (src, tgt_in, tgt_out), padded


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class CorpusPart:
    """Line-aligned files of one direction, encoded into a split after the parts before it."""

    src_path: Path
    tgt_path: Path
    name: str = ""  # the direction (de-en) of a multilingual split; "" for a single pair
    src_prefix: tuple[int, ...] = ()  # ids put before each source, e.g. the target-language tag


class EncodedCorpus:
    """One split's pairs as memory-mapped piece ids (without BOS/EOS) and their lengths.

    A multilingual split holds its directions one after the other: `parts` names each with the
    range of pair indices it has.
    """

    def __init__(self, cache_dir: Path, split: str):
        meta = json.loads((cache_dir / f"{split}.json").read_text())
        dtype = np.dtype(meta["dtype"])
        lengths = _load_lengths(cache_dir / f"{split}.lengths.npy")
        self.src_piece_counts, self.tgt_piece_counts = lengths[:, 0], lengths[:, 1]
        self.src_offsets, self.tgt_offsets = _offsets(self.src_piece_counts), _offsets(self.tgt_piece_counts)
        self.src_ids = self._map(cache_dir / f"{split}.src.bin", dtype)
        self.tgt_ids = self._map(cache_dir / f"{split}.tgt.bin", dtype)
        self._texts_path = cache_dir / f"{split}.tgt.txt"
        self.parts: list[tuple[str, range]] = []
        start = 0
        for part in meta.get("parts", [{"name": "", "pairs": len(self.src_piece_counts)}]):
            self.parts.append((part["name"], range(start, start + part["pairs"])))
            start += part["pairs"]

    @staticmethod
    def _map(path: Path, dtype: np.dtype) -> np.ndarray:
        # np.memmap refuses empty files; a corpus always has pieces, but keep the error clear
        return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.src_piece_counts)

    @property
    def src_lengths(self) -> np.ndarray:
        return self.src_piece_counts + 1  # + EOS

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.tgt_piece_counts + 1  # + BOS or EOS

    def src_sentence(self, index: int) -> list[int]:
        return self.src_ids[self.src_offsets[index] : self.src_offsets[index + 1]].tolist()

    def tgt_sentence(self, index: int) -> list[int]:
        return self.tgt_ids[self.tgt_offsets[index] : self.tgt_offsets[index + 1]].tolist()

    def tgt_texts(self) -> list[str]:
        """The target side as text, one line per pair (a split prepared with `texts=True`)."""
        lines = self._texts_path.read_bytes().decode("utf-8").split("\n")  # no newline translation: keep \r
        return lines[: len(self)]

    def batch(self, indices: np.ndarray | list[int]) -> Batch:
        """Padded (src `ids EOS`, tgt_in `BOS ids`, tgt_out `ids EOS`) tensors of the pairs at `indices`."""
        indices = np.asarray(indices)
        src = self._padded(self.src_ids, self.src_offsets, indices, shift=0)
        tgt_out = self._padded(self.tgt_ids, self.tgt_offsets, indices, shift=0)
        tgt_in = self._padded(self.tgt_ids, self.tgt_offsets, indices, shift=1)
        rows = np.arange(len(indices))
        src[rows, self.src_piece_counts[indices]] = EOS
        tgt_out[rows, self.tgt_piece_counts[indices]] = EOS
        tgt_in[:, 0] = BOS
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)

    @staticmethod
    def _padded(ids: np.ndarray, offsets: np.ndarray, indices: np.ndarray, shift: int) -> np.ndarray:
        """(B, longest + 1) int64 of PAD with each row's ids copied in from column `shift`, in one gather."""
        starts, counts = offsets[indices], offsets[indices + 1] - offsets[indices]
        columns = np.arange(int(counts.max()) + 1) - shift  # position in the sentence of each column
        inside = (columns >= 0) & (columns < counts[:, None])
        gathered = ids[np.where(inside, starts[:, None] + columns, 0)] if len(ids) else np.zeros(inside.shape)
        return np.where(inside, gathered, PAD).astype(np.int64)

    def release_pages(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay in the page cache)."""
        for ids in (self.src_ids, self.tgt_ids):
            mapping = getattr(ids, "_mmap", None)
            if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)


def _load_lengths(path: Path) -> np.ndarray:
    """The (pairs, 2) piece counts, memory-mapped (an empty split cannot be mapped: read)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Where each sentence starts in its id file (and the end): uint32 while the ids fit, int64 beyond."""
    total = int(counts.sum(dtype=np.int64))
    offsets = np.zeros(len(counts) + 1, dtype=np.uint32 if total <= np.iinfo(np.uint32).max else np.int64)
    np.cumsum(counts, dtype=offsets.dtype, out=offsets[1:])
    return offsets


def _write_lengths(handle, raw: BinaryIO, pairs: int) -> None:
    """`{split}.lengths.npy` from the raw int32 (pairs, 2) counts streamed to `raw`, without loading them."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": (pairs, 2)}
    np.lib.format.write_array_header_1_0(handle, header)
    raw.seek(0)
    shutil.copyfileobj(raw, handle, 1 << 20)


def _chunks(pairs: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    while chunk := list(islice(pairs, size)):
        yield chunk


def _cache_key(
    parts: list[CorpusPart],
    tokenizer: Tokenizer,
    max_length: int | None,
    max_length_ratio: float,
    errors: str,
    texts: bool,
) -> dict:
    files = [
        {"src": str(p.src_path), "src_sha256": file_sha256(p.src_path)}
        | {"tgt": str(p.tgt_path), "tgt_sha256": file_sha256(p.tgt_path)}
        for p in parts
    ]
    single = len(parts) == 1 and not parts[0].name and not parts[0].src_prefix
    # one pair keeps the key every earlier version wrote, so its caches are reused
    sources = (
        files[0]
        if single
        else {"parts": [f | {"name": p.name, "src_prefix": list(p.src_prefix)} for f, p in zip(files, parts)]}
    )
    key = {
        "format": FORMAT,
        **sources,
        "tokenizer": tokenizer.fingerprint(),
        "max_length": max_length,
        "max_length_ratio": max_length_ratio,
        "errors": errors,
    }
    return {**key, "texts": True} if texts else key  # caches written without texts keep their key


def prepare_corpus(
    cache_dir: Path,
    split: str,
    src_path: Path,
    tgt_path: Path,
    tokenizer: Tokenizer,
    max_length: int | None,
    max_length_ratio: float = 0.0,
    errors: str = "strict",
    texts: bool = False,
) -> EncodedCorpus:
    """`prepare_parts` of one pair of files."""
    part = CorpusPart(Path(src_path), Path(tgt_path))
    return prepare_parts(cache_dir, split, [part], tokenizer, max_length, max_length_ratio, errors, texts)


def prepare_parts(
    cache_dir: Path,
    split: str,
    parts: list[CorpusPart],
    tokenizer: Tokenizer,
    max_length: int | None,
    max_length_ratio: float = 0.0,
    errors: str = "strict",
    texts: bool = False,
) -> EncodedCorpus:
    """Encode a split (its parts in order) into `cache_dir`, or reuse the files there when nothing changed.

    Pairs with more than `max_length` pieces on either side (a part's source prefix included), or
    whose longer side has more than `max_length_ratio` times the pieces of the shorter one (0: no
    such limit), are left out and counted; `errors` says what invalid UTF-8 does (see
    `mt.data.iter_lines`). Every file is written to a temporary name and renamed; `{split}.json` is
    written last, so an interrupted encoding is never mistaken for a finished one.
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / f"{split}.json"
    key = _cache_key(parts, tokenizer, max_length, max_length_ratio, errors, texts)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                problem = _damage(cache_dir, split, meta)
                if problem is None:
                    log.info("%s: reusing the encoded %s corpus (same files and tokenizer)", cache_dir, split)
                    return EncodedCorpus(cache_dir, split)
                log.warning("%s: the encoded %s corpus is damaged (%s); encoding it again", cache_dir, split, problem)
            else:
                log.info("%s: the %s corpus or tokenizer changed; encoding it again", cache_dir, split)
        except (OSError, ValueError):
            log.info("%s: the %s cache record is unreadable; encoding it again", cache_dir, split)
        meta_path.unlink()
    largest = max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    dtype = np.dtype(np.uint16 if largest <= np.iinfo(np.uint16).max else np.int32)
    encoding = _Encoding(tokenizer, dtype, max_length, max_length_ratio, texts)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=cache_dir) as raw_lengths:  # streamed, so memory stays flat in corpus size
        with FileSet() as files:
            src_handle, tgt_handle = (
                files.open(cache_dir / f"{split}.src.bin"),
                files.open(cache_dir / f"{split}.tgt.bin"),
            )
            for part in parts:
                pairs = iter_pairs(part.src_path, part.tgt_path, errors)
                encoding.run(pairs, src_handle, tgt_handle, raw_lengths, split, part.src_prefix)
        lengths_path = cache_dir / f"{split}.lengths.npy"
        atomic_write(lengths_path, lambda handle: _write_lengths(handle, raw_lengths, encoding.pairs))
    if texts:
        atomic_write_text(cache_dir / f"{split}.tgt.txt", "".join(line + "\n" for line in encoding.kept_targets))
    where = parts[0].src_path if len(parts) == 1 else cache_dir / split
    if encoding.too_long:
        log.warning("%s: left out %d pairs of %d pieces or more", where, encoding.too_long, max_length)
    if encoding.bad_ratio:
        log.warning(
            "%s: left out %d pairs with a length ratio over data.max_length_ratio=%g",
            where,
            encoding.bad_ratio,
            max_length_ratio,
        )
    meta = {
        "key": key,
        "dtype": dtype.name,
        "pairs": encoding.pairs,
        "skipped_too_long": encoding.too_long,
        "skipped_length_ratio": encoding.bad_ratio,
        "sample_sha256": _sample_digest(cache_dir, split),
    }
    if len(parts) > 1 or parts[0].name:
        meta["parts"] = [{"name": p.name, "pairs": n} for p, n in zip(parts, encoding.part_pairs)]
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    log.info("%s: encoded %d %s pairs (%d + %d pieces)", cache_dir, encoding.pairs, split, *encoding.pieces)
    return EncodedCorpus(cache_dir, split)


SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # blocks hashed to check a cache: cheap however large the corpus


def _sample_digest(cache_dir: Path, split: str) -> str:
    """sha256 of the id files' sizes and of SAMPLES evenly spaced blocks of each (first and last included)."""
    digest = hashlib.sha256()
    for path in (cache_dir / f"{split}.src.bin", cache_dir / f"{split}.tgt.bin", cache_dir / f"{split}.lengths.npy"):
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            for offset in sorted({size * i // SAMPLES for i in range(SAMPLES)} | {max(0, size - SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _damage(cache_dir: Path, split: str, meta: dict) -> str | None:
    """Why the cached split cannot be reused as it is (sizes against its lengths, sampled checksum), or None."""
    try:
        lengths = _load_lengths(cache_dir / f"{split}.lengths.npy")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for side, column in (("src", 0), ("tgt", 1)):
            path = cache_dir / f"{split}.{side}.bin"
            if path.stat().st_size != int(lengths[:, column].sum(dtype=np.int64)) * itemsize:
                return f"{path.name} has {path.stat().st_size} bytes, its lengths say otherwise"
        if len(lengths) != meta.get("pairs", len(lengths)):
            return f"{split}.lengths.npy holds {len(lengths)} pairs, not {meta['pairs']}"
        if "sample_sha256" in meta and _sample_digest(cache_dir, split) != meta["sample_sha256"]:  # mt 0.1.0 kept none
            return "checksum mismatch"
        if meta["key"].get("texts") and not (cache_dir / f"{split}.tgt.txt").is_file():
            return f"{split}.tgt.txt is missing"
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return str(exc) or type(exc).__name__
    return None


class _Encoding:
    """Pairs -> piece ids written to two files, the length filters applied and counted."""

    def __init__(
        self, tokenizer: Tokenizer, dtype: np.dtype, max_length: int | None, max_length_ratio: float, texts: bool
    ):
        self.tokenizer, self.dtype, self.texts = tokenizer, dtype, texts
        self.max_length, self.max_length_ratio = max_length, max_length_ratio
        self.pairs, self.pieces = 0, [0, 0]  # kept pairs, and their source and target pieces
        self.part_pairs: list[int] = []  # kept pairs of each part
        self.kept_targets: list[str] = []
        self.too_long = self.bad_ratio = 0

    def keep(self, counts: np.ndarray) -> np.ndarray:
        """(pairs, 2) piece counts -> which pairs pass the length filters."""
        keep = np.ones(len(counts), dtype=bool) if self.max_length is None else (counts < self.max_length).all(axis=1)
        self.too_long += int((~keep).sum())
        if self.max_length_ratio:
            # + 1 for EOS, so a one-piece sentence is not judged by its length alone
            ratio_ok = counts.max(axis=1) + 1 <= self.max_length_ratio * (counts.min(axis=1) + 1)
            self.bad_ratio += int((keep & ~ratio_ok).sum())
            keep &= ratio_ok
        return keep

    def run(
        self, pairs: Iterator[tuple[str, str]], src_handle, tgt_handle, lengths_handle, split: str, prefix=()
    ) -> None:
        """Encode one part's pairs (each source after `prefix`), appending to the handles."""
        threads = _cpu_count()
        before = self.pairs
        prefix = list(prefix)
        bar = progress_bar(desc=f"encoding {split}", unit=" pairs", unit_scale=True, leave=False)
        for chunk in _chunks(pairs, CHUNK_PAIRS):
            src_ids = self.tokenizer.encode_src([s for s, _ in chunk], threads)
            if prefix:
                src_ids = [prefix + ids for ids in src_ids]
            tgt_ids = self.tokenizer.encode_tgt([t for _, t in chunk], threads)
            counts = np.array([(len(s), len(t)) for s, t in zip(src_ids, tgt_ids)], dtype=np.int32)
            keep = self.keep(counts)
            kept = keep.tolist()
            for handle, ids in ((src_handle, src_ids), (tgt_handle, tgt_ids)):
                flat = chain.from_iterable(seq for seq, k in zip(ids, kept) if k)
                handle.write(np.fromiter(flat, dtype=self.dtype).tobytes())
            kept_counts = counts[keep]
            lengths_handle.write(kept_counts.tobytes())
            self.pairs += len(kept_counts)
            self.pieces = [total + int(n) for total, n in zip(self.pieces, kept_counts.sum(axis=0, dtype=np.int64))]
            if self.texts:
                self.kept_targets.extend(t for (_, t), k in zip(chunk, kept) if k)
            bar.update(len(chunk))
        bar.close()
        self.part_pairs.append(self.pairs - before)
