"""Training runs through the real command line: surviving kills, signals and diverging losses; validation."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_mt, tiny_model, write_reversal_corpus

from mt.config import TrainConfig
from mt.run_dir import Progress, RunDir, StepCheckpoint, Weights, average_weights, load_state, save_checkpoint
from mt.trainer import make_trainer


def step_checkpoint(run: Path, step: int) -> Path:
    return RunDir(run).step_checkpoint(step)


def list_checkpoints(run: Path) -> list[Path]:
    return RunDir(run).step_checkpoints()


CONFIG = """
data: {{dir: {data}, src: src, tgt: tgt}}
tokenizer: {{vocab_size: 24}}
model: {{encoder_layers: 1, decoder_layers: 1, d_model: 32, heads: 4, ffn_dim: 64, dropout: 0.1, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 250, lr: 0.003, warmup_steps: 10, max_steps: {steps}, save_every: 10,
        keep_checkpoints: 3, log_every: 5, valid_sentences: 10, device: cpu}}
"""


def _config(root: Path, name: str, steps: int) -> Path:
    data = root / "data"
    if not data.is_dir():
        write_reversal_corpus(data, {"train": 400, "valid": 10})
    path = root / f"{name}.yaml"
    path.write_text(CONFIG.format(data=data, run=root / name, steps=steps))
    return path


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "mt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, f"training ended before {path.name} appeared:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def _loss_curve(run: Path) -> dict[int, float]:
    """Training loss per logged step; a resumed run re-logs the steps after its checkpoint: keep the last."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path):
    steps = 150  # ~12 updates per epoch, so the kill lands mid-epoch, with dropout drawing random numbers
    run_mt("train", str(_config(tmp_path, "whole", steps)))

    killed = _start("train", str(_config(tmp_path, "killed", steps)))
    _wait_for(step_checkpoint(tmp_path / "killed", 20), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    newest = list_checkpoints(tmp_path / "killed")[-1]
    assert newest.name < f"step{steps:08d}.pt", "the run finished before it was killed"

    resumed = run_mt("train", str(tmp_path / "killed.yaml"))
    assert "has checkpoints: continuing from step" in resumed.stderr

    whole, again = (load_state(list_checkpoints(tmp_path / run)[-1]) for run in ("whole", "killed"))
    assert whole["progress"]["step"] == again["progress"]["step"] == steps
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, again["model"][name]), name  # bit-identical on CPU
    assert _loss_curve(tmp_path / "killed") == _loss_curve(tmp_path / "whole")
    assert len(list_checkpoints(tmp_path / "killed")) == 3  # keep_checkpoints
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))


def test_sigint_saves_a_checkpoint_and_exits_zero_and_a_diverging_resume_stops_cleanly(tmp_path):
    config = _config(tmp_path, "run", 100_000)
    process = _start("train", str(config))
    _wait_for(step_checkpoint(tmp_path / "run", 10), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped by SIGINT at step" in stderr and "--resume" in stderr
    path, state = RunDir(tmp_path / "run").latest_checkpoint()
    assert f"checkpoint {path}" in stderr
    assert state.progress.step >= 10 and state.trainer and len(state.rng) == 1

    # weights gone to NaN (as after a divergence): every update is skipped, then the run stops
    state.model = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state.model.items()}
    save_checkpoint(path, state)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    result = run_mt("train", str(tmp_path / "run"), "--resume", "--set", "train.max_bad_steps=3", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "update skipped (1 in a row)" in result.stderr
    assert f"3 updates in a row had a non-finite loss or gradient (after step {state.progress.step})" in (result.stderr)
    assert f"Last good checkpoint: {path}" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_resume_without_a_checkpoint_and_a_changed_model_are_refused(tmp_path):
    config = _config(tmp_path, "run", 2)
    result = run_mt("train", str(config), "--resume", check=False)
    assert result.returncode == 2 and "no checkpoint to resume from" in result.stderr
    run_mt("train", str(config))
    result = run_mt("train", str(config), "--set", "model.d_model=64", check=False)
    assert result.returncode == 2
    assert "this run has model.d_model=32, the config asks for 64" in result.stderr


def test_a_non_finite_loss_skips_the_update_and_leaves_the_weights_alone():
    model = tiny_model(dropout=0.0)
    trainer = make_trainer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    tgt_in, tgt_out = torch.tensor([[1, 7, 6, 5], [1, 9, 8, 0]]), torch.tensor([[7, 6, 5, 2], [9, 8, 2, 0]])
    with torch.no_grad():
        model.decoder[0].ffn_block.norm.weight[0] = math.inf
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.update([(src, tgt_in, tgt_out)], lr=1e-3)
    assert not result.applied and not math.isfinite(result.stats.loss_sum)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.optimizer.state  # AdamW never stepped
    assert all(p.grad is None for p in model.parameters())


def test_checkpoints_are_pruned_and_averaged(tmp_path):
    weights = []
    for step in (10, 20, 30, 40):
        model = {"w": torch.full((2, 2), float(step)), "b": torch.tensor([step], dtype=torch.float16)}
        weights.append(model)
        save_checkpoint(step_checkpoint(tmp_path, step), Weights(model, "t", step=step))
    RunDir(tmp_path).prune_checkpoints(keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step00000020.pt", "step00000030.pt", "step00000040.pt"]
    averaged = average_weights(list_checkpoints(tmp_path)[-2:])
    assert torch.equal(averaged.model["w"], torch.full((2, 2), 35.0))
    assert averaged.model["b"].dtype == torch.float16 and averaged.step == 40


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    for step in (10, 20):
        save_checkpoint(step_checkpoint(tmp_path, step), StepCheckpoint({}, {}, Progress(step=step), [], "t", [5, 5]))
    data = step_checkpoint(tmp_path, 20).read_bytes()
    step_checkpoint(tmp_path, 20).write_bytes(data[: len(data) // 2])
    path, state = RunDir(tmp_path).latest_checkpoint()
    assert state.progress.step == 10 and "corrupt or truncated" in caplog.text


def test_average_command(tmp_path):
    for step in (1, 2):
        save_checkpoint(step_checkpoint(tmp_path, step), Weights({"w": torch.tensor([float(step)])}, step=step))
    out = tmp_path / "avg.pt"
    run_mt("average", str(tmp_path), "--last", "2", "-o", str(out))
    assert torch.equal(load_state(out)["model"]["w"], torch.tensor([1.5]))
    result = run_mt("average", str(tmp_path), "--last", "2", "-o", str(out), check=False)
    assert result.returncode == 2 and "exists; use --force" in result.stderr
    result = run_mt("average", str(tmp_path), "--last", "3", "-o", str(tmp_path / "x.pt"), check=False)
    assert result.returncode == 2 and "has 2 step checkpoints, fewer than --last 3" in result.stderr


@pytest.mark.parametrize(
    "scores, better",
    [
        ({"valid_bleu": 30.0, "valid_loss": 2.0}, True),
        ({"valid_bleu": 20.0, "valid_loss": 1.0}, False),
        ({"valid_bleu": 25.0, "valid_loss": 2.9}, True),
        ({"valid_bleu": 25.0, "valid_loss": 3.0}, False),
    ],
)
def test_best_checkpoint_is_chosen_by_bleu_then_loss(scores, better):
    assert Progress(best_bleu=25.0, best_loss=3.0).improves(scores) is better


def test_validation_bleu_can_use_beam_search(tmp_path):
    config = _config(tmp_path, "beam", 12)
    bad = run_mt("train", str(config), "--set", "train.valid_beam=0", check=False)
    assert bad.returncode == 2 and "train.valid_beam must be at least 1" in bad.stderr
    run_mt("train", str(config), "--set", "train.valid_beam=3")
    records = [json.loads(line) for line in (tmp_path / "beam" / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in r for r in records)
    assert "| valid (first 10 sentences) | beam 3 |" in (tmp_path / "beam" / "README.md").read_text()


def test_a_second_trainer_of_a_run_directory_refuses_and_a_killed_ones_lock_is_gone(tmp_path):
    config = _config(tmp_path, "run", 100_000)
    first = _start("train", str(config))
    _wait_for(step_checkpoint(tmp_path / "run", 10), first)
    second = run_mt("train", str(config), check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"another `mt train` is training this run directory (held by process {first.pid})" in second.stderr
    first.send_signal(signal.SIGKILL)  # the kernel drops its lock: no stale lock after a crash
    first.wait()
    newest = list_checkpoints(tmp_path / "run")[-1]
    resumed = run_mt("train", str(config), "--max-steps", str(int(newest.stem[4:]) + 2))
    assert f"continuing from {newest.name}" in resumed.stderr


def test_signals_held_back_during_a_block_arrive_after_it():
    from mt.signals import deferred_signals

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            # at this thread: other threads (torch's, pytest's) do not hold signals back, mt's main() has none yet
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.05)
            reached.append("end of block")  # a KeyboardInterrupt inside the block would skip this
    assert reached == ["end of block"]


@pytest.mark.parametrize("delay", [0.2, 0.8])
def test_ctrl_c_while_mt_train_starts_up_ends_it_cleanly(tmp_path, delay):
    process = _start("train", str(_config(tmp_path, "run", 100)))
    time.sleep(delay)  # torch is still loading
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert process.returncode == 130 and stderr.strip().endswith("mt: interrupted"), stderr
