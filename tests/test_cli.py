"""System tests through the real command line: a tiny model learns to reverse digit strings."""

import json
import random
import select
import subprocess
import sys

import pytest
from conftest import run_mt

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Import a reversal corpus and train on it with `mt train` (the module's tests share the model)."""
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


def test_tiny_model_learns_to_reverse_through_the_cli(trained):
    run = trained / "run"
    for name in ("config.yaml", "spm.model", "best.pt", "metrics.jsonl", "checkpoints/step00000700.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in r for r in records) and any("tgt_tokens_per_s" in r for r in records)
    result = run_mt("eval", str(run), "--src", str(trained / "test.src"), "--ref", str(trained / "test.tgt"), "--json")
    scores = json.loads(result.stdout)
    assert scores["bleu"] > 90, scores
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_translate_keeps_one_line_per_input_line(trained):
    result = run_mt("translate", str(trained / "run"), "--beam", "1", stdin="1 2 3 4\n\n   \n5 6 7\n")
    assert result.stdout.split("\n") == ["4 3 2 1", "", "", "7 6 5", ""]
    beam = run_mt("translate", str(trained / "run"), "--beam", "4", stdin="1 2 3 4\n5 6 7\n")
    assert beam.stdout == "4 3 2 1\n7 6 5\n"


def test_translate_answers_each_typed_line_before_input_ends(trained):
    process = subprocess.Popen(
        [sys.executable, "-m", "mt", "translate", str(trained / "run"), "--beam", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line, expected in (("1 2 3\n", "3 2 1\n"), ("4 5 6 7\n", "7 6 5 4\n")):
            process.stdin.write(line)
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], 60)
            assert ready, "no translation while stdin stays open"
            assert process.stdout.readline() == expected
    finally:
        process.stdin.close()
        process.wait(timeout=60)
    assert process.returncode == 0


def test_translate_nbest_format(trained):
    result = run_mt("translate", str(trained / "run"), "--beam", "4", "--nbest", "3", stdin="1 2 3\n8 9 0 1\n")
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "0", "1", "1", "1"]
    assert rows[0][2] == "3 2 1" and rows[3][2] == "1 0 9 8"
    scores = [float(r[1]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)


def test_eval_from_files(trained, tmp_path):
    hyp = tmp_path / "hyp.txt"
    run_mt(
        "eval",
        str(trained / "run"),
        "--src",
        str(trained / "test.src"),
        "--ref",
        str(trained / "test.tgt"),
        "--output",
        str(hyp),
        "--beam",
        "1",
    )
    result = run_mt("eval", "--hyp", str(hyp), "--ref", str(trained / "test.tgt"))
    assert result.stdout.startswith("BLEU = ")
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in result.stdout
    assert "chrF2 = " in result.stdout


def test_training_continues_from_last_checkpoint(trained, tmp_path):
    config = tmp_path / "more.yaml"
    text = (trained / "tiny.yaml").read_text().replace("max_steps: 700", "max_steps: 710")
    config.write_text(text)
    result = run_mt("train", str(config))
    assert "continuing from step00000700.pt (step 700" in result.stderr
    assert "finished after 710 steps" in result.stderr


def _error(*args, stdin=None, cwd=None):
    result = run_mt(*args, stdin=stdin, cwd=cwd, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mt: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_error_paths(tmp_path):
    assert "nope.yaml: config file not found" in _error("train", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers: 3\n")
    assert "model.layers: unknown key" in _error("train", str(bad))
    assert "train.lr: expected float, got 'fast'" in _error("train", str(_ok(tmp_path)), "--set", "train.lr=fast")
    assert "not a model directory" in _error("translate", str(tmp_path), stdin="hallo\n")
    (tmp_path / "h.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    assert "2 hypotheses but 1 references" in _error(
        "eval", "--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "r.txt")
    )
    assert "has 2 lines but" in _error(
        "data",
        "import",
        "--src",
        str(tmp_path / "h.txt"),
        "--tgt",
        str(tmp_path / "r.txt"),
        "--pair",
        "de-en",
        "--out",
        str(tmp_path / "c"),
    )
    assert "unknown corpus 'wmt99'" in _error("data", "fetch", "wmt99")
    assert "data/none/train.de: file not found" in _error("train", str(_ok(tmp_path)), cwd=tmp_path)
    corpus = tmp_path / "data" / "none"
    corpus.mkdir(parents=True)
    for name, text in (("train.de", "a\nb\n"), ("train.en", "a\n"), ("valid.de", "a\n"), ("valid.en", "a\n")):
        (corpus / name).write_text(text)
    assert "train.en ends at line 1 but" in _error("train", str(_ok(tmp_path)), cwd=tmp_path)
    (corpus / "train.de").write_text("\n \n")
    (corpus / "train.en").write_text("x\n\n")
    assert "train.de: no sentence pairs" in _error("train", str(_ok(tmp_path)), cwd=tmp_path)


def _ok(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(f"data: {{dir: data/none}}\ntrain: {{run_dir: {tmp_path / 'run'}, max_steps: 1}}\n")
    return config


def test_cached_and_uncached_decoding_agree_on_the_trained_model(trained):
    from mt.translate import Translator

    translator = Translator(trained / "run", device="cpu")
    lines = ["1", "5 4 3 2 1 0 9 8 7 6 5 4 3 2 1 0 9 8", "7 7 7", "0 1 2 3 4 5 6 7 8 9 0 1", "3 3"]
    sources = translator.tokenizer.encode_src(lines)
    for beam in (1, 5):
        cached = translator.translate_ids(sources, beam=beam, nbest=beam, use_cache=True)
        uncached = translator.translate_ids(sources, beam=beam, nbest=beam, use_cache=False)
        assert [[h.tokens for h in hyps] for hyps in cached] == [[h.tokens for h in hyps] for hyps in uncached]
