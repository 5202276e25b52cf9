"""The benchmark scripts run as documented (their figures are measured, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_decode_interleaves_rounds_and_ends_with_medians(trained, tmp_path):
    rows = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPTS / "bench_decode.py"), str(trained / "run"), str(trained / "test.src")]
    command += ["--ref", str(trained / "test.tgt"), "--no-uncached", "--rounds", "2", "--variant", "workers=1"]
    result = subprocess.run([*command, "--json", str(rows)], capture_output=True, text=True, check=True)
    assert "round 2 of 2" in result.stdout and "medians over 2 rounds" in result.stdout
    modes = [row["mode"] for row in json.loads(rows.read_text())]
    assert modes.count("beam5 cached") == 2 and modes.count("beam5 workers=1") == 2
    assert all(row["bleu"] > 50 for row in json.loads(rows.read_text()))  # the reversal model really translates


def test_bench_decode_refuses_zero_rounds(trained):
    command = [sys.executable, str(SCRIPTS / "bench_decode.py"), str(trained / "run"), str(trained / "test.src")]
    result = subprocess.run([*command, "--rounds", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--rounds must be at least 1" in result.stderr
