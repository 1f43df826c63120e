"""The command line as a user types it: validate, query, serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import DOCS, write_docs
from testkit.loopback import free_port, serve_cli

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aggregator", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_validate_the_bundled_config():
    result = run("validate", "--config", "connectors.yaml")
    assert result.returncode == 0 and "OK" in result.stdout and "demo" in result.stdout


def test_validate_lists_every_error_and_exits_1(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n  api_keys: [{key: k, extra: 1}]\nknowledge_bases:\n  kb: {connectors: [ghost]}\n"
        "connectors:\n  docs: {type: files}\n  other: {type: nosuch}\n"
    )
    result = run("validate", "--config", str(bad))
    assert result.returncode == 1
    assert "server.api_keys[0].extra: unknown key" in result.stderr
    assert "connectors.docs.path: field required" in result.stderr
    assert "connectors.other: unknown connector type 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_environment_variable(tmp_path: Path):
    env = {**os.environ, "AGGREGATOR_CONFIG": str(tmp_path / "missing.yaml")}
    result = run("validate", env=env)
    assert result.returncode == 1 and "missing.yaml" in result.stderr and "cannot read" in result.stderr


def test_query_prints_a_table():
    result = run("query", "--config", "connectors.yaml", "--kb", "demo", "--top-k", "3", "rotate the signing keys")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["score", "source", "title"]
    assert "Rotating the release signing keys" in lines[2] and "samples" in lines[2]
    assert lines[-1] == "sources: samples=ok"


def test_query_json_is_the_api_answer():
    result = run("query", "--config", "connectors.yaml", "--kb", "demo", "--json", "--threshold", "0.2", "请假 年假")
    records = json.loads(result.stdout)["records"]
    assert records and records[0]["title"] == "请假制度" and all(r["score"] >= 0.2 for r in records)


def test_query_unknown_knowledge_base():
    result = run("query", "--config", "connectors.yaml", "--kb", "nope", "x")
    assert result.returncode == 2 and "no knowledge base named 'nope'" in result.stderr


def test_serve_answers_on_the_given_port_and_warns_about_the_dev_key(tmp_path: Path):
    folder = write_docs(tmp_path / "docs", DOCS)
    config = tmp_path / "c.yaml"
    config.write_text(
        "server:\n  api_keys: [{key: '${AGGREGATOR_API_KEY:-dev-only-change-me}'}]\n"
        f"knowledge_bases:\n  demo: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {folder}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "AGGREGATOR_API_KEY"}
    with serve_cli("--config", str(config), "--host", "127.0.0.1", env=env) as (url, server):
        response = httpx.post(
            url + "/retrieval",
            json={"knowledge_id": "demo", "query": "VPN profile", "retrieval_setting": {"top_k": 2, "score_threshold": 0}},
            headers={"Authorization": "Bearer dev-only-change-me"},
        )  # fmt: skip
        assert response.status_code == 200 and response.json()["records"][0]["title"] == "VPN setup"
        slashed = httpx.post(  # Dify's path when its endpoint was saved with a trailing slash
            url + "//retrieval",
            json={"knowledge_id": "demo", "query": "VPN profile"},
            headers={"Authorization": "Bearer dev-only-change-me"},
        )  # fmt: skip
        assert slashed.status_code == 200
        refused = httpx.post(url + "/retrieval", json={"knowledge_id": "demo", "query": "x"}, headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 403
    output = server.stdout.read()
    assert "development default" in output and "WARNING" in output
    # one line per retrieval: the gateway's own; uvicorn's access line only where the gateway writes none
    assert output.count("aggregator.access: retrieval") == 2
    assert '"POST /retrieval HTTP/1.1" 200' not in output and '"POST //retrieval HTTP/1.1" 200' not in output
    assert '"POST /retrieval HTTP/1.1" 403' in output
    assert '"GET /readyz HTTP/1.1" 200' in output


def test_serve_refuses_a_broken_config(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {}\n")
    result = run("serve", "--config", str(bad), "--port", str(free_port()))
    assert result.returncode == 1 and "server.api_keys: field required" in result.stderr


def test_check_reports_each_source_and_fails_when_one_does(tmp_path: Path):
    folder = write_docs(tmp_path / "docs", DOCS)
    config = tmp_path / "c.yaml"
    config.write_text(
        "server:\n  api_keys: [{key: k}]\n"
        "knowledge_bases:\n  demo: {connectors: [docs, partner]}\n"
        f"connectors:\n  docs: {{type: files, path: {folder}}}\n"
        f"  partner: {{type: dify, endpoint: 'http://127.0.0.1:{free_port()}', api_key: partner-secret, knowledge_id: kb, retries: 0}}\n"
    )
    result = run("check", "--config", str(config), "--query", "signing keys")
    assert result.returncode == 1
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert lines["docs"].split()[1] == "ok" and lines["docs"].split()[4] == "1"
    assert lines["partner"].split()[1] == "error" and "cannot connect" in lines["partner"]
    assert result.stdout.splitlines()[-1] == "1 ok, 1 failing"
    assert "partner-secret" not in result.stdout + result.stderr

    healthy = run("check", "--config", "connectors.yaml")
    assert healthy.returncode == 0 and "samples" in healthy.stdout


def test_gc_deletes_the_state_of_sources_no_longer_configured(tmp_path: Path):
    from aggregator.state import LocalBackend

    folder = write_docs(tmp_path / "docs", DOCS)
    config = tmp_path / "connectors.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: k}}]\nknowledge_bases:\n  kb: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {folder}}}\n")
    for name in ("docs", "old-wiki", "busy"):  # what earlier versions of the config left behind
        store = LocalBackend(tmp_path / "gateway-state").open(name, "fp")
        assert store.try_lead()
        store.open_writer()
        if name != "busy":
            store.close()
    dry = run("gc", "--config", str(config), "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stdout and "old-wiki" in dry.stdout and "docs" not in dry.stdout.replace(str(tmp_path), "")
    assert (tmp_path / "gateway-state" / "old-wiki").exists()
    result = run("gc", "--config", str(config))
    assert result.returncode == 1, "one store is in use"
    assert "deleted" in result.stdout and "kept" in result.stderr and "busy" in result.stderr
    assert sorted(p.name for p in (tmp_path / "gateway-state").iterdir()) == ["busy", "docs"]
    store.close()
    assert run("gc", "--config", str(config)).returncode == 0
    assert sorted(p.name for p in (tmp_path / "gateway-state").iterdir()) == ["docs"]


def test_a_serving_process_freezes_its_start_up_objects_and_collects_less_often():
    """What `serve` does before it listens (run in a child: freezing this test process would outlive the test)."""
    import subprocess
    import sys

    code = (
        "import gc, aggregator.web.api; from aggregator.runtime.gc import THRESHOLDS, settle_for_serving; before = gc.get_threshold(); "
        "settle_for_serving(); print(before[0], gc.get_threshold() == THRESHOLDS, gc.get_freeze_count() > 10_000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["700", "True", "True"]
