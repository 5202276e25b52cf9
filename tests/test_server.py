"""`mt serve`: the API in-process (FastAPI's test client), the batching worker, every error case."""

import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from conftest import run_mt

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from mt.errors import MTError  # noqa: E402
from mt.server import create_app  # noqa: E402
from mt.serving import BatchingWorker, Job, Metrics, ServeLimits  # noqa: E402
from mt.translate import Translation, Translator  # noqa: E402

RUN = Path(__file__).parent / "fixtures" / "run_0.1.0" / "run"  # a tiny digit-reversal model; pair src-tgt
LINES = ["7 8 6", "0 7 2 7 3", "3 7 0", "1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def translator():
    return Translator(RUN, device="cpu")


@pytest.fixture
def client(translator):
    with TestClient(create_app([translator], ServeLimits(max_segments=8, max_chars=100, max_body_bytes=4096))) as c:
        yield c


def expected(translator, lines, **options):
    return [found[0].text for found in translator.translate(lines, translator.options(**options))]


def test_libretranslate_json_and_form_bodies_give_what_mt_translate_gives(client, translator):
    want = expected(translator, LINES)
    assert client.post("/translate", json={"q": LINES[0], "source": "src", "target": "tgt"}).json() == {
        "translatedText": want[0]
    }
    answer = client.post("/translate", json={"q": LINES, "source": "src", "target": "tgt", "format": "text"})
    assert answer.json()["translatedText"] == want
    form = urlencode([("q", LINES[0]), ("q", LINES[1]), ("source", "src"), ("target", "tgt")])
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/translate", content=form, headers=urlencoded).json()["translatedText"] == want[:2]
    multipart = client.post(
        "/translate", files={"q": (None, LINES[2]), "source": (None, "src"), "target": (None, "tgt")}
    )
    assert multipart.json()["translatedText"] == want[2]
    auto = client.post("/translate", json={"q": LINES[0], "source": "auto", "target": "tgt"})
    assert auto.json()["translatedText"] == want[0]


def test_libretranslate_alternatives_and_languages(client, translator):
    answer = client.post("/translate", json={"q": LINES[1], "source": "src", "target": "tgt", "alternatives": 2}).json()
    nbest = next(translator.translate([LINES[1]], translator.options(nbest=3, beam=max(3, translator.options().beam))))
    assert answer == {"translatedText": nbest[0].text, "alternatives": [nbest[1].text, nbest[2].text]}
    assert client.get("/languages").json() == [{"code": "src", "name": "src", "targets": ["tgt"]}]
    assert client.get("/health").json() == {"status": "ok", "models": ["src-tgt"]}


def test_native_endpoint_nbest_scores_attention_and_alignment(client, translator):
    body = {"segments": LINES + [""], "source": "src", "target": "tgt", "beam": 3, "nbest": 2, "length_penalty": 1.0}
    results = client.post("/v1/translate", json=body).json()["results"]
    options = translator.options(beam=3, nbest=2, length_penalty=1.0)
    for result, found in zip(results, translator.translate(LINES + [""], options)):
        assert [h["translation"] for h in result["nbest"]] == [t.text for t in found]
        assert [h["score"] for h in result["nbest"]] == pytest.approx([t.score for t in found])
    assert results[-1]["translation"] == ""  # an empty segment, an empty translation

    one = {"segments": [LINES[1]], "source": "src", "target": "tgt", "attention": True, "alignment": True}
    result = client.post("/v1/translate", json=one).json()["results"][0]
    weights, src_pieces, tgt_pieces, text = translator.attention(LINES[1], translator.options())
    assert result["translation"] == text and result["source_pieces"] == src_pieces
    assert result["target_pieces"] == tgt_pieces
    layers, heads, rows, columns = weights.shape
    assert len(result["attention"]) == layers and len(result["attention"][0]) == heads
    assert len(result["attention"][-1][0]) == rows == len(tgt_pieces) and len(result["attention"][0][0][0]) == columns
    assert result["attention"][-1][0][0] == pytest.approx(weights[-1, 0, 0].tolist(), abs=1e-4)
    assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in result["attention"][0][0])
    assert [t for t, _ in result["alignment"]] == list(range(rows)) and all(
        0 <= s < columns for _, s in result["alignment"]
    )


@pytest.mark.parametrize(
    "request_args, status, message",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": ["a list"]}, 400, "must be a JSON object"),
        ({"json": {"source": "src", "target": "tgt"}}, 400, "q: expected a string or a list of strings"),
        ({"json": {"q": 5, "source": "src", "target": "tgt"}}, 400, "q: expected a string"),
        ({"json": {"q": [], "source": "src", "target": "tgt"}}, 400, "q: empty list"),
        ({"json": {"q": "1", "source": "de", "target": "en"}}, 400, "no model for de-en; this server has src-tgt"),
        ({"json": {"q": "1", "target": "tgt"}}, 400, "source and target: expected language codes"),
        ({"json": {"q": ["1"] * 9, "source": "src", "target": "tgt"}}, 413, "9 segments, at most 8"),
        ({"json": {"q": "1 " * 60, "source": "src", "target": "tgt"}}, 413, "120 characters, at most 100"),
        ({"json": {"q": "1", "source": "src", "target": "tgt", "format": "html"}}, 400, "only text"),
        ({"json": {"q": "1", "source": "src", "target": "tgt", "alternatives": "x"}}, 400, "alternatives: expected"),
        (
            {"content": b"q=%ff&source=src", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            400,
            "UTF-8",
        ),
        (
            {"content": b"{bad", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            400,
            "not key=value pairs",
        ),
        ({"content": b"x" * 5000, "headers": {"content-type": "application/json"}}, 413, "larger than 4096 bytes"),
    ],
)
def test_bad_libretranslate_requests_get_a_4xx_naming_the_problem(client, request_args, status, message):
    answer = client.post("/translate", **request_args)
    assert answer.status_code == status and message in answer.json()["error"], answer.text
    assert client.post("/translate", json={"q": "1 2", "source": "src", "target": "tgt"}).status_code == 200


@pytest.mark.parametrize(
    "body, message",
    [
        ({"segments": "1 2"}, "segments: expected a list of strings"),
        ({"segments": ["1"], "beam": 0}, "beam: expected a whole number from 1 to 16"),
        ({"segments": ["1"], "beam": 99}, "beam: expected a whole number from 1 to 16"),
        ({"segments": ["1"], "beam": 2, "nbest": 3}, "nbest: expected a whole number from 1 to 2"),
        ({"segments": ["1"], "beam": 15}, "larger than the model's"),  # the tiny vocabulary has 14 choices
        ({"segments": ["1"], "length_penalty": "big"}, "length_penalty: expected a number"),
        ({"segments": ["1"], "attention": "yes"}, "attention: expected true or false"),
        ({"segments": ["1", "2"], "attention": True}, "one segment per request"),
        ({"segments": ["1"], "file": "/etc/passwd"}, "file: unknown field"),
    ],
)
def test_bad_native_requests_get_a_400_naming_the_field(client, body, message):
    answer = client.post("/v1/translate", json={"source": "src", "target": "tgt", **body})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/translate").status_code == 405 and "error" in client.get("/translate").json()


def test_an_api_key_is_required_when_set_and_cors_is_off_unless_asked(translator):
    with TestClient(create_app([translator], api_key="s3cret")) as client:
        body = {"q": "1 2", "source": "src", "target": "tgt"}
        assert client.post("/translate", json=body).status_code == 403
        assert client.post("/translate", json={**body, "api_key": "wrong"}).status_code == 403
        assert client.post("/translate", json={**body, "api_key": "s3cret"}).status_code == 200
        assert client.post("/translate", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        native = {"segments": ["1"], "source": "src", "target": "tgt"}
        assert client.post("/v1/translate", json=native, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        origin = {"Origin": "https://example.org"}
        assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers
    with TestClient(create_app([translator], cors_origin="https://example.org")) as client:
        headers = client.get("/health", headers={"Origin": "https://example.org"}).headers
        assert headers["access-control-allow-origin"] == "https://example.org"


def test_metrics_page_and_web_page(client):
    client.post("/translate", json={"q": ["1 2", "3"], "source": "src", "target": "tgt"})
    client.post("/translate", json={"q": 1, "source": "src", "target": "tgt"})
    text = client.get("/metrics").text
    assert 'mt_requests_total{endpoint="/translate",status="200"} 1' in text
    assert 'mt_requests_total{endpoint="/translate",status="400"} 1' in text
    assert 'mt_segments_total{model="src-tgt"} 2' in text and "mt_batch_segments_bucket" in text
    assert "mt_request_seconds_count 1" in text
    page = client.get("/").text
    assert "<canvas" in page and "v1/translate" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no external asset: works offline
    assert "/v1/translate" in client.get("/openapi.json").text


class _Recording:
    """A stand-in translator that records the chunks it is given (upper-cases each segment)."""

    def __init__(self) -> None:
        self.chunks: list[list[str]] = []

    def translate_chunks(self, chunks, options):
        for chunk in chunks:
            self.chunks.append(chunk)
            if "boom" in chunk:
                raise RuntimeError("decoder failure")
            yield from ([Translation(s.upper(), 0.0)] for s in chunk)


def test_concurrent_requests_are_decoded_together_and_each_gets_its_own_results(translator):
    fake = _Recording()
    worker = BatchingWorker("x-y", fake, ServeLimits(max_wait_ms=200), Metrics())
    options = translator.options()
    jobs = [Job([f"a{i}", f"b{i}"], options) for i in range(10)]
    for job in jobs:
        worker.submit(job)
    results = [job.future.result(timeout=10) for job in jobs]
    assert [[t[0].text for t in r] for r in results] == [[f"A{i}", f"B{i}"] for i in range(10)]
    assert len(fake.chunks) == 1 and len(fake.chunks[0]) == 20  # one decode for all ten requests

    other = replace(options, beam=1)  # different options: a batch of their own
    mixed = [Job(["p"], options), Job(["q"], other)]
    for job in mixed:
        worker.submit(job)
    assert [job.future.result(timeout=10)[0][0].text for job in mixed] == ["P", "Q"]

    failing, fine = Job(["boom"], other), Job(["ok"], options)
    worker.submit(failing)
    worker.submit(fine)
    with pytest.raises(RuntimeError, match="decoder failure"):
        failing.future.result(timeout=10)
    assert fine.future.result(timeout=10)[0][0].text == "OK"  # the worker lives on
    worker.stop()
    assert not worker.thread.is_alive()


def test_an_idle_server_does_not_hold_a_single_request_back(translator):
    fake = _Recording()
    worker = BatchingWorker("x-y", fake, ServeLimits(max_wait_ms=5), Metrics())
    started = time.monotonic()
    assert worker.submit(Job(["a"], translator.options())).result(timeout=10)[0][0].text == "A"
    assert time.monotonic() - started < 1.0
    worker.stop()


def test_concurrent_clients_get_their_own_results_in_order(client, translator):
    want = dict(zip(LINES, expected(translator, LINES)))
    barrier = threading.Barrier(8)

    def one_client(index: int) -> list[str]:
        lines = [LINES[(index + k) % len(LINES)] for k in range(3)]
        barrier.wait()
        answer = client.post("/translate", json={"q": lines, "source": "src", "target": "tgt"}).json()
        assert answer["translatedText"] == [want[line] for line in lines]
        return answer["translatedText"]

    with ThreadPoolExecutor(8) as pool:
        assert len(list(pool.map(one_client, range(8)))) == 8


def test_several_models_by_pair_and_a_ctranslate2_export(translator, tmp_path):
    pytest.importorskip("ctranslate2")
    run_mt("export", str(RUN), "--quantization", "float32", "-o", str(tmp_path / "export"))
    other = tmp_path / "other"
    shutil.copytree(RUN, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"].update(src="xx", tgt="yy")  # another pair, as a second model would have
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    exported = Translator(tmp_path / "export", device="cpu")
    with pytest.raises(MTError, match="two models for src-tgt"):
        create_app([translator, exported])
    with pytest.raises(MTError, match="precision int8: a CTranslate2 export computes in the type it was exported"):
        Translator(tmp_path / "export", device="cpu", precision="int8")  # `mt serve --precision`: refused at start
    with TestClient(create_app([exported, Translator(other, device="cpu")])) as client:
        languages = client.get("/languages").json()
        assert languages == [
            {"code": "src", "name": "src", "targets": ["tgt"]},
            {"code": "xx", "name": "xx", "targets": ["yy"]},
        ]
        answer = client.post("/translate", json={"q": LINES, "source": "src", "target": "tgt"}).json()
        assert answer["translatedText"] == expected(exported, LINES)
        assert client.post("/translate", json={"q": LINES[0], "source": "xx", "target": "yy"}).status_code == 200
        refused = client.post(
            "/v1/translate", json={"segments": ["1"], "source": "src", "target": "tgt", "attention": True}
        )
        assert refused.status_code == 400 and "CTranslate2 export" in refused.json()["error"]


def test_mt_serve_without_its_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install 'mt[serve]'` was not run
    result = run_mt("serve", str(RUN), check=False)
    assert result.returncode == 2 and "pip install 'mt[serve]'" in result.stderr


def test_a_failure_inside_the_model_is_a_json_500_and_the_worker_lives_on(translator, monkeypatch):
    with TestClient(create_app([translator]), raise_server_exceptions=False) as client:
        body = {"q": "1 2", "source": "src", "target": "tgt"}
        real = translator.translate_chunks

        def broken(chunks, options):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(translator, "translate_chunks", broken)
        answer = client.post("/translate", json=body)
        assert answer.status_code == 500 and "internal error (RuntimeError)" in answer.json()["error"]
        monkeypatch.setattr(translator, "translate_chunks", real)
        assert client.post("/translate", json=body).status_code == 200


def test_a_server_in_int8_answers_as_an_int8_translator(translator):
    in_int8 = Translator(RUN, device="cpu", precision="int8")  # what `mt serve RUN --precision int8` loads
    assert in_int8.options().precision == "int8"
    with TestClient(create_app([in_int8])) as client:
        answer = client.post("/translate", json={"q": LINES, "source": "src", "target": "tgt"}).json()
    assert answer["translatedText"] == expected(translator, LINES, precision="int8")
    with pytest.raises(MTError, match="precision 'int4': choose one of"):
        Translator(RUN, device="cpu", precision="int4")
