"""A real `mt serve` process on a loopback port: concurrent clients, SIGTERM, and the page in Chromium."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_mt

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


@contextlib.contextmanager
def serving(run: Path):
    """`mt serve RUN` on a free loopback port, once it answers: (its URL, the process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "mt", "serve", str(run), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_concurrent_clients_get_what_mt_translate_gives_and_sigterm_exits_zero(trained):
    """A model that has learned (near-ties would let batch composition flip a choice: float sums differ)."""
    run, lines = trained / "run", (trained / "test.src").read_text().splitlines()[:40]
    want = run_mt("translate", str(run), stdin="".join(f"{line}\n" for line in lines)).stdout.splitlines()
    with serving(run) as (url, process):

        def one_client(index: int) -> list[str]:
            order = lines[index:] + lines[:index]  # each client its own order of the same sentences
            body = {"source": "src", "target": "tgt"}
            texts = [post(f"{url}/translate", {**body, "q": line})["translatedText"] for line in order]
            return texts[len(lines) - index :] + texts[: len(lines) - index]

        with ThreadPoolExecutor(8) as pool:
            for got in pool.map(one_client, range(8)):
                assert got == want
        batch = post(f"{url}/v1/translate", {"segments": lines, "source": "src", "target": "tgt"})
        assert [r["translation"] for r in batch["results"]] == want

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "SIGTERM received" in stderr and "Traceback" not in stderr


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


def test_the_page_translates_and_draws_the_attention_heatmap(trained, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    with serving(trained / "run") as (url, _), playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{url}/")
        page.wait_for_selector("#pair option", state="attached")
        page.fill("#source", "7 8 6\n0 7 2 7 3")
        page.click("#translate")
        page.wait_for_selector("#translations li >> nth=1")
        items = page.locator("#translations li").all_inner_texts()
        want = post(f"{url}/v1/translate", {"segments": ["7 8 6", "0 7 2 7 3"], "source": "src", "target": "tgt"})
        assert items == [r["translation"] for r in want["results"]]
        page.locator("#translations li").nth(1).click()
        page.wait_for_selector("#heatmap[data-drawn]")
        rows, columns = map(int, page.get_attribute("#heatmap", "data-drawn").split("x"))
        pieces = post(
            f"{url}/v1/translate", {"segments": ["0 7 2 7 3"], "source": "src", "target": "tgt", "attention": True}
        )
        result = pieces["results"][0]
        assert (rows, columns) == (len(result["target_pieces"]), len(result["source_pieces"]))
        page.select_option("#head", "0")
        shot = Path(os.environ.get("MT_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5000
        browser.close()
