"""scripts/gpu_check.sh runs end to end: on the CPU here (--device cpu), with a tiny model."""

import gzip
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_reversal_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import kernel_of  # noqa: E402

TINY = {
    "tokenizer.vocab_size": 24,
    "model.encoder_layers": 1,
    "model.decoder_layers": 1,
    "model.d_model": 32,
    "model.heads": 2,
    "model.ffn_dim": 64,
    "model.max_positions": 64,
    "train.max_tokens": 400,
    "train.warmup_steps": 2,
    "train.valid_sentences": 10,
}


def _multi30k_mirror(directory: Path) -> Path:
    """Digit reversals under Multi30k's file names ({train,val,test_2016_flickr}.{de,en}.gz)."""
    corpus = write_reversal_corpus(directory / "plain", {"train": 300, "val": 20, "test_2016_flickr": 20})
    for stem in ("train", "val", "test_2016_flickr"):
        for side, lang in (("src", "de"), ("tgt", "en")):
            with gzip.open(directory / f"{stem}.{lang}.gz", "wt") as handle:
                handle.write((corpus / f"{stem}.{side}").read_text())
    return directory


def test_a_dry_run_on_the_cpu_prints_the_whole_table(tmp_path):
    out = tmp_path / "out"
    command = ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--multi30k", str(_multi30k_mirror(tmp_path))]
    command += [
        "--presets",
        "multi30k",
        "--precisions",
        "fp32",
        "--steps",
        "2",
        "--train-steps",
        "4",
        "--out",
        str(out),
    ]
    command += [part for key, value in TINY.items() for part in ("--set", f"{key}={value}")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert (out / "gpu_check.txt").read_text() == table
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in table.splitlines())
    assert rows["Multi30k preset data"].startswith("Multi30k (")
    assert "backend gloo; 4 updates" in rows["torchrun, 1 process, Multi30k preset"]
    assert "tgt tok/s" in rows["train multi30k fp32"] and "MFU" in rows["train multi30k fp32"]
    attention = [row for row in rows if row.startswith("SDPA ")]
    assert len(attention) == 4 and all(rows[row].strip() != "none seen" for row in attention)
    assert "sent/s" in rows["decode beam5 cached"] and "(test, 4 updates)" in rows["decode greedy cached"]


def test_the_kernel_is_read_from_the_profiled_operator_names():
    assert kernel_of({"aten::_scaled_dot_product_flash_attention", "aten::_flash_attention_forward"}) == "flash"
    assert kernel_of({"aten::_scaled_dot_product_efficient_attention"}) == "memory-efficient"
    assert kernel_of({"aten::_scaled_dot_product_cudnn_attention"}) == "cuDNN"
    assert kernel_of({"aten::_scaled_dot_product_attention_math", "aten::bmm"}) == "math"
    assert kernel_of({"aten::_scaled_dot_product_flash_attention_for_cpu"}) == "flash (CPU)"
    assert kernel_of({"aten::linear"}) == "none seen"
