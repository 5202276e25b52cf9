import contextlib
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mt.config import ModelConfig
from mt.model import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own datasets cache and a fixed seed."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    torch.manual_seed(0)
    random.seed(0)


def tiny_model(vocab: int = 40, norm: str = "pre", dropout: float = 0.0, tie: bool = True, position="sinusoidal"):
    config = ModelConfig(
        encoder_layers=2,
        decoder_layers=2,
        d_model=32,
        heads=4,
        ffn_dim=64,
        dropout=dropout,
        norm=norm,
        tie_embeddings=tie,
        max_positions=128,
        position=position,
    )
    return build_model(config, vocab, vocab, shared_vocab=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_mt(*args: str, stdin: str | None = None, cwd: Path | None = None, check: bool = True) -> Result:
    """Run the `mt` command line in this process (Typer's test runner)."""
    from typer.testing import CliRunner

    from mt.cli import app

    with _working_directory(cwd):
        outcome = CliRunner().invoke(app, list(args), input=stdin)
    if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
        raise outcome.exception  # not an MTError turned into exit code 2: a bug, show its traceback
    result = Result(outcome.exit_code, outcome.stdout, outcome.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"mt {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@contextlib.contextmanager
def _working_directory(path: Path | None):
    before = os.getcwd()
    os.chdir(path or before)
    try:
        yield
    finally:
        os.chdir(before)


def run_mt_process(*args: str, stdin: str | None = None, cwd: Path | None = None, check: bool = True):
    """Run the real `mt` command line in a subprocess (where the process itself is under test)."""
    result = subprocess.run(
        [sys.executable, "-m", "mt", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mt {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def write_reversal_corpus(directory: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """`{split}.src`/`.tgt` files of digit strings and their reversals (a task a tiny model learns fast)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        src = [" ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7))) for _ in range(n)]
        (directory / f"{split}.src").write_text("".join(f"{s}\n" for s in src))
        (directory / f"{split}.tgt").write_text("".join(f"{' '.join(reversed(s.split()))}\n" for s in src))
    return directory


def write_multiway(directory: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A multi-way corpus `{split}.{src,rev,cp}`: digit strings, their reversals and their copies
    (a multilingual model must read the target-language tag to know which)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        src = [" ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7))) for _ in range(n)]
        sides = {"src": src, "rev": [" ".join(reversed(s.split())) for s in src], "cp": src}
        for lang, lines in sides.items():
            (directory / f"{split}.{lang}").write_text("".join(f"{line}\n" for line in lines))
    return directory


TINY_CONFIG = """
data: {{dir: {data}, src: src, tgt: tgt}}
tokenizer: {{vocab_size: 24}}
model: {{encoder_layers: 2, decoder_layers: 2, d_model: 64, heads: 4, ffn_dim: 128, dropout: 0.0, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 800, lr: 0.004, warmup_steps: 60, label_smoothing: 0.0,
        max_steps: {steps}, valid_sentences: 60, log_every: 50}}
decode: {{beam: 3}}
"""


def _digits(rng, n):
    src = [" ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return src, [" ".join(reversed(s.split())) for s in src]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Import a reversal corpus and train on it with `mt train` (the tests that need a model that has
    really learned share this one: test_cli, test_serve_process)."""
    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    for split, n in (("train", 4000), ("valid", 60), ("test", 100)):
        src, tgt = _digits(rng, n)
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
        run_mt(
            "data",
            "import",
            "--src",
            str(root / f"{split}.src"),
            "--tgt",
            str(root / f"{split}.tgt"),
            "--out",
            str(root / "data"),
            "--split",
            split,
            "--pair",
            "src-tgt",
        )
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(data=root / "data", run=root / "run", steps=700))
    result = run_mt("train", str(config))
    assert "best valid BLEU" in result.stderr
    return root
