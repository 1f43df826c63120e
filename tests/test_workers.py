"""Several worker processes: every one answers, and /metrics counts the requests of all of them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx

from .conftest import DOCS, write_docs
from testkit.loopback import serve_cli


def test_metrics_are_summed_across_workers(tmp_path: Path):
    folder = write_docs(tmp_path / "docs", DOCS)
    config = tmp_path / "c.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: k}}]\nknowledge_bases:\n  demo: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {folder}}}\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    (tmp_path / "metrics").mkdir()
    with serve_cli("--config", str(config), "--workers", "2", env=env) as (url, _):
        body = {"knowledge_id": "demo", "query": "signing keys", "retrieval_setting": {"top_k": 2, "score_threshold": 0}}
        for _ in range(30):  # new connections each time, so both workers get some
            with httpx.Client() as client:
                assert client.post(url + "/retrieval", json=body, headers={"Authorization": "Bearer k"}).status_code == 200
        pids = {p.name for p in (tmp_path / "metrics").iterdir()}
        text = httpx.get(url + "/metrics").text
    match = re.search(r'^gateway_requests_total\{status="200"\} (\S+)$', text, re.M)
    assert match and float(match.group(1)) == 30.0, text[:2000]
    assert len({re.sub(r"\D", "", name) for name in pids}) >= 2, "two worker processes wrote metrics"
