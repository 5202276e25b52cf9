from pathlib import Path

import pytest

from mt.config import config_to_dict, load_config, parse_duration, save_config
from mt.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  d_model: 64\n  heads: 4\ntrain:\n  max_epochs: 3\n")
    config = load_config(path, ["train.lr=5e-4", "model.norm=post", "train.max_time=90"])
    assert config.model.d_model == 64
    assert config.train.lr == 5e-4
    assert config.model.norm == "post"
    assert config.train.max_time == "90"
    assert config_to_dict(config)["train"]["max_epochs"] == 3


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model:\n  d_modle: 64\n", [], "model.d_modle: unknown key (did you mean model.d_model?)"),
        ("trian:\n  lr: 1\n", [], "trian: unknown key (did you mean train?)"),
        ("model:\n  heads: four\n", [], "model.heads: expected int, got 'four'"),
        ("model:\n  norm: middle\n", [], "model.norm: expected one of 'pre' | 'post', got 'middle'"),
        ("", ["train.precision=int8"], "train.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16', got"),
        ("", ["train.precision=fastest"], "train.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16', got"),
        (
            "",
            ["decode.precision=fast"],
            "decode.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16' | 'int8' | 'fastest'",
        ),
        ("model:\n  d_model: 30\n  heads: 4\n", [], "model.d_model must be divisible by model.heads"),
        ("", ["train.lr"], "--set train.lr: expected section.key=value"),
        ("", ["train.max_time=soon"], "cannot read duration 'soon'"),
        ("- a\n- b\n", [], "expected a mapping of sections"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(_write(tmp_path, text), overrides)
    assert message in str(error.value)
    # errors in the file's values name the file; errors in a --set value name that override
    assert str(error.value).startswith("--set" if overrides else str(tmp_path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_durations():
    assert parse_duration("20m") == 1200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("3600") == 3600


PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_name_their_reference_and_reload_as_saved(preset, tmp_path):
    config = load_config(preset)
    assert "reference" in preset.read_text().lower()
    save_config(config, tmp_path / "config.yaml")  # what a run directory keeps, and resumes from
    assert load_config(tmp_path / "config.yaml") == config


def test_presets_train_into_run_directories_of_their_own():
    run_dirs = [load_config(preset).train.run_dir for preset in PRESETS]
    assert len(set(run_dirs)) == len(run_dirs)
