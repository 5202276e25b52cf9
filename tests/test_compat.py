"""Run directories written by earlier versions keep loading, translating and resuming.

tests/fixtures/run_0.1.0 was trained by mt 0.1.0 (`mt train` on a digit-reversal corpus, 120
updates) and holds what that version wrote, with its translations of data/test.src.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_mt

from mt.run_dir import RunDir, load_step_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "run_0.1.0"


@pytest.fixture
def old_run(tmp_path):
    """A copy of the 0.1.0 run directory and its corpus (its config names both relative to here)."""
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--beam", "1"], "expected.greedy.tgt"),
        (["--beam", "3", "--nbest", "2"], "expected.nbest.tgt"),
        (["--checkpoint", "checkpoints/step00000120.pt"], "expected.step.tgt"),
    ],
)
def test_a_0_1_0_run_directory_translates_byte_identically(old_run, args, expected):
    source = (old_run / "data" / "test.src").read_text()
    result = run_mt("translate", "run", *args, stdin=source, cwd=old_run)
    found, wanted = result.stdout.splitlines(), (old_run / expected).read_text().splitlines()
    assert len(found) == len(wanted)
    for line, old_line in zip(found, wanted):
        if "\t" not in old_line:
            assert line == old_line
            continue
        # n-best lines: index, score, text. The text is byte for byte the same; the score's last printed
        # digit may differ by one, since CPUs round the same products differently (MKL's AVX2 and
        # AVX-512 kernels read -0.8702 and -0.8701 for one hypothesis)
        (index, score, text), (old_index, old_score, old_text) = line.split("\t"), old_line.split("\t")
        assert (index, text) == (old_index, old_text)
        assert float(score) == pytest.approx(float(old_score), abs=1.01e-4)


def test_a_0_1_0_run_directory_resumes_and_keeps_its_history(old_run):
    old = load_step_checkpoint(RunDir(old_run / "run").step_checkpoints()[-1])
    result = run_mt("train", "run", "--max-steps", "130", "--set", "train.score_test=true", cwd=old_run)
    assert "continuing from step00000120.pt (step 120" in result.stderr
    assert "finished after 130 steps" in result.stderr
    new = load_step_checkpoint(RunDir(old_run / "run").step_checkpoints()[-1])
    assert new.progress.step == 130 and new.tokenizer == old.tokenizer and new.vocab == old.vocab
    records = [json.loads(line) for line in (old_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["start", "resume"]
    card = (old_run / "run" / "README.md").read_text()
    assert "130 updates" in card and "| test (20 sentences)" in card


def test_a_0_1_0_run_directory_evaluates_and_writes_its_card(old_run):
    result = run_mt("eval", "run", "--src", "data/test.src", "--ref", "data/test.tgt", "--json", cwd=old_run)
    assert json.loads(result.stdout)["sentences"] == 20
    run_mt("card", "run", cwd=old_run)
    card = (old_run / "run" / "README.md").read_text()
    assert "120 updates" in card and "parameters" in card and "best checkpoint (best.pt): update" in card
