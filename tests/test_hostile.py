"""Hostile input that once crashed or misbehaved (issue 17): each ends in one `mt: error:` line and exit
code 2, or works, and leaves existing files as they were."""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_mt

from mt.run_dir import RunDir, Weights, save_checkpoint
from mt.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "run_0.1.0"


@pytest.fixture
def old_run(tmp_path):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _error(*args, stdin=None, cwd=None) -> str:
    result = run_mt(*args, stdin=stdin, cwd=cwd, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mt: error: ")]
    assert len(lines) == 1 and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    return lines[0]


def test_zero_byte_checkpoints_are_reported_or_skipped(old_run, caplog):
    (old_run / "run" / "checkpoints" / "step00000130.pt").write_bytes(b"")
    path, state = RunDir(old_run / "run").latest_checkpoint()
    assert path.name == "step00000120.pt" and "corrupt or truncated checkpoint (empty file)" in caplog.text
    (old_run / "run" / "best.pt").write_bytes(b"")
    assert "best.pt: corrupt or truncated checkpoint (empty file)" in _error(
        "translate", "run", stdin="1\n", cwd=old_run
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.heads=0"], "model sizes must be positive"),
        (["model.d_model=63", "model.heads=1", "model.position=sinusoidal"], "must be even for sinusoidal"),
        (["model.d_model=18", "model.heads=6"], "rotary positions need an even head size"),
        (["train.max_steps=-1"], "train.max_steps must be at least 1"),
        (["decode.no_repeat_ngram=-1"], "decode.no_repeat_ngram must be >= 0"),
    ],
)
def test_config_values_that_would_crash_later_are_refused_up_front(old_run, overrides, message):
    args = [arg for override in overrides for arg in ("--set", override)]
    config = old_run / "run" / "config.yaml"
    assert message in _error("train", str(config), "--set", "train.run_dir=new", *args, cwd=old_run)


def test_a_config_file_that_is_not_utf8_is_named(old_run):
    (old_run / "bad.yaml").write_bytes(b"train:\n  run_dir: r\xe9\n")
    assert "bad.yaml: not UTF-8 text (invalid byte at offset 19)" in _error("train", "bad.yaml", cwd=old_run)


def test_training_pairs_longer_than_the_model_positions_are_left_out(old_run):
    args = ["--set", "train.run_dir=short", "--set", "model.max_positions=6", "--max-steps", "2"]
    result = run_mt("train", "run/config.yaml", *args, cwd=old_run)
    assert "pairs of 6 pieces or more" in result.stderr and "finished after 2 steps" in result.stderr


def test_resuming_after_the_model_section_was_edited_is_one_line(old_run):
    config = old_run / "run" / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 16", "d_model: 32"))
    assert "step00000120.pt: its weights do not fit the model of" in _error("train", "run", cwd=old_run)


def test_a_beam_wider_than_the_vocabulary_and_an_average_of_two_architectures(old_run, tmp_path):
    assert "beam 40: larger than the model's 14 choosable pieces" in _error(
        "translate", "run", "--beam", "40", "--nbest", "1", stdin="1 2\n", cwd=old_run
    )
    runs = RunDir(tmp_path / "mixed")
    for step, size in ((1, 2), (2, 3)):
        save_checkpoint(runs.step_checkpoint(step), Weights({"w": torch.zeros(size)}, "t", [5, 5], step=step))
    assert "do not match those of" in _error("average", str(runs), "--last", "2", "-o", str(tmp_path / "a.pt"))


def test_nbest_gives_n_lines_for_a_blank_line_too(old_run):
    out = run_mt("translate", "run", "--beam", "3", "--nbest", "2", stdin="1 2\n\n3\n", cwd=old_run).stdout
    lines = out.splitlines()
    assert len(lines) == 6 and [line.split("\t")[0] for line in lines] == ["0", "0", "1", "1", "2", "2"]
    assert lines[2:4] == ["1\t0.0000\t", "1\t0.0000\t"]
    assert "no_repeat_ngram -1: must be >= 0" in _error("translate", "run", "--no-repeat-ngram", "-1", cwd=old_run)


def test_outputs_and_split_names_never_escape_or_overwrite(old_run):
    (old_run / "keep.txt").write_text("mine\n")
    args = ["eval", "run", "--src", "data/test.src", "--ref", "data/test.tgt", "--output", "keep.txt"]
    assert "keep.txt: exists; use --force" in _error(*args, cwd=old_run)
    assert "keep.txt: exists; use --force" in _error("attention", "run", "1 2", "-o", "keep.txt", cwd=old_run)
    assert (old_run / "keep.txt").read_text() == "mine\n"
    evil = ["data", "import", "--src", "data/test.src", "--tgt", "data/test.tgt", "--pair", "de-en"]
    assert "--split '../../evil': use a plain name" in _error(*evil, "--out", "c", "--split", "../../evil", cwd=old_run)
    assert not (old_run.parent / "evil.de").exists()


def test_operating_system_errors_are_one_line_naming_the_path(old_run):
    (old_run / "a_file").write_text("not a directory\n")
    message = _error("train", "run/config.yaml", "--set", "train.run_dir=a_file/run", "--max-steps", "1", cwd=old_run)
    assert "a_file" in message and "not a directory" in message
    assert (old_run / "a_file").read_text() == "not a directory\n"
    evil = ["data", "import", "--src", "data/test.src", "--tgt", "data/test.tgt", "--pair", "de-en"]
    assert "a_file" in _error(*evil, "--out", "a_file", cwd=old_run)


def test_import_drops_a_byte_order_mark_and_names_a_directory_given_as_a_file(old_run):
    (old_run / "bom.de").write_bytes("\ufeffein satz\nnoch einer\n".encode())
    (old_run / "bom.en").write_text("a sentence\none more\n")
    run_mt("data", "import", "--src", "bom.de", "--tgt", "bom.en", "--out", "c", cwd=old_run)
    assert (old_run / "c" / "train.de").read_text().startswith("ein satz\n")
    assert "data: is a directory, not a text file" in _error(
        "data", "import", "--src", "data", "--tgt", "bom.en", "--pair", "de-en", "--out", "d", cwd=old_run
    )


def test_a_bad_set_value_is_named_by_its_override_not_the_file(old_run):
    message = _error("train", "run/config.yaml", "--set", "model.heads=3", cwd=old_run)
    assert message == "mt: error: --set model.heads=3: model.d_model must be divisible by model.heads"


def test_a_plain_pickle_is_refused_without_torchs_protocol_warning(tmp_path, recwarn):
    import pickle

    from mt.errors import CheckpointError
    from mt.run_dir import load_state

    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with pytest.raises(CheckpointError):
        load_state(tmp_path / "plain.pt")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_failed_import_leaves_no_empty_directory(old_run):
    (old_run / "empty.de").write_text("\n")
    (old_run / "empty.en").write_text("\n")
    assert "no sentence pairs" in _error(
        "data", "import", "--src", "empty.de", "--tgt", "empty.en", "--out", "e", cwd=old_run
    )
    assert not (old_run / "e").exists()


def test_a_vocabulary_larger_than_the_corpus_supports_is_reported(old_run):
    args = ["--set", "train.run_dir=big", "--set", "tokenizer.vocab_size=500", "--max-steps", "1"]
    result = run_mt("train", "run/config.yaml", *args, cwd=old_run)
    assert "tokenizer.vocab_size=500, but the corpus supports only" in result.stderr
    pieces = load_tokenizer(old_run / "big", joint=True).src_vocab_size
    assert (
        f"SentencePiece unigram, {pieces} pieces (tokenizer.vocab_size=500: the corpus supports no more)"
        in (old_run / "big" / "README.md").read_text()
    )


@pytest.fixture
def small_filesystem(old_run):
    """A tmpfs at old_run/fs holding a copy of the run: `mount(spare_kb, read_only)` (root only, else skipped)."""
    mount_point = old_run / "fs"
    mount_point.mkdir()
    used_kb = sum(path.stat().st_size // 1024 + 4 for path in (old_run / "run").rglob("*")) + 16

    def mount(spare_kb: int = 0, read_only: bool = False) -> Path:
        command = ["mount", "-t", "tmpfs", "-o", f"size={used_kb + spare_kb}k", "tmpfs", str(mount_point)]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("needs root and permission to mount a tmpfs")
        shutil.copytree(old_run / "run", mount_point / "run")
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        return mount_point / "run"

    yield mount
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_old_one(old_run, small_filesystem):
    run = small_filesystem(spare_kb=48)  # room for the encoded corpus, not for another 120 kB checkpoint
    old = RunDir(run).step_checkpoints()[-1]
    before = _digest(old)
    message = _error("train", str(run), "--max-steps", "121", cwd=old_run)
    assert "no space left on device" in message and str(run) in message
    assert _digest(old) == before and RunDir(run).latest_checkpoint()[0] == old
    assert not [path.name for path in run.rglob("*") if path.name.endswith(".tmp")]


def test_a_read_only_run_directory_translates_and_refuses_writes_in_one_line(old_run, small_filesystem):
    run = small_filesystem(read_only=True)
    assert run_mt("translate", str(run), stdin="1 2 3\n", cwd=old_run).stdout.count("\n") == 1
    assert "read-only file system" in _error("train", str(run), "--max-steps", "121", cwd=old_run)
    assert "read-only file system" in _error("average", str(run), "--last", "1", "-o", str(run / "avg.pt"), cwd=old_run)
    imported = ["data", "import", "--src", "data/test.src", "--tgt", "data/test.tgt", "--pair", "de-en"]
    assert "read-only file system" in _error(*imported, "--out", str(run / "corpus"), cwd=old_run)
