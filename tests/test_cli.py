"""System tests through the real command line: a tiny model learns to reverse digit strings."""

import json
import logging
import os
import pickle
import select
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_mt, run_mt_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mt.config import load_config
from mt.run_dir import load_weights, save_checkpoint
from mt.translate import Translator


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


def _corpus_dir(root, train_de, train_en):
    corpus = root / "data" / "none"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "train.de").write_bytes(train_de)
    (corpus / "train.en").write_bytes(train_en)
    (corpus / "valid.de").write_text("a\n")
    (corpus / "valid.en").write_text("a\n")
    return ["train", str(_ok(root))]


def _copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    return run


def _foreign_vocabulary(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    weights = load_weights(run / "best.pt")
    weights.vocab, weights.tokenizer = [30, 30], "another"
    save_checkpoint(run / "other.pt", weights)
    return ["translate", str(run), "--checkpoint", "other.pt"], "1 2\n"


def _truncated_checkpoint(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 3])
    return ["translate", str(run)], "1 2\n"


def _code_in_checkpoint(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "best.pt").write_bytes(pickle.dumps({"model": _Payload()}))
    return ["translate", str(run)], "1 2\n"


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _existing_output(trained, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.de").write_text("keep me\n")
    for name, text in (("h.txt", "a\n"), ("r.txt", "b\n")):
        (tmp_path / name).write_text(text)
    args = ["data", "import", "--src", str(tmp_path / "h.txt"), "--tgt", str(tmp_path / "r.txt"), "--pair", "de-en"]
    return [*args, "--out", str(tmp_path / "c")], None


# (case, set-up returning (arguments, stdin), expected message); run from tmp_path
ERROR_MATRIX = [
    ("missing config", lambda t, p: (["train", str(p / "nope.yaml")], None), "nope.yaml: config file not found"),
    (
        "unknown config key",
        lambda t, p: (["train", str(_write(p / "bad.yaml", "model:\n  layers: 3\n"))], None),
        "bad.yaml: model.layers: unknown key",
    ),
    (
        "mistyped config value",
        lambda t, p: (["train", str(_ok(p)), "--set", "train.lr=fast"], None),
        "train.lr: expected float, got 'fast'",
    ),
    ("missing corpus file", lambda t, p: (["train", str(_ok(p))], None), "data/none/train.de: file not found"),
    (
        "empty corpus",
        lambda t, p: (_corpus_dir(p, b"\n \n", b"x\n\n"), None),
        "data/none/train.de: no sentence pairs",
    ),
    (
        "line counts differ",
        lambda t, p: (_corpus_dir(p, b"a\nb\n", b"a\n"), None),
        "data/none/train.en ends at line 1 but data/none/train.de goes on",
    ),
    (
        "invalid UTF-8",
        lambda t, p: (_corpus_dir(p, b"gut\nb\xe4d\n", b"good\nbad\n"), None),
        "data/none/train.de:2: invalid UTF-8 at byte 1",
    ),
    (
        "run directory of another tokenizer",
        lambda t, p: (["train", str(t / "run"), "--set", "tokenizer.vocab_size=30"], None),
        "this run has tokenizer.vocab_size=24, the config asks for 30",
    ),
    ("checkpoint of another vocabulary", _foreign_vocabulary, "trained with vocabulary sizes [30, 30]"),
    ("truncated checkpoint", _truncated_checkpoint, "best.pt: corrupt or truncated checkpoint"),
    ("checkpoint with code", _code_in_checkpoint, "best.pt: refused to load: not a plain weights file"),
    ("translate without a model", lambda t, p: (["translate", str(p)], "hallo\n"), "not a model directory"),
    ("existing output", _existing_output, "exists (use --force to replace"),
    (
        "eval of unaligned files",
        lambda t, p: (["eval", "--hyp", str(_write(p / "h", "a\nb\n")), "--ref", str(_write(p / "r", "a\n"))], None),
        "2 hypotheses but 1 references",
    ),
    ("unknown corpus", lambda t, p: (["data", "fetch", "wmt99"], None), "unknown corpus 'wmt99'"),
    (
        "negative decoding workers",
        lambda t, p: (["translate", str(t / "run"), "--workers", "-1"], "hallo\n"),
        "decode.workers -1: must be >= 0",
    ),
    (
        "unknown decoding precision",
        lambda t, p: (["translate", str(t / "run"), "--precision", "fp8"], "hallo\n"),
        "precision 'fp8': choose one of auto, fp32, bf16, fp16",
    ),
]


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, setup, message", ERROR_MATRIX, ids=[row[0] for row in ERROR_MATRIX])
def test_bad_input_gives_one_line_error_and_exit_2(trained, tmp_path, case, setup, message):
    args, stdin = setup(trained, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    error = _error(*args, stdin=stdin, cwd=tmp_path)
    assert message in error, error
    assert {p: p.read_bytes() for p in before} == before, "an existing file was changed"


def test_debug_shows_the_traceback(tmp_path):
    result = run_mt_process("--debug", "train", str(tmp_path / "nope.yaml"), check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "config file not found" in result.stderr


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
        cached = translator.translate_ids(sources, translator.options(beam=beam, nbest=beam, use_cache=True))
        uncached = translator.translate_ids(sources, translator.options(beam=beam, nbest=beam, use_cache=False))
        assert [[h.tokens for h in hyps] for hyps in cached] == [[h.tokens for h in hyps] for hyps in uncached]


def test_a_precision_this_cpu_has_no_instructions_for_is_warned_once(trained, monkeypatch, caplog):
    import mt.device
    from mt.translate import Translator

    monkeypatch.setattr(mt.device, "cpu_multiplies_bf16", lambda: False)
    monkeypatch.setattr(mt.device, "cpu_multiplies_int8", lambda: True)
    translator = Translator(trained / "run", device="cpu")
    sources = translator.tokenizer.encode_src(["1 2 3"])
    with caplog.at_level(logging.WARNING):
        for precision in ("bf16", "int8", "bf16", "fp32"):
            translator.translate_ids(sources, translator.options(precision=precision))
    warned = [record.getMessage() for record in caplog.records if "precision" in record.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("precision bf16: this CPU has no bf16 matrix instructions")


def test_fastest_decodes_as_the_precision_it_stands_for_here(trained):
    from mt.device import fastest_precision
    from mt.translate import Translator

    translator = Translator(trained / "run", device="cpu", precision="fastest")  # `mt serve --precision fastest`
    sources = translator.tokenizer.encode_src(["1 2 3", "5 4 3 2 1 0 9 8"])
    fastest = translator.translate_ids(sources, translator.options(beam=5))
    resolved = translator.translate_ids(
        sources, translator.options(beam=5, precision=fastest_precision(translator.device))
    )
    assert [(h[0].tokens, h[0].score) for h in fastest] == [(h[0].tokens, h[0].score) for h in resolved]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_reduced_precision_finds_the_same_outputs_and_scores_them_as_search_does(trained, precision):
    from mt.translate import Translator

    translator = Translator(trained / "run", device="cpu")
    lines = ["1 2 3", "5 4 3 2 1 0 9 8", "7 7 7"]
    sources = translator.tokenizer.encode_src(lines)
    for beam in (1, 5):
        fp32, reduced = (
            translator.translate_ids(sources, translator.options(beam=beam, precision=p)) for p in ("fp32", precision)
        )
        assert [h[0].tokens for h in reduced] == [h[0].tokens for h in fp32]
        assert [h[0].score for h in reduced] != [h[0].score for h in fp32]  # other products, same confident choices
    outputs = translator.tokenizer.decode_tgt([h[0].tokens for h in reduced])
    scored = translator.score(lines, outputs, translator.options(precision=precision))
    assert [s.normalised for s in scored] == pytest.approx([h[0].score for h in reduced], abs=1e-4)


@pytest.fixture(scope="module")
def translator(trained):
    from mt.translate import Translator

    return Translator(trained / "run", device="cpu")


# any code point but newline (and lone surrogates, which UTF-8 cannot encode): control characters, \r,
# \u2028, mixed scripts
_ANY_LINE_TEXT = st.text(st.characters(exclude_characters="\n", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.one_of(
            _ANY_LINE_TEXT.map(lambda text: text.encode("utf-8")),
            st.binary(max_size=30).map(lambda raw: raw.replace(b"\n", b"")),  # not necessarily UTF-8
            st.just(b"1 2 3 " * 400),  # longer than the model's positions: truncated
        ),
        max_size=8,
    ),
    final_newline=st.booleans(),
)
def test_translate_gives_exactly_one_line_per_input_line(translator, lines, final_newline):
    """The contract of `mt translate` (the CLI writes each translation plus one newline)."""
    from mt.translate import read_chunks

    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    read, write = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write, data), os.close(write)))
    writer.start()
    outputs = [t[0].text for t in translator.translate_chunks(read_chunks(read, max_lines=3, block=7))]
    writer.join()
    os.close(read)
    expected = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert len(outputs) == expected
    assert "".join(text + "\n" for text in outputs).count("\n") == expected
    assert all(text.strip() == "" for text, line in zip(outputs, data.split(b"\n")) if not line.strip())


def test_translate_survives_hostile_stdin_through_the_cli(trained):
    lines = [
        b"1 2 3",
        b"",
        b"   \t ",
        b"\x00\x07\x1b[31m 4 5",
        b"\xff\xfe 6 7",
        "ünïcödé 中文 עברית 8".encode(),
        b"9 " * 2000,
    ]
    result = subprocess.run(
        [sys.executable, "-m", "mt", "translate", str(trained / "run"), "--beam", "2"],
        input=b"\r\n".join(lines) + b"\r\n",
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8").split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == "" and out[0] == "3 2 1" and out[1] == out[2] == ""
    assert b"truncated" in result.stderr


def test_training_writes_a_model_card(trained):
    card = (trained / "run" / "README.md").read_text()
    for expected in ("## Data", "| train | 4000 |", "parameters", "hardware:", "## Scores", "| test (100 sentences)"):
        assert expected in card, expected
    assert "BLEU signature: `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in card
    assert "mt translate" in card and "```yaml" in card


def test_plot_and_attention_write_pngs(trained, tmp_path):
    run_mt("--quiet", "plot", str(trained / "run"), "-o", str(tmp_path / "curves.png"))
    result = run_mt("attention", str(trained / "run"), "3 1 4 1 5", "--all-heads", "-o", str(tmp_path / "heads.png"))
    assert result.stdout.strip() == "5 1 4 1 3"
    for name in ("curves.png", "heads.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--layer 5: the decoder has 2 layers" in _error("attention", str(trained / "run"), "1 2", "--layer", "5")


def test_ctranslate2_float32_greedy_equals_ours_token_for_token(trained, tmp_path):
    source = (trained / "test.src").read_text()
    run_mt("export", str(trained / "run"), "--quantization", "float32", "-o", str(tmp_path / "f32"))
    run_mt("export", str(trained / "run"), "--quantization", "int8", "-o", str(tmp_path / "int8"))
    ours = run_mt("translate", str(trained / "run"), "--beam", "1", stdin=source).stdout
    theirs = run_mt("translate", str(tmp_path / "f32"), "--beam", "1", stdin=source).stdout
    assert theirs == ours and ours.count("\n") == 100
    int8 = run_mt("translate", str(tmp_path / "int8"), "--beam", "3", stdin=source).stdout
    assert int8.count("\n") == 100
    assert "exists; use --force" in _error("export", str(trained / "run"), "-o", str(tmp_path / "f32"))
    # both engines behind the one decoding path: same hypotheses, scores and log-probabilities
    engines = [Translator(path, device="cpu") for path in (trained / "run", tmp_path / "f32")]
    sources = engines[0].tokenizer.encode_src(source.splitlines()[:20])
    for penalty, workers in ((0.0, 1), (1.0, 1), (1.0, 2)):  # CTranslate2's inter_threads: same outputs
        options = engines[0].options(beam=1, length_penalty=penalty, workers=workers)
        ours, theirs = (engine.translate_ids(sources, options) for engine in engines)
        for a, b in zip(ours, theirs):
            assert a[0].tokens == b[0].tokens
            assert a[0].score == pytest.approx(b[0].score, abs=1e-3)
            assert a[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-3)


def test_ctranslate2_export_of_a_rotary_model_decodes_like_ours(trained, tmp_path):
    # the trained weights read as a rotary model: other outputs, but both engines must agree on them
    run = tmp_path / "rope"
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("position: sinusoidal", "position: rope"))
    source = (trained / "test.src").read_text()
    run_mt("export", str(run), "--quantization", "float32", "-o", str(tmp_path / "f32"))
    ours = run_mt("translate", str(run), "--beam", "1", stdin=source).stdout
    sinusoidal = run_mt("translate", str(trained / "run"), "--beam", "1", stdin=source).stdout
    assert ours != sinusoidal  # the positions really changed
    assert run_mt("translate", str(tmp_path / "f32"), "--beam", "1", stdin=source).stdout == ours


def test_eval_reports_ter_and_compares_systems_by_paired_bootstrap(trained, tmp_path):
    refs = (trained / "test.tgt").read_text().splitlines()
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("".join(f"{r}\n" for r in refs))
    bad.write_text("".join(f"{' '.join(r.split()[:2])}\n" for r in refs))
    plain = run_mt("eval", "--hyp", str(bad), "--ref", str(trained / "test.tgt")).stdout
    assert "TER = " in plain and "tok:tercom" in plain
    args = ["eval", "--hyp", str(good), "--hyp", str(bad), "--ref", str(trained / "test.tgt"), "--paired-bs"]
    result = run_mt(*args, "--samples", "200", "--json")
    baseline, other = json.loads(result.stdout)
    assert baseline["baseline"] and baseline["bleu"]["score"] == pytest.approx(100.0)
    assert other["bleu"]["p_value"] < 0.05 and other["bleu"]["mean"] < 50 and other["ter"]["ci95"] > 0
    text = run_mt(*args, "--samples", "100").stdout
    assert "(baseline)" in text and "p = " in text and "bs:100|seed:12345" in text


def test_quiet_version_and_help_examples(trained):
    result = run_mt("--quiet", "card", str(trained / "run"), "--no-test")
    assert result.stderr == "" and (trained / "run" / "README.md").is_file()
    assert run_mt("--version").stdout.startswith("mt ")
    for command in (
        "data fetch",
        "data import",
        "train",
        "translate",
        "eval",
        "average",
        "export",
        "plot",
        "attention",
        "card",
    ):
        assert "Example" in run_mt(*command.split(), "--help").stdout, command
    # rich markup must not swallow the names of the optional extras
    assert "mt[ct2]" in run_mt("export", "--help").stdout
    assert "mt[plot]" in run_mt("plot", "--help").stdout


def test_tune_chooses_decoding_defaults_on_validation_and_translate_uses_them(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    run_mt("average", str(run), "--last", "2", "-o", str(run / "averaged.pt"))
    args = ["tune", str(run), "--checkpoint", "best.pt", "--checkpoint", "averaged.pt", "--beam", "1", "--beam", "2"]
    result = run_mt(*args, "--length-penalty", "1.0", "--max-sentences", "30")
    rows = [line for line in result.stdout.splitlines() if line.startswith(("best.pt", "averaged.pt"))]
    assert len(rows) == 4 and sum("<- chosen" in row for row in rows) == 1
    chosen = next(row for row in rows if "<- chosen" in row).split()
    config = load_config(run / "config.yaml")
    assert (config.decode.checkpoint, config.decode.beam) == (chosen[0], int(chosen[1]))
    assert Translator(run, device="cpu").checkpoint == chosen[0]
