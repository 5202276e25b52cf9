"""Fine-tuning with `--init-from`: a new run starts from another's weights and tokenizer, exactly."""

import json

import pytest
import torch
from conftest import run_mt, write_reversal_corpus

from mt.config import load_config
from mt.errors import CheckpointError, ConfigError
from mt.run_dir import RunDir, load_step_checkpoint, load_weights
from mt.tokenizer import load_tokenizer
from mt.train import TrainingRun, train
from mt.vocab import UNK

CONFIG = """
data: {{dir: {data}, src: src, tgt: tgt}}
tokenizer: {{vocab_size: 30}}
model: {{encoder_layers: 1, decoder_layers: 1, d_model: 32, heads: 4, ffn_dim: 64, dropout: 0.0, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 200, lr: 0.003, warmup_steps: 5, log_every: 2, save_every: 0,
        valid_sentences: 5, score_test: false, device: cpu, max_steps: 6}}
"""


@pytest.fixture
def source(tmp_path):
    """A trained run (6 updates) and a config writer for runs on another corpus."""
    write_reversal_corpus(tmp_path / "data", {"train": 300, "valid": 5})
    write_reversal_corpus(tmp_path / "other", {"train": 100, "valid": 5}, seed=1)
    config = tmp_path / "source.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "data", run=tmp_path / "source"))
    train(load_config(config))
    return tmp_path


def _new_run(root, *overrides: str) -> TrainingRun:
    path = root / "new.yaml"
    path.write_text(CONFIG.format(data=root / "other", run=root / "new"))
    run = TrainingRun(load_config(path, list(overrides)))
    run.prepare()
    assert not run.restore()
    run.initialise()
    return run


def test_init_from_reuses_the_tokenizer_and_the_weights_exactly(source):
    run = _new_run(source, f"train.init_from={source / 'source'}")
    assert (source / "new" / "spm.model").read_bytes() == (source / "source" / "spm.model").read_bytes()
    best = load_weights(source / "source" / "best.pt")
    state = run.model.state_dict()
    assert state.keys() == best.model.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in best.model.items())
    assert run.progress.step == 0 and run.trainer.optimizer.state_dict()["state"] == {}  # a fresh start
    saved = load_config(source / "new" / "config.yaml")
    assert saved.train.init_from == str(source / "source" / "best.pt")  # the exact file is recorded
    assert run.train() == "max_steps" and run.progress.step == 6


def test_keep_optimizer_carries_the_optimizer_and_update_counter_over(source):
    newest = RunDir(source / "source").step_checkpoints()[-1]
    run = _new_run(source, f"train.init_from={source / 'source'}", "train.keep_optimizer=true", "train.max_steps=8")
    kept = load_step_checkpoint(newest)
    assert run.progress.step == kept.progress.step == 6
    moments = run.trainer.optimizer.state_dict()["state"]
    assert moments and all(
        torch.equal(moments[k]["exp_avg"], v["exp_avg"]) for k, v in kept.trainer["optimizer"]["state"].items()
    )
    assert run.train() == "max_steps" and run.progress.step == 8  # two more updates, schedule continued


def test_a_different_model_section_is_refused_naming_the_keys(source):
    with pytest.raises(ConfigError, match=r"model\.d_model \(32 there, 64 here\).*model\.ffn_dim"):
        _new_run(source, f"train.init_from={source / 'source'}", "model.d_model=64", "model.ffn_dim=128")
    _new_run(source, f"train.init_from={source / 'source'}", "model.dropout=0.3")  # dropout may change


def test_init_from_errors_are_one_line(source):
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint"):
        _new_run(source, f"train.init_from={source / 'missing'}")
    with pytest.raises(CheckpointError, match="--keep-optimizer: .*not a step checkpoint"):
        _new_run(source, f"train.init_from={source / 'source' / 'best.pt'}", "train.keep_optimizer=true")
    with pytest.raises(ConfigError, match="this run's own directory; use --resume"):
        path = source / "again.yaml"
        path.write_text(CONFIG.format(data=source / "other", run=source / "source"))
        config = load_config(path, [f"train.init_from={source / 'source' / 'best.pt'}"])
        (source / "source" / "checkpoints").rename(source / "moved")  # as if it had no checkpoints yet
        TrainingRun(config).prepare()


def test_init_from_through_the_cli_records_the_source_in_metrics_and_card(source):
    config = source / "new.yaml"
    config.write_text(CONFIG.format(data=source / "other", run=source / "new"))
    step_file = RunDir(source / "source").step_checkpoints()[-1]
    run_mt("train", str(config), "--init-from", str(step_file), "--max-steps", "2")
    start = json.loads((source / "new" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["init_from"] == str(step_file)
    assert f"initialised from `{step_file}`" in (source / "new" / "README.md").read_text()
    resumed = run_mt("train", str(source / "new"), "--max-steps", "3")  # a resume ignores init_from
    assert "continuing from step00000002.pt" in resumed.stderr


def test_extra_text_is_learned_by_the_joint_tokenizer(tmp_path):
    data = write_reversal_corpus(tmp_path / "data", {"train": 100, "valid": 5})
    extra = tmp_path / "third_language.txt"
    extra.write_text("zebra quokka\n" * 50)
    path = tmp_path / "c.yaml"
    unknown = {}
    for name, overrides in (("without", []), ("with", [f"tokenizer.extra_text=[{extra}]"])):
        path.write_text(CONFIG.format(data=data, run=tmp_path / name))
        TrainingRun(load_config(path, [*overrides, "tokenizer.vocab_size=60"])).prepare()
        ids = load_tokenizer(tmp_path / name, joint=True).encode_src(["zebra quokka"])[0]
        unknown[name] = ids.count(UNK)
    assert unknown["without"] > 0 and unknown["with"] == 0  # its letters are in the vocabulary now
    with pytest.raises(ConfigError, match="extra_text needs a joint vocabulary"):
        load_config(path, [f"tokenizer.extra_text=[{extra}]", "tokenizer.joint=false"])
