"""Corpora: fetch with Hugging Face `datasets` or import local files, validate, and write
plain line-aligned files `DIR/{split}.{lang}` plus `DIR/manifest.json`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from mt.errors import DataError
from mt.files import FileSet
from mt.progress import bars_enabled

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # a corpus directory's record of its splits, languages, origins and checksums

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw"
MULTI30K_SOURCE_ENV = "MT_MULTI30K_SOURCE"
MULTI30K_LANGS = ("de", "en", "fr", "cs")
# our split name -> the file stem in the Multi30k task-1 release
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
HF_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


@dataclass
class SplitReport:
    pairs: int
    dropped_empty: int


def parse_pair(pair: str) -> tuple[str, str]:
    parts = pair.split("-")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise DataError(f"--pair {pair!r}: expected two different language codes such as de-en")
    return parts[0], parts[1]


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: str | Path, errors: str = "strict") -> Iterator[str]:
    """The lines of a UTF-8 text file (optionally .gz), newline stripped, read as a stream.

    Invalid UTF-8 raises DataError naming the line unless `errors="replace"`.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a text file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open_text(path) as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid UTF-8 at byte {exc.start}") from None
                yield (text.removeprefix("\ufeff") if number == 1 else text).rstrip("\r\n")  # no byte-order mark
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a .gz file corrupt mid-stream
        raise DataError(f"{path}: cannot read: {exc or type(exc).__name__}") from None


def read_lines(path: str | Path, errors: str = "strict") -> list[str]:
    """All lines of a UTF-8 text file (optionally .gz); see `iter_lines`."""
    return list(iter_lines(path, errors))


def iter_tsv(path: str | Path, errors: str = "strict") -> Iterator[tuple[str, str]]:
    """Two tab-separated columns per line, source and target, streamed."""
    for number, line in enumerate(iter_lines(path, errors), 1):
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(f"{path}:{number}: expected 2 tab-separated columns, found {len(columns)}")
        yield columns[0], columns[1]


def _clean(line: str) -> str:
    # an embedded newline would break line alignment of the files we write
    return " ".join(line.split()) if any(c in line for c in "\r\n\t\x0b\x0c\x85\u2028\u2029") else line.strip()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RawPairs = Iterable[tuple[str, str]]  # line-aligned (source, target) lines, before cleaning


def write_corpus(
    out_dir: str | Path,
    splits: dict[str, RawPairs],
    langs: tuple[str, ...],
    source: str,
    force: bool = False,
) -> dict[str, SplitReport]:
    """Write `{split}.{lang}` files and merge their record into `manifest.json`, all or nothing.

    Each split yields line-aligned tuples of texts, one per language of `langs` (two for a pair,
    more for a multi-way corpus such as Multi30k in four languages). They are streamed (memory
    stays bounded whatever the corpus size); tuples with an empty side are dropped and counted.
    Existing split files are never overwritten unless `force` is set.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    manifest = {"src": langs[0], "tgt": langs[1], "splits": {}} if len(langs) == 2 else {"langs": list(langs)}
    manifest.setdefault("splits", {})
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest_path}: unreadable manifest: {exc}") from None
        held = manifest_languages(manifest)
        if held != list(langs):
            raise DataError(f"{out}: holds {'-'.join(held)}, not {'-'.join(langs)}; choose another --out")
    if not force:
        for split in splits:
            for lang in langs:
                if (out / f"{split}.{lang}").exists():
                    raise DataError(f"{out / f'{split}.{lang}'} already exists (use --force to replace it)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        reports = _write_splits(out, splits, langs, source, manifest)
    except BaseException:
        if created and not any(out.iterdir()):  # a failed import leaves no empty directory behind
            out.rmdir()
        raise
    for split, report in reports.items():
        if report.dropped_empty:
            log.warning("%s: dropped %d pairs with an empty side", split, report.dropped_empty)
    return reports


def manifest_languages(manifest: dict) -> list[str]:
    """The languages of a corpus directory's manifest, in file order (a pair: source, target)."""
    return list(manifest["langs"]) if "langs" in manifest else [manifest.get("src"), manifest.get("tgt")]


def _write_splits(out: Path, splits: dict[str, RawPairs], langs: tuple[str, ...], source, manifest) -> dict:
    reports = {}
    with FileSet() as files:  # every split file and the manifest, or none of them
        for split, rows in splits.items():
            sides = [(files.open(out / f"{split}.{lang}"), hashlib.sha256()) for lang in langs]
            kept = dropped = 0
            for raw in rows:
                cleaned = [_clean(text) for text in raw]
                if not all(cleaned):
                    dropped += 1
                    continue
                kept += 1
                for (handle, digest), text in zip(sides, cleaned):
                    line = (text + "\n").encode("utf-8")
                    handle.write(line)
                    digest.update(line)
            if not kept:
                raise DataError(f"{source}: split {split!r} has no sentence pairs")
            digests = {lang: digest.hexdigest() for lang, (_, digest) in zip(langs, sides)}
            manifest["splits"][split] = {"pairs": kept, "dropped_empty": dropped, "sha256": digests, "source": source}
            reports[split] = SplitReport(kept, dropped)
        files.write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return reports


def aligned(*sides: tuple[str, Iterable[str]]) -> Iterator[tuple[str, ...]]:
    """Tuples of line sequences (given as (name, lines)) that must have the same length, checked as read."""
    missing = object()
    names = [name for name, _ in sides]
    for number, row in enumerate(zip_longest(*(lines for _, lines in sides), fillvalue=missing), 1):
        if any(text is missing for text in row):
            short = names[row.index(missing)]
            long_ = names[next(i for i, text in enumerate(row) if text is not missing)]
            raise DataError(f"{short} ends at line {number - 1} but {long_} goes on: the files are not aligned")
        yield row


def _datasets():
    """The `datasets` module, its own download/preparation bars following `mt --quiet` and the terminal."""
    import datasets

    if bars_enabled():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    return datasets


def _load_text_files(files: dict[str, str]) -> dict[str, list[str]]:
    """Read line files (local paths or URLs, optionally .gz) through `datasets`' text loader."""
    datasets = _datasets()
    for split, location in files.items():
        if "://" not in location and not Path(location).is_file():
            raise DataError(f"{location}: file not found (split {split})")
    try:
        loaded = datasets.load_dataset("text", data_files=files, keep_in_memory=True)
    except FileNotFoundError as exc:
        raise DataError(f"cannot download: {exc}".splitlines()[0]) from None
    except (OSError, ConnectionError, ValueError) as exc:
        raise DataError(f"cannot load {', '.join(files.values())}: {exc}".splitlines()[0]) from None
    except datasets.exceptions.DatasetGenerationError as exc:  # e.g. a .gz file corrupt mid-stream
        cause = exc.__cause__ or exc
        raise DataError(f"cannot read {', '.join(files.values())}: {cause or type(cause).__name__}") from None
    return {split: list(loaded[split]["text"]) for split in files}


def fetch_multi30k(
    pair: str | None = "de-en",
    out_dir: str | Path | None = None,
    source: str | None = None,
    force: bool = False,
    langs: str | None = None,
) -> dict[str, SplitReport]:
    """Multi30k task 1 from its public raw files, or from a mirror (directory or URL) with the same names.

    `pair` (de-en) writes one language pair; `langs` (en,de,fr,cs) a multi-way corpus directory whose
    files serve every direction between them (`data.directions`).
    """
    if langs:
        chosen = tuple(dict.fromkeys(lang.strip() for lang in langs.split(",") if lang.strip()))
        if len(chosen) < 2:
            raise DataError(f"--langs {langs!r}: give at least two languages, e.g. en,de,fr,cs")
    else:
        chosen = parse_pair(pair or "de-en")
    for lang in chosen:
        if lang not in MULTI30K_LANGS:
            raise DataError(f"multi30k has languages {', '.join(MULTI30K_LANGS)}; not {lang!r}")
    source = (source or os.environ.get(MULTI30K_SOURCE_ENV) or MULTI30K_URL).rstrip("/")
    if "://" not in source:
        if not Path(source).is_dir():
            raise DataError(f"{source}: Multi30k source directory not found")
        source = str(Path(source).resolve())
    out_dir = out_dir or Path("data") / ("multi30k" if langs else f"multi30k-{chosen[0]}-{chosen[1]}")
    texts = {
        lang: _load_text_files({split: f"{source}/{stem}.{lang}.gz" for split, stem in MULTI30K_SPLITS.items()})
        for lang in chosen
    }
    splits = {
        split: aligned(*((f"{source}/{stem}.{lang}.gz", texts[lang][split]) for lang in chosen))
        for split, stem in MULTI30K_SPLITS.items()
    }
    return write_corpus(out_dir, splits, chosen, f"multi30k:{source}", force)


def fetch_hub(
    name: str, pair: str, config_name: str | None = None, out_dir: str | Path | None = None, force: bool = False
) -> dict[str, SplitReport]:
    """Any Hugging Face dataset with a `translation` column of {lang: text} dicts."""
    datasets = _datasets()

    src_lang, tgt_lang = parse_pair(pair)
    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as exc:  # the Hub raises many unrelated types; all mean "could not load"
        raise DataError(f"cannot load dataset {name!r} ({config_name}): {exc}".splitlines()[0]) from None
    out_dir = out_dir or Path("data") / f"{name.split('/')[-1]}-{src_lang}-{tgt_lang}"
    splits = {}
    for hub_split, rows in loaded.items():
        if "translation" not in rows.column_names:
            raise DataError(f"{name}: split {hub_split!r} has no 'translation' column (columns: {rows.column_names})")
        first = rows[0]["translation"] if len(rows) else {}
        missing = [lang for lang in (src_lang, tgt_lang) if first and lang not in first]
        if missing:
            raise DataError(f"{name}: no language {missing[0]!r} in its translations (has {sorted(first)})")
        splits[HF_SPLITS.get(hub_split, hub_split)] = _hub_pairs(rows, src_lang, tgt_lang)
    source = f"hf:{name}" + (f"/{config_name}" if config_name else "")
    return write_corpus(out_dir, splits, (src_lang, tgt_lang), source, force)


def _hub_pairs(rows, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    """A Hub split's (source, target) texts, read batch by batch from its memory-mapped Arrow table."""
    for batch in rows.iter(batch_size=10_000):
        for translation in batch["translation"]:
            yield translation.get(src_lang) or "", translation.get(tgt_lang) or ""


def import_files(
    out_dir: str | Path,
    split: str,
    src: str | Path | None = None,
    tgt: str | Path | None = None,
    tsv: str | Path | None = None,
    pair: str | None = None,
    errors: str = "strict",
    force: bool = False,
) -> dict[str, SplitReport]:
    """Import a local parallel corpus: two line-aligned files (plain or .gz) or one TSV file."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split) or ".." in split:
        raise DataError(f"--split {split!r}: use a plain name such as train, valid or test (letters, digits, _ . -)")
    if tsv is not None:
        if src is not None or tgt is not None:
            raise DataError("give either --tsv or --src/--tgt, not both")
        if pair is None:
            raise DataError("--tsv needs --pair (e.g. --pair de-en)")
        src_lang, tgt_lang = parse_pair(pair)
        pairs = iter_tsv(tsv, errors)
        src_name = tgt_name = str(tsv)
    else:
        if src is None or tgt is None:
            raise DataError("give --src and --tgt (or --tsv)")
        src, tgt = Path(src), Path(tgt)
        src_lang, tgt_lang = parse_pair(pair) if pair else (_lang_of(src), _lang_of(tgt))
        src_name, tgt_name = str(src), str(tgt)
        pairs = aligned((src_name, iter_lines(src, errors)), (tgt_name, iter_lines(tgt, errors)))
    source = f"import:{src_name}" + (f"+{tgt_name}" if tgt_name != src_name else "")
    return write_corpus(out_dir, {split: pairs}, (src_lang, tgt_lang), source, force)


def _lang_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if not suffixes:
        raise DataError(f"{path}: cannot tell the language from the file name; pass --pair")
    return suffixes[-1].lstrip(".")


def corpus_files(data_dir: str | Path, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    data_dir = Path(data_dir)
    paths = (data_dir / f"{split}.{src_lang}", data_dir / f"{split}.{tgt_lang}")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found (fetch or import the corpus first: mt data --help)")
    return paths


def iter_pairs(src_path: Path, tgt_path: Path, errors: str = "strict") -> Iterator[tuple[str, str]]:
    """Stream the aligned, non-empty sentence pairs of two line-aligned files (as `align` keeps them).

    `errors`: what invalid UTF-8 does, as in `iter_lines`.
    """
    dropped = 0
    for s, t in aligned((str(src_path), iter_lines(src_path, errors)), (str(tgt_path), iter_lines(tgt_path, errors))):
        s, t = _clean(s), _clean(t)
        if s and t:
            yield s, t
        else:
            dropped += 1
    if dropped:
        log.warning("%s: skipped %d pairs with an empty side", src_path.parent, dropped)
