"""The training run in-process: when it validates, saves and stops (steps, epochs, time, patience)."""

import json

import pytest
from conftest import write_reversal_corpus

import mt.train
from mt.config import load_config
from mt.run_dir import RunDir, load_step_checkpoint, load_weights
from mt.train import TrainingRun

CONFIG = """
data: {{dir: {data}, src: src, tgt: tgt}}
tokenizer: {{vocab_size: 24}}
model: {{encoder_layers: 1, decoder_layers: 1, d_model: 32, heads: 4, ffn_dim: 64, dropout: 0.0, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 200, lr: 0.003, warmup_steps: 5, log_every: 2, save_every: 0,
        valid_sentences: 5, score_test: false, device: cpu}}
"""


@pytest.fixture
def make_run(tmp_path):
    data = write_reversal_corpus(tmp_path / "data", {"train": 400, "valid": 5})

    def make(*overrides: str) -> TrainingRun:
        path = tmp_path / "run.yaml"
        path.write_text(CONFIG.format(data=data, run=tmp_path / "run"))
        run = TrainingRun(load_config(path, list(overrides)))
        run.prepare()
        run.restore()
        return run

    return make


def _validated_steps(run: TrainingRun) -> list[int]:
    records = [json.loads(line) for line in run.run.metrics.read_text().splitlines()]
    return [r["step"] for r in records if "valid_loss" in r]


def test_max_steps_with_valid_every_validates_every_n_steps_and_at_the_end(make_run):
    run = make_run("train.max_steps=10", "train.valid_every=3")
    assert len(run.epoch_batches(1)) > 10  # no epoch end (which validates too) before step 10
    assert run.train() == "max_steps"
    assert run.progress.step == 10 and _validated_steps(run) == [3, 6, 9, 10]
    assert load_step_checkpoint(RunDir(run.run).step_checkpoints()[-1]).progress.step == 10


def test_with_valid_every_epoch_ends_are_not_validated(make_run):
    run = make_run("train.valid_every=1000", "train.max_epochs=3")  # a small corpus: epochs of a few updates
    per_epoch = len(run.epoch_batches(1))
    assert run.train() == "max_epochs"
    assert _validated_steps(run) == [3 * per_epoch]  # at the end only, not after every short epoch


def test_max_epochs_validates_at_each_epoch_end(make_run):
    run = make_run("train.max_epochs=2")
    per_epoch = len(run.epoch_batches(1))
    assert run.train() == "max_epochs"
    p = run.progress
    assert (p.epoch, p.batches_done, p.step) == (2, 0, 2 * per_epoch)
    assert _validated_steps(run) == [per_epoch, 2 * per_epoch]
    assert RunDir(run.run).step_checkpoints()[-1].name == f"step{2 * per_epoch:08d}.pt"


def test_patience_stops_after_that_many_validations_without_a_better_bleu(make_run, monkeypatch):
    scores = {"valid_loss": 1.0, "valid_ppl": 2.7, "valid_bleu": 10.0, "valid_chrf": 20.0}
    monkeypatch.setattr(mt.train, "validate", lambda *args: dict(scores))  # never better than the first
    run = make_run("train.max_steps=100", "train.valid_every=2", "train.patience=2")
    assert run.train() == "patience"
    assert run.progress.step == 6 and _validated_steps(run) == [2, 4, 6]
    assert load_weights(run.run.best).step == 2 and run.progress.best_step == 2


class _Clock:
    """mt.train's view of time: each update takes one second."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_time_budget_keeps_room_for_the_last_validation(make_run, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(mt.train, "time", clock)
    run = make_run("train.max_time=10s", "train.valid_every=4")
    update = run.update

    def one_second_update(batches):
        clock.now += 1.0
        return update(batches)

    validate = mt.train.validate

    def three_second_validation(*args):
        clock.now += 3.0
        return validate(*args)

    monkeypatch.setattr(run, "update", one_second_update)
    monkeypatch.setattr(mt.train, "validate", three_second_validation)
    assert run.train() == "max_time"
    # 4 updates, a validation (3 s): 7 s; after 1 update more 8 + 3 >= 10 leaves no room: stop and validate
    assert run.progress.step == 5 and _validated_steps(run) == [4, 5]


def test_validation_leaves_out_pairs_longer_than_the_model_reads(make_run, tmp_path):
    valid = tmp_path / "data" / "valid.src"
    valid.write_text(valid.read_text() + " ".join(["7"] * 80) + "\n")  # 80 pieces: model.max_positions is 64
    target = tmp_path / "data" / "valid.tgt"
    target.write_text(target.read_text() + " ".join(["7"] * 80) + "\n")
    run = make_run("train.max_steps=2")
    assert len(run.valid) == 5 and len(run.valid.tgt_texts()) == 5
    assert run.train() == "max_steps" and _validated_steps(run) == [2]


def test_tensorboard_events_hold_the_metrics_logs_series(make_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = make_run("train.max_steps=6", "train.valid_every=3", "train.tensorboard=true")
    assert run.train() == "max_steps"
    records = [json.loads(line) for line in run.run.metrics.read_text().splitlines()]
    events = event_accumulator.EventAccumulator(str(run.run.tensorboard))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tgt_tokens_per_s", "valid/bleu", "valid/loss"} <= set(
        events.Tags()["scalars"]
    )
    losses = [r for r in records if "loss" in r]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in losses]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in losses], rel=1e-6)
    assert [e.step for e in events.Scalars("valid/bleu")] == [3, 6]
