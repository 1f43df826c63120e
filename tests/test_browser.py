"""The status page as a person sees it, in headless Chromium, on a server with a failing source.

Headless Chromium's --dump-dom and --screenshot drive the page through
JavaScript, so it stays on here; that the page itself needs none is asserted
in test_ops (no <script>, refresh by <meta>).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from aggregator.web.api import create_app
from aggregator.ops.charts import OUTCOME_COLOURS, P50_COLOUR

from testkit.fakes.dify import FakeUpstream
from testkit.gateway import ask
from testkit.loopback import free_port, serve, wait_ready

from .conftest import make_config, write_docs

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


def with_partner(tmp_path: Path, endpoint: str, timeout_s: float = 2.0):
    """The docs folder and a `dify` source at `endpoint`, in one knowledge base."""
    extra = f"""
    partner:
      type: dify
      endpoint: {endpoint}
      api_key: partner-key
      knowledge_id: kb
      retries: 0
      timeout_s: {timeout_s}
    """
    return make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, partner]", cache_ttl_s=0)


def look_at(tmp_path: Path, url: str, screenshot: str) -> tuple[str, Path]:
    """The status page's DOM as Chromium builds it, and a screenshot saved under test-artifacts/."""
    dom = chromium(tmp_path, "--dump-dom", url + "/").stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,480", url + "/")
    return dom, shot


def test_a_person_sees_the_failing_source(tmp_path: Path):
    config = with_partner(tmp_path, f"http://127.0.0.1:{free_port()}")
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        assert ask(url).status_code == 200
        dom, shot = look_at(tmp_path, url, "status-page.png")

    rows = dict(re.findall(r'<tr data-source="([^"]+)">(.*?)</tr>', dom, re.S))
    assert set(rows) == {"docs", "partner"}
    assert re.search(r'class="state"[^>]*>degraded<', rows["partner"])
    assert "cannot connect" in rows["partner"]
    assert re.search(r'class="state"[^>]*>ok<', rows["docs"])
    assert "5 docs" in rows["docs"]
    assert shot.exists() and shot.stat().st_size > 5000, "a screenshot was saved for people to look at"


def colour_pixels(png: Path, hex_colour: str) -> int:
    from PIL import Image

    wanted = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(png).convert("RGB")
    counts = image.getcolors(maxcolors=image.width * image.height) or []
    return sum(count for count, colour in counts if colour == wanted)


def test_a_person_sees_the_last_hour_of_a_flaky_source(tmp_path: Path):
    """Calls spread over 16 minutes (the clock injected), then the page as Chromium draws it: the charts are
    there in the screenshot, not only in the markup."""
    upstream = FakeUpstream(slow_s=0.6)
    with serve(upstream.app()) as upstream_url:
        app = create_app(lambda: with_partner(tmp_path, upstream_url, timeout_s=0.3))
        with serve(app) as url:
            wait_ready(url)
            clock = [time.time() - 16 * 60]
            app.state.service.health.clock = lambda: clock[0]
            for mode in ["ok"] * 4 + ["error", "slow", "ok"] * 4:
                clock[0] += 60
                upstream.mode = mode
                assert ask(url).status_code == 200
            dom, shot = look_at(tmp_path, url, "status-page-history.png")

    charts = dict(re.findall(r'<tr class="hist" data-history="([^"]+)">(.*?)</tr>', dom, re.S))
    assert set(charts) == {"docs", "partner"} and all(c.count("<svg") == 2 for c in charts.values())
    partner = re.search(r'<tr data-source="partner">(.*?)</tr>', dom, re.S)
    assert partner and "<b>timeout</b>" in partner.group(1) and "HTTP 500" in partner.group(1)
    for colour in (OUTCOME_COLOURS["ok"], OUTCOME_COLOURS["error"], OUTCOME_COLOURS["timeout"], P50_COLOUR):
        assert colour_pixels(shot, colour) > 300, f"bars of {colour} drawn (more than the legend's swatch)"
