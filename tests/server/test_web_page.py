"""The chat page at / in a real headless Chromium (Debian's package, driven by playwright): streamed
tokens appear, Stop aborts the request on the server, and a screenshot is kept as an artifact.

Without Chromium or playwright the test skips, except under CI=true, where it fails."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; playwright's own browser download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]
KEY = "page-key"


def sync_playwright_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        why = "needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; CI=true, so this is a failure, not a skip")
        pytest.skip(why)
    return sync_playwright


def artifact_dir(tmp_path: Path) -> Path:
    """FLASHSERVE_TEST_ARTIFACTS when set (CI keeps it), else the test's tmp dir."""
    d = Path(os.environ.get("FLASHSERVE_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def gauges(base) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    names = ["num_requests_running", "num_requests_waiting", "kv_cache_blocks_used"]
    got = {n: float(re.search(rf"^flashserve_{n} (\S+)$", text, re.M).group(1)) for n in names}
    m = re.search(r'^flashserve_requests_total\{outcome="abort"\} (\S+)$', text, re.M)
    got["aborted"] = float(m.group(1)) if m else 0.0
    return got


def test_chat_page_streams_and_stop_aborts(smollm2_gguf, tmp_path):
    sync_playwright = sync_playwright_or_skip()
    proc, base = start_server(smollm2_gguf, "--api-key", KEY)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/")

            # /v1 needs the key: the page says so, then lists the model once it is given.
            page.wait_for_function("document.getElementById('model-name').textContent.includes('API key')")
            page.fill("#api-key", KEY)
            page.press("#api-key", "Enter")
            # (the page fetches /v1/models on its own time: wait for the name, then compare it)
            page.wait_for_function("!/API key|loading/.test(document.getElementById('model-name').textContent)")
            assert page.text_content("#model-name") == Path(smollm2_gguf).name

            # A short greedy answer: the streamed text is the API's non-streamed answer, with stats under it.
            question = "What is the capital of France?"
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", question)
            page.press("#prompt", "Enter")
            page.wait_for_selector("#messages .msg.assistant[data-state=done]", timeout=60_000)
            first = page.locator("#messages .msg.assistant").first
            want = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                              json={"model": smollm2_gguf, "messages": [{"role": "user", "content": question}],
                                    "temperature": 0, "top_p": 1, "max_tokens": 12}).json()
            assert first.locator(".text").text_content() == want["choices"][0]["message"]["content"]
            assert re.fullmatch(r"12 tokens · [0-9.]+ tok/s · first token [0-9.]+ s",
                                first.locator(".meta").text_content())

            # A long answer (greedy, it runs to max tokens): watch it grow, then Stop it halfway.
            page.fill("#max-tokens", "800")
            page.fill("#prompt", "Write a long story about a dragon who learns to fly.")
            page.click("#send")
            answer = page.locator("#messages .msg.assistant").nth(1).locator(".text")
            lengths = [0]
            deadline = time.time() + 60
            while len(set(lengths)) < 4 and time.time() < deadline:
                page.wait_for_timeout(150)
                lengths.append(len(answer.text_content()))
            assert lengths == sorted(lengths) and len(set(lengths)) >= 4, lengths  # grew step by step
            page.click("#stop")
            page.wait_for_selector("#messages .msg.assistant[data-state=stopped]", timeout=10_000)
            stopped_at = len(answer.text_content())
            assert "stopped" in page.text_content("#status")

            # The server let go of it: nothing running or waiting, no KV block held, one abort counted.
            deadline = time.time() + 10
            while time.time() < deadline and gauges(base)["kv_cache_blocks_used"]:
                time.sleep(0.1)
            assert gauges(base) == {"num_requests_running": 0, "num_requests_waiting": 0,
                                    "kv_cache_blocks_used": 0, "aborted": 1}
            assert len(answer.text_content()) == stopped_at
            assert not errors, errors

            shot = artifact_dir(tmp_path) / "web_chat.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
