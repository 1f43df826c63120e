"""The status page as a person sees it, in headless Chromium, on a server with a failing source.

Headless Chromium's --dump-dom and --screenshot drive the page through
JavaScript, so it stays on here; that the page itself needs none is asserted
in test_ops (no <script>, refresh by <meta>).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from aggregator.api import create_app

from .conftest import KEY, make_config, write_docs
from .loopback import free_port, serve, wait_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60)


def test_a_person_sees_the_failing_source(tmp_path: Path):
    extra = f"""
    partner:
      type: dify
      endpoint: http://127.0.0.1:{free_port()}
      api_key: partner-key
      knowledge_id: kb
      retries: 0
    """
    config = make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, partner]")
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        body = {"knowledge_id": "demo", "query": "signing keys", "retrieval_setting": {"top_k": 3, "score_threshold": 0}}
        assert httpx.post(url + "/retrieval", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

        dom = chromium(tmp_path, "--dump-dom", url + "/").stdout
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,480", url + "/")

    rows = dict(re.findall(r'<tr data-source="([^"]+)">(.*?)</tr>', dom, re.S))
    assert set(rows) == {"docs", "partner"}
    assert re.search(r'class="state"[^>]*>degraded<', rows["partner"])
    assert "cannot connect" in rows["partner"]
    assert re.search(r'class="state"[^>]*>ok<', rows["docs"])
    assert "5 docs" in rows["docs"]
    assert shot.exists() and shot.stat().st_size > 5000, "a screenshot was saved for people to look at"
