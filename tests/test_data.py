import gzip
import json

import pytest
from conftest import run_mt

from mt import data
from mt.errors import DataError


def _gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _mirror(tmp_path, train_extra=()):
    """A tiny Multi30k mirror with the real file names."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem, n in (("train", 6), ("val", 3), ("test_2016_flickr", 2)):
        _gz(
            mirror / f"{stem}.de.gz", [f"ein satz {i}" for i in range(n)] + list(train_extra if stem == "train" else [])
        )
        _gz(
            mirror / f"{stem}.en.gz",
            [f"a sentence {i}" for i in range(n)] + ([""] * len(train_extra) if stem == "train" else []),
        )
    return mirror


def test_fetch_multi30k_through_datasets_from_a_local_mirror(tmp_path):
    out = tmp_path / "out"
    reports = data.fetch_multi30k("de-en", out, source=str(_mirror(tmp_path, train_extra=["nur deutsch"])))
    assert {s: r.pairs for s, r in reports.items()} == {"train": 6, "valid": 3, "test": 2}
    assert reports["train"].dropped_empty == 1
    assert (out / "train.de").read_text().splitlines()[2] == "ein satz 2"
    assert (out / "valid.en").read_text().splitlines() == ["a sentence 0", "a sentence 1", "a sentence 2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["dropped_empty"] == 1
    assert len(manifest["splits"]["test"]["sha256"]["en"]) == 64


def test_fetch_through_the_cli_draws_no_bars_when_stderr_is_not_a_terminal(tmp_path):
    # datasets' own download/preparation bars follow mt's rule: log lines only, none with --quiet
    mirror = _mirror(tmp_path)
    args = ["data", "fetch", "multi30k", "--pair", "de-en", "--source", str(mirror), "--out"]
    logged = run_mt(*args, str(tmp_path / "a")).stderr
    assert "it/s" not in logged and "%|" not in logged and "6 pairs" in logged
    assert run_mt("--quiet", *args, str(tmp_path / "b")).stderr == ""


def test_fetch_multi30k_reads_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MT_MULTI30K_SOURCE", str(_mirror(tmp_path)))
    reports = data.fetch_multi30k("en-de", tmp_path / "out")
    assert reports["train"].pairs == 6
    assert (tmp_path / "out" / "train.en").is_file()


def test_fetch_refuses_to_overwrite(tmp_path):
    mirror, out = str(_mirror(tmp_path)), tmp_path / "out"
    data.fetch_multi30k("de-en", out, source=mirror)
    with pytest.raises(DataError, match="already exists"):
        data.fetch_multi30k("de-en", out, source=mirror)
    data.fetch_multi30k("de-en", out, source=mirror, force=True)


def test_fetch_names_a_missing_file(tmp_path):
    mirror = _mirror(tmp_path)
    (mirror / "val.en.gz").unlink()
    with pytest.raises(DataError, match="val.en.gz: file not found"):
        data.fetch_multi30k("de-en", tmp_path / "out", source=str(mirror))


def test_fetch_rejects_unknown_language(tmp_path):
    with pytest.raises(DataError, match="not 'xx'"):
        data.fetch_multi30k("de-xx", tmp_path / "out", source=str(_mirror(tmp_path)))


def test_import_plain_and_gz_files(tmp_path):
    (tmp_path / "a.de").write_text("hallo\nwelt\n\n")
    _gz(tmp_path / "a.en.gz", ["hello", "world", "orphan"])
    reports = data.import_files(tmp_path / "c", "train", src=tmp_path / "a.de", tgt=tmp_path / "a.en.gz")
    assert reports["train"].pairs == 2 and reports["train"].dropped_empty == 1
    assert (tmp_path / "c" / "train.en").read_text() == "hello\nworld\n"


def test_import_tsv(tmp_path):
    (tmp_path / "c.tsv").write_text("hallo\thello\nwelt\tworld\n")
    data.import_files(tmp_path / "c", "valid", tsv=tmp_path / "c.tsv", pair="de-en")
    assert (tmp_path / "c" / "valid.de").read_text() == "hallo\nwelt\n"


def test_import_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "a.en").write_text("one\n")
    with pytest.raises(DataError, match="a.en ends at line 1 but .*a.de goes on"):
        data.import_files(tmp_path / "c", "train", src=tmp_path / "a.de", tgt=tmp_path / "a.en")
    (tmp_path / "b.en").write_bytes(b"one\ntw\xffo\n")
    with pytest.raises(DataError, match=r"b.en:2: invalid UTF-8"):
        data.import_files(tmp_path / "c", "train", src=tmp_path / "a.de", tgt=tmp_path / "b.en")
    (tmp_path / "c.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(DataError, match=r"c.tsv:2: expected 2 tab-separated columns"):
        data.import_files(tmp_path / "c", "train", tsv=tmp_path / "c.tsv", pair="de-en")
    with pytest.raises(DataError, match="missing.de: file not found"):
        data.import_files(tmp_path / "c", "train", src=tmp_path / "missing.de", tgt=tmp_path / "a.en")


def test_invalid_utf8_can_be_replaced(tmp_path):
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "b.en").write_bytes(b"one\ntw\xffo\n")
    data.import_files(tmp_path / "c", "train", src=tmp_path / "a.de", tgt=tmp_path / "b.en", errors="replace")
    assert (tmp_path / "c" / "train.en").read_text().splitlines()[1] == "tw\ufffdo"


def test_fetch_hub_dataset_with_translation_column(tmp_path):
    """`--hf NAME` goes through datasets.load_dataset, which takes a local dataset directory too."""
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, n in (("train", 5), ("validation", 2), ("test", 2)):
        rows = [{"translation": {"de": f"satz {i}", "en": f"sentence {i}" if i else ""}} for i in range(n)]
        (hub / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = data.fetch_hub(str(hub), "de-en", out_dir=tmp_path / "out")
    assert {s: (r.pairs, r.dropped_empty) for s, r in reports.items()} == {
        "train": (4, 1),
        "valid": (1, 1),
        "test": (1, 1),
    }
    assert (tmp_path / "out" / "train.en").read_text().splitlines()[0] == "sentence 1"
    with pytest.raises(DataError, match="no language 'fr'"):
        data.fetch_hub(str(hub), "de-fr", out_dir=tmp_path / "out2")


def _corrupt_gz(path, lines):
    """A .gz file whose compressed stream breaks in the middle (bytes flipped after the header)."""
    _gz(path, lines)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_gzip_file_corrupt_mid_stream_is_a_clean_error(tmp_path):
    lines = [f"satz nummer {i} mit etwas text {i * 7919 % 1000}" for i in range(3000)]
    _corrupt_gz(tmp_path / "bad.de.gz", lines)
    _gz(tmp_path / "good.en.gz", lines)
    with pytest.raises(DataError, match="bad.de.gz: cannot read"):
        data.import_files(tmp_path / "out", "train", tmp_path / "bad.de.gz", tmp_path / "good.en.gz")
    mirror = _mirror(tmp_path)
    _corrupt_gz(mirror / "train.de.gz", lines)
    with pytest.raises(DataError, match="cannot read"):
        data.fetch_multi30k("de-en", tmp_path / "m30k", source=str(mirror))


@pytest.mark.parametrize("failing_write", [2, 3])  # the target side, the manifest
def test_replacing_a_corpus_on_a_full_disk_keeps_the_old_set_whole(tmp_path, monkeypatch, failing_write):
    import errno

    import mt.files

    for name, text in (("old.de", "alt\n"), ("old.en", "old\n"), ("new.de", "neu\nneu\n"), ("new.en", "new\nnew\n")):
        (tmp_path / name).write_text(text)
    out = tmp_path / "corpus"
    data.import_files(out, "train", tmp_path / "old.de", tmp_path / "old.en")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    writes = {"count": 0}
    fsync = mt.files.os.fsync

    def full_disk(fd):
        writes["count"] += 1
        if writes["count"] == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(mt.files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        data.import_files(out, "train", tmp_path / "new.de", tmp_path / "new.en", force=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    data.import_files(out, "train", tmp_path / "new.de", tmp_path / "new.en", force=True)
    assert (out / "train.de").read_text() == "neu\nneu\n" and json.loads((out / "manifest.json").read_text())
