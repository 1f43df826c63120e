"""Hot reload: edit connectors.yaml under a running server and watch /status and the answers follow."""

from __future__ import annotations

from pathlib import Path

import httpx

from aggregator.web.api import create_app

from testkit.gateway import ask
from testkit.loopback import eventually, serve, until, wait_ready

from .conftest import KEY, write_docs

BASE = """
server:
  api_keys:
    - key: {key}
knowledge_bases:
  demo:
    connectors: {kb}
connectors:
  docs:
    type: files
    path: {docs}
  more:
    type: files
    path: {more}
"""



def titles(url: str, query: str) -> set[str]:
    response = ask(url, query, top_k=10)
    assert response.status_code == 200
    return {r["title"] for r in response.json()["records"]}


def test_edits_are_applied_invalid_ones_rejected_and_unchanged_sources_kept(tmp_path: Path):
    docs = write_docs(tmp_path / "docs")
    more = write_docs(tmp_path / "more", {"kafka.md": "# Kafka guide\n\nHow to add a Kafka topic."})
    config = tmp_path / "connectors.yaml"
    config.write_text(BASE.format(key=KEY, kb="[docs]", docs=docs, more=more))

    with serve(create_app(config_path=config)) as url:
        wait_ready(url)
        service_status = lambda: httpx.get(url + "/status").json()  # noqa: E731
        first = service_status()
        assert titles(url, "kafka topic") == set()
        assert "Key rotation" in titles(url, "signing keys")
        docs_index_refresh = {s["name"]: s for s in first["sources"]}["docs"]["index"]["last_refresh"]

        # 1. add a source to the knowledge base
        config.write_text(BASE.format(key=KEY, kb="[docs, more]", docs=docs, more=more))
        eventually(lambda: service_status()["config_version"] != first["config_version"])
        eventually(lambda: "Kafka guide" in titles(url, "kafka topic"))
        after_add = service_status()
        assert after_add["last_reload"]["result"] == "ok"
        docs_after = {s["name"]: s for s in after_add["sources"]}["docs"]
        assert docs_after["index"]["last_refresh"] == docs_index_refresh, "the unchanged source kept its index"
        assert docs_after["calls"]["ok"] >= 1, "and its history"

        # 2. break the YAML: rejected, the last good version keeps serving, the error is shown
        config.write_text("server: [this is: not valid\n")
        eventually(lambda: service_status()["last_reload"]["result"] == "error")
        broken = service_status()
        assert broken["config_version"] == after_add["config_version"]
        assert "not valid YAML" in broken["last_reload"]["error"]
        assert "rejected" in httpx.get(url + "/").text
        assert "Kafka guide" in titles(url, "kafka topic")

        # 3. a valid file with a schema error is rejected the same way, naming the place
        config.write_text(BASE.format(key=KEY, kb="[docs, ghost]", docs=docs, more=more))
        eventually(lambda: "ghost" in (service_status()["last_reload"]["error"] or ""))
        assert "knowledge_bases.demo.connectors[1]" in service_status()["last_reload"]["error"]

        # 4. fix it: back to serving the edited version, the removed source is gone
        config.write_text(BASE.format(key=KEY, kb="[more]", docs=docs, more=more).replace(f"  docs:\n    type: files\n    path: {docs}\n", ""))
        eventually(lambda: service_status()["last_reload"]["result"] == "ok")
        final = service_status()
        assert [s["name"] for s in final["sources"]] == ["more"]
        assert titles(url, "kafka topic") == {"Kafka guide"} and titles(url, "signing keys") == set()


async def test_requests_in_flight_finish_on_the_old_config(tmp_path: Path):
    """A reload swaps the gateway; what the new one dropped closes only after the old one's last request."""
    import asyncio

    from aggregator.runtime.config import load_config
    from aggregator.runtime.service import Service

    docs = write_docs(tmp_path / "docs")
    more = write_docs(tmp_path / "more", {"kafka.md": "# Kafka guide\n\nHow to add a Kafka topic."})
    path = tmp_path / "connectors.yaml"
    path.write_text(BASE.format(key=KEY, kb="[docs, more]", docs=docs, more=more))
    service = Service(lambda: load_config(path), path)
    await service.start()
    try:
        await until(lambda: service.gateway.ready, what="the gateway ready")
        old = service.gateway
        dropped, kept = old.slots["docs"].connector, old.slots["more"].connector
        with old.lease():
            path.write_text(BASE.format(key=KEY, kb="[more]", docs=docs, more=more).replace(f"  docs:\n    type: files\n    path: {docs}\n", ""))
            assert await service.reload()
            assert service.gateway is not old and set(service.gateway.slots) == {"more"}
            # the retirement had its chance: it ran up to waiting for the old gateway's requests to end
            await until(lambda: old._idle._waiters, what="the retirement waiting for the request in flight")  # type: ignore[attr-defined]
            assert dropped._task is not None, "not closed while a request still holds the old gateway"
        await asyncio.gather(*service._retiring)
        assert dropped._task is None, "closed once drained"
        assert service.gateway.slots["more"].connector is kept and kept._task is not None, "the unchanged source lives on"
    finally:
        await service.aclose()
