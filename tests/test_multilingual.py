"""Several directions in one model: language tags, balanced tokenizer, direction sampling, per-direction
validation, --tgt-lang and pivoting, serving and export; a single pair stays exactly as it was."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mt, write_multiway

from mt.batching import direction_shares, sample_directions
from mt.config import TokenizerConfig, load_config
from mt.corpus_cache import EncodedCorpus
from mt.data import fetch_multi30k
from mt.errors import ConfigError, MTError
from mt.tokenizer import Tokenizer, balanced_sentences, prepare_multilingual_tokenizer
from mt.translate import Translator

# one source language, two targets: its digits reversed (rev) or copied (cp); only the tag tells which
CONFIG = """
data: {{dir: {data}, directions: [src-rev, src-cp]}}
tokenizer: {{vocab_size: 24}}
model: {{encoder_layers: 2, decoder_layers: 2, d_model: 64, heads: 4, ffn_dim: 128, dropout: 0.0, max_positions: 64}}
train: {{run_dir: {run}, max_tokens: 800, lr: 0.004, warmup_steps: 60, label_smoothing: 0.0,
        max_steps: {steps}, valid_sentences: 40, valid_every: 250, log_every: 50}}
decode: {{beam: 2}}
"""


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilingual")
    data = write_multiway(root / "data", {"train": 3000, "valid": 40, "test": 60})
    config = root / "multi.yaml"
    config.write_text(CONFIG.format(data=data, run=root / "run", steps=500))
    result = run_mt("train", str(config))
    assert "best valid BLEU" in result.stderr
    return root


def test_a_tiny_multilingual_model_learns_both_directions_and_obeys_the_tag(multilingual):
    run, data = multilingual / "run", multilingual / "data"
    sources = (data / "test.src").read_text().splitlines()[:30]
    stdin = "".join(f"{line}\n" for line in sources)
    for lang in ("rev", "cp"):
        out = run_mt("translate", str(run), "--tgt-lang", lang, "--beam", "1", stdin=stdin).stdout.splitlines()
        wanted = (data / f"test.{lang}").read_text().splitlines()[:30]
        assert sum(o == w for o, w in zip(out, wanted)) >= 27, (lang, out[:5], wanted[:5])
    # per-direction validation in the metrics, the mean as valid_bleu; per-direction test scores on the card
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_bleu" in r][-1]
    assert {"valid_bleu_src-rev", "valid_bleu_src-cp"} <= set(valid)
    assert valid["valid_bleu"] == pytest.approx((valid["valid_bleu_src-rev"] + valid["valid_bleu_src-cp"]) / 2)
    test = [r for r in records if "test_bleu" in r][-1]
    assert test["test_bleu_src-rev"] > 80 and test["test_bleu_src-cp"] > 80
    card = (run / "README.md").read_text()
    assert "test src-rev" in card and "test src-cp" in card and "`<2rev>`" in card
    assert "--tgt-lang rev" in card


def test_the_tag_is_one_reserved_piece_first_in_every_cached_source(multilingual):
    run = multilingual / "run"
    tokenizer = Tokenizer(run / "spm.model", run / "spm.model")
    tags = tokenizer.language_tags
    assert set(tags) == {"rev", "cp"} and sorted(tags.values()) == [4, 5]
    for tag, index in tags.items():
        assert tokenizer.src.encode(f"<2{tag}>") in ([index], [tokenizer.src.piece_to_id("▁"), index])
        assert tokenizer.src.encode(f"1<2{tag}>2", out_type=str).count(f"<2{tag}>") == 1  # never split
    corpus = EncodedCorpus(run / "cache", "train")
    assert [name for name, _ in corpus.parts] == ["src-rev", "src-cp"]
    for name, pairs in corpus.parts:
        firsts = {corpus.src_sentence(i)[0] for i in pairs}
        assert firsts == {tags[name.split("-")[1]]}


def test_target_language_errors_and_zero_shot_warning(multilingual, caplog):
    run = str(multilingual / "run")
    missing = run_mt("translate", run, stdin="1 2 3\n", check=False)
    assert missing.returncode == 2 and "translates into rev, cp: choose one with --tgt-lang" in missing.stderr
    unknown = run_mt("translate", run, "--tgt-lang", "fr", stdin="1 2 3\n", check=False)
    assert unknown.returncode == 2 and "--tgt-lang fr" in unknown.stderr and "rev, cp only" in unknown.stderr
    zero_shot = run_mt("translate", run, "--src-lang", "cp", "--tgt-lang", "rev", stdin="1 2 3\n")
    assert "not trained on cp-rev" in zero_shot.stderr and zero_shot.stdout.strip()


def test_pivot_through_a_language_of_the_same_model_and_of_another(multilingual, tmp_path):
    run = str(multilingual / "run")
    lines = (multilingual / "data" / "test.src").read_text().splitlines()[:20]
    stdin = "".join(f"{line}\n" for line in lines)
    direct = run_mt("translate", run, "--tgt-lang", "rev", stdin=stdin).stdout.splitlines()
    # src -> cp (a copy) -> rev: the second pass reads the copy as a source, so it reverses it
    pivoted = run_mt(
        "translate", run, "--src-lang", "src", "--tgt-lang", "rev", "--pivot", "cp", stdin=stdin
    ).stdout.splitlines()
    assert sum(p == d for p, d in zip(pivoted, direct)) >= 18
    into_cp = run_mt("translate", run, "--tgt-lang", "cp", stdin=stdin).stdout
    two_models = run_mt("translate", run, "--tgt-lang", "cp", "--pivot", "rev", "--pivot-model", run, stdin=stdin)
    assert len(two_models.stdout.splitlines()) == 20 and into_cp.strip()
    bad = run_mt("translate", run, "--tgt-lang", "rev", "--pivot", "xx", stdin=stdin, check=False)
    assert bad.returncode == 2 and "--tgt-lang xx" in bad.stderr
    scored = run_mt(
        "eval",
        run,
        "--tgt-lang",
        "rev",
        "--pivot",
        "cp",
        "--src",
        str(multilingual / "data" / "test.src"),
        "--ref",
        str(multilingual / "data" / "test.rev"),
        "--json",
    )
    assert json.loads(scored.stdout)["bleu"] > 80


def test_tune_takes_a_direction_or_the_mean(multilingual):
    run = str(multilingual / "run")
    one = run_mt("tune", run, "--direction", "src-rev", "--beam", "1", "--length-penalty", "1.0", "--dry-run")
    both = run_mt("tune", run, "--beam", "1", "--length-penalty", "1.0", "--dry-run")
    assert "<- chosen" in one.stdout and "<- chosen" in both.stdout
    bad = run_mt("tune", run, "--direction", "rev-src", "--dry-run", check=False)
    assert bad.returncode == 2 and "trained on src-rev, src-cp" in bad.stderr


def test_serve_lists_every_direction_and_translates_into_the_requested_one(multilingual):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from mt.server import create_app

    translator = Translator(multilingual / "run", device="cpu")
    with TestClient(create_app([translator])) as client:
        assert client.get("/languages").json() == [{"code": "src", "name": "src", "targets": ["rev", "cp"]}]
        answers = {}
        for target in ("rev", "cp"):
            body = {"q": "4 1 7 2 9", "source": "src", "target": target}
            answers[target] = client.post("/translate", json=body).json()["translatedText"]
            # the server's route for the target is the library's translation into it
            best = next(translator.translate(["4 1 7 2 9"], translator.options(tgt_lang=target)))[0]
            assert answers[target] == best.text
        assert answers == {"rev": "9 2 7 1 4", "cp": "4 1 7 2 9"}
        assert client.post("/translate", json={"q": "1", "source": "cp", "target": "rev"}).status_code == 400


def test_a_ctranslate2_export_of_a_multilingual_model_translates_as_it_does(multilingual, tmp_path):
    pytest.importorskip("ctranslate2")
    run, out = str(multilingual / "run"), tmp_path / "exported"
    run_mt("export", run, "--quantization", "float32", "-o", str(out))
    stdin = "1 2 3\n4 5 6 7\n"
    for lang in ("rev", "cp"):
        mine = run_mt("translate", run, "--tgt-lang", lang, "--beam", "1", stdin=stdin).stdout
        theirs = run_mt("translate", str(out), "--tgt-lang", lang, "--beam", "1", stdin=stdin).stdout
        assert mine == theirs


def test_a_resumed_multilingual_run_draws_the_same_batches(multilingual, tmp_path):
    config = load_config(multilingual / "multi.yaml")
    from mt.train import TrainingRun

    run = TrainingRun(config)
    run.prepare()
    assert [len(b) for b in run.epoch_batches(2)] == [len(b) for b in run.epoch_batches(2)]
    drawn = np.concatenate(run.epoch_batches(1))
    assert sorted(drawn.tolist()) == list(range(len(run.corpus)))  # equal directions: every pair once


def test_direction_sampling_follows_the_temperature():
    ranges = [range(0, 1000), range(1000, 1100)]
    assert sample_directions(ranges, 1.0, seed=1) is None  # natural proportions: every pair once
    shares = direction_shares([1000, 100], 5.0)
    assert sum(shares) == 1100 and shares[1] > 100 * 3  # the small direction gets far more turns
    drawn = sample_directions(ranges, 5.0, seed=1)
    small = drawn[drawn >= 1000]
    assert len(small) == shares[1] and set(small.tolist()) == set(range(1000, 1100))  # all of it, repeated
    assert len(drawn[drawn < 1000]) == shares[0] and len(set(drawn[drawn < 1000].tolist())) == shares[0]
    assert np.array_equal(drawn, sample_directions(ranges, 5.0, seed=1))
    assert not np.array_equal(drawn, sample_directions(ranges, 5.0, seed=2))
    assert direction_shares([30, 30, 30], 5.0) == [30, 30, 30]


def test_the_joint_tokenizer_learns_from_every_language_in_equal_shares(tmp_path):
    (tmp_path / "big.aa").write_text("".join(f"alpha {i}\n" for i in range(300)))
    (tmp_path / "small.bb").write_text("beta\ngamma\n\n")
    files = {"aa": [tmp_path / "big.aa"], "bb": [tmp_path / "small.bb"]}
    lines = list(balanced_sentences(files, total=200))
    assert sum(line.startswith("alpha") for line in lines) == 100
    assert lines.count("beta") == 50 and lines.count("gamma") == 50
    assert len(list(balanced_sentences(files, total=10_000))) == 600  # no more than the largest language has
    run = tmp_path / "run"
    tokenizer = prepare_multilingual_tokenizer(run, TokenizerConfig(vocab_size=40), files, ["bb", "aa"])
    assert tokenizer.language_tags == {"bb": 4, "aa": 5}
    with pytest.raises(Exception, match="no language tag for cc"):
        prepare_multilingual_tokenizer(run, TokenizerConfig(vocab_size=40), files, ["aa", "cc"])


def test_config_checks_directions(tmp_path):
    def load(directions, *more):
        return load_config(None, [f"data.directions={directions}", *more])

    assert load("[de-en, fr-en:data/fr]").data.directions == ["de-en", "fr-en:data/fr"]
    with pytest.raises(ConfigError, match="'deen' is not a direction"):
        load("[deen]")
    with pytest.raises(ConfigError, match="de-en listed twice"):
        load("[de-en, de-en]")
    with pytest.raises(ConfigError, match="needs a joint vocabulary"):
        load("[de-en]", "tokenizer.joint=false")
    with pytest.raises(ConfigError, match="direction_temperature must be positive"):
        load("[de-en]", "train.direction_temperature=0")


def test_a_single_pair_has_no_tag_and_its_old_cache_key(tmp_path):
    # a model of one pair: no reserved piece, nothing before the source, --tgt-lang only its own target
    translator = Translator(Path(__file__).parent / "fixtures" / "run_0.1.0" / "run", device="cpu")
    assert translator.tokenizer.language_tags == {} and translator.source_prefix(None) == []
    assert translator.source_prefix("tgt") == []
    with pytest.raises(MTError, match="translates into tgt only"):
        translator.source_prefix("fr")


def test_fetch_multi30k_writes_a_multiway_directory(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem, n in (("train", 4), ("val", 2), ("test_2016_flickr", 2)):
        for lang in ("en", "de", "fr"):
            with gzip.open(mirror / f"{stem}.{lang}.gz", "wt") as handle:
                handle.writelines(f"{lang} {stem} {i}\n" for i in range(n))
    out = tmp_path / "multi"
    reports = fetch_multi30k(None, out, str(mirror), langs="en,de,fr")
    assert reports["train"].pairs == 4
    assert (out / "valid.fr").read_text().splitlines() == ["fr val 0", "fr val 1"]
    assert json.loads((out / "manifest.json").read_text())["langs"] == ["en", "de", "fr"]
    cli = run_mt(
        "data", "fetch", "multi30k", "--pair", "de-en", "--langs", "en,de", "--source", str(mirror), check=False
    )
    assert cli.returncode == 2 and "--pair or --langs" in cli.stderr
