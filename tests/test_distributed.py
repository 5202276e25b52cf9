"""Data-parallel training under torchrun (gloo on CPU) equals one process on the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_mt, write_multiway, write_reversal_corpus

from mt.run_dir import RunDir, load_state

CONFIG = """
data: {{dir: {data}, src: src, tgt: tgt{directions}}}
tokenizer: {{vocab_size: 24}}
model: {{encoder_layers: 1, decoder_layers: 1, d_model: 32, heads: 4, ffn_dim: 64, dropout: 0.0, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 200, update_freq: {update_freq}, lr: 0.003, warmup_steps: 2,
        max_steps: 4, valid_sentences: 20, log_every: 1, device: cpu}}
"""


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("multilingual", [False, True], ids=["one-pair", "multilingual"])
def test_two_rank_torchrun_matches_one_process_with_the_same_global_batch(tmp_path, multilingual):
    if multilingual:  # two directions of unequal size, so the temperature draws pairs again
        data = write_multiway(tmp_path / "data", {"train": 500, "valid": 20})
        small = write_multiway(tmp_path / "small", {"train": 100, "valid": 20}, seed=1)
        directions = f", directions: [src-rev, 'src-cp:{small}']"
    else:
        data, directions = write_reversal_corpus(tmp_path / "data", {"train": 600, "valid": 20}), ""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    (tmp_path / "single.yaml").write_text(CONFIG.format(data=data, run=single, update_freq=2, directions=directions))
    (tmp_path / "ddp.yaml").write_text(CONFIG.format(data=data, run=ddp, update_freq=1, directions=directions))
    run_mt("train", str(tmp_path / "single.yaml"))
    ddp.mkdir()
    shutil.copy(single / "spm.model", ddp / "spm.model")  # the same pieces, so the same batches

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, "-m", "mt", "train", str(tmp_path / "ddp.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "all 2 replicas hold identical parameters" in result.stderr

    start = json.loads((ddp / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 2
    assert _losses(ddp) == _approx(_losses(single))
    single_state, ddp_state = (load_state(RunDir(run).step_checkpoints()[-1]) for run in (single, ddp))
    assert ddp_state["progress"]["step"] == single_state["progress"]["step"] == 4
    assert len(ddp_state["rng"]) == 2  # each rank's generator states, for an exact resume
    difference = torch.cat([(ddp_state["model"][k] - v).abs().flatten() for k, v in single_state["model"].items()])
    # Adam turns float-noise gradients (e.g. of attention key biases, zero in exact arithmetic) into
    # lr-sized steps, so a few parameters may differ by a fraction of lr (0.003); the rest agree.
    assert (difference > 1e-5).float().mean() < 1e-2 and difference.max() < 1e-3


def _approx(values):
    import pytest

    return pytest.approx(values, rel=1e-4)
