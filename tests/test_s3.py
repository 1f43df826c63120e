"""The `s3` source against a real S3-compatible server on loopback (moto's standalone server)."""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config

from .conftest import KEY, write_docs
from testkit.loopback import free_port, serve, wait_ready

ACCESS, SECRET = "test-access-key", "test-secret-key-do-not-print"


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access line per request would drown the output

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_url: str, request: pytest.FixtureRequest):
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=ACCESS, aws_secret_access_key=SECRET)
    name = "kb-" + request.node.name.replace("_", "-")[:40].lower()
    client.create_bucket(Bucket=name)
    yield client, name
    for item in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


def config_text(s3_url: str, bucket: str, folder: Path, **extra: str) -> str:
    more = "".join(f"\n    {k}: {v}" for k, v in extra.items())
    return textwrap.dedent(f"""
    server:
      api_keys: [{{key: {KEY}}}]
      deadline_s: 2.0
    knowledge_bases:
      demo: {{connectors: [runbooks, docs]}}
    connectors:
      docs:
        type: files
        path: {folder}
      runbooks:
        type: s3
        bucket: {bucket}
        prefix: ops/
        endpoint_url: {s3_url}
        region: us-east-1
        access_key_id: ${{S3_KEY}}
        secret_access_key: ${{S3_SECRET}}
        include: [".txt", ".md", ".html"]
        refresh_s: 3600""") + more.replace("\n    ", "\n    ")


def records(url: str, query: str) -> list[dict]:
    body = {"knowledge_id": "demo", "query": query, "retrieval_setting": {"top_k": 10, "score_threshold": 0}}
    response = httpx.post(url + "/retrieval", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    return response.json()["records"]


def s3_titles(url: str, query: str) -> set[str]:
    return {r["title"] for r in records(url, query) if r["metadata"]["source"] == "runbooks"}


def test_index_a_bucket_query_it_and_follow_changes(s3_url: str, bucket, tmp_path: Path):
    client, name = bucket
    client.put_object(Bucket=name, Key="ops/restore-database.md", Body="# Restore\n\nTo restore the PostgreSQL database, open a ticket.".encode())
    client.put_object(Bucket=name, Key="ops/rotate-certificates.txt", Body=b"Rotate TLS certificates every ninety days.")
    client.put_object(Bucket=name, Key="ops/page.html", Body=b"<html><body><h1>Kafka</h1><p>Add a <b>kafka</b> topic with the CLI.</p><script>alert(1)</script></body></html>")
    client.put_object(Bucket=name, Key="ops/huge.txt", Body=b"postgresql " * 1000)
    client.put_object(Bucket=name, Key="other/outside-prefix.txt", Body=b"PostgreSQL outside the prefix")
    client.put_object(Bucket=name, Key="ops/image.png", Body=b"\x89PNG postgresql")
    config = parse_config(config_text(s3_url, name, write_docs(tmp_path / "docs"), max_object_bytes="2000"), {"S3_KEY": ACCESS, "S3_SECRET": SECRET})

    app = create_app(lambda: config)
    with serve(app) as url:
        wait_ready(url)
        found = records(url, "restore the postgresql database")
        top = [r for r in found if r["metadata"]["source"] == "runbooks"][0]
        meta = top["metadata"]
        assert top["title"] == "restore-database.md" and meta["source_type"] == "s3"
        assert meta["bucket"] == name and meta["key"] == "ops/restore-database.md" and meta["document_id"] == "runbooks:ops/restore-database.md"
        assert meta["path"] == f"s3://{name}/ops/restore-database.md"
        assert meta["size"] > 0 and meta["etag"] and meta["updated_at"].endswith("Z")
        assert s3_titles(url, "postgresql") == {"restore-database.md"}, "the prefix, the suffixes and the size limit apply"
        [html] = [r for r in records(url, "kafka topic") if r["title"] == "page.html"]
        assert "alert" not in html["content"] and "Add a kafka topic with the CLI." in html["content"]

        status = {s["name"]: s for s in httpx.get(url + "/status").json()["sources"]}["runbooks"]
        assert status["state"] == "ok" and status["index"]["documents"] == 3 and status["index"]["skipped"] == 1

        connector = app.state.service.gateway.slots["runbooks"].connector
        client.put_object(Bucket=name, Key="ops/new-runbook.md", Body=b"# Failover\n\nFail over the PostgreSQL primary.")
        client.put_object(Bucket=name, Key="ops/rotate-certificates.txt", Body=b"Certificates are now renewed by the ACME robot.")
        client.delete_object(Bucket=name, Key="ops/restore-database.md")
        connector.trigger_refresh()
        deadline = time.monotonic() + 10
        while s3_titles(url, "postgresql") != {"new-runbook.md"}:
            assert time.monotonic() < deadline, s3_titles(url, "postgresql")
            time.sleep(0.05)
        assert s3_titles(url, "acme robot renewed") == {"rotate-certificates.txt"}
        assert s3_titles(url, "ninety days") == set()


def test_fetches_only_what_changed(s3_url: str, bucket):
    import asyncio

    from aggregator.state.sync import IndexedConnector
    from connectors.s3 import S3Settings, S3Source

    client, name = bucket
    for i in range(5):
        client.put_object(Bucket=name, Key=f"doc{i}.txt", Body=f"document number {i}".encode())
    settings = S3Settings(bucket=name, endpoint_url=s3_url, access_key_id=ACCESS, secret_access_key=SECRET)

    async def run() -> list[str]:
        source = S3Source("s3", settings)
        connector = IndexedConnector(source)
        fetched: list[str] = []
        original = source.fetch

        async def counting(key: str):
            fetched.append(key)
            return await original(key)

        source.fetch = counting  # type: ignore[method-assign]
        await connector.sync()
        first = len(fetched)
        client.put_object(Bucket=name, Key="doc3.txt", Body=b"document three, changed")
        await connector.sync()
        await connector.aclose()
        return [str(first), *fetched[first:]]

    assert asyncio.run(run()) == ["5", "doc3.txt"]


def refusing_s3() -> object:
    """An endpoint that refuses every key the way S3 does: 403 with an InvalidAccessKeyId XML error."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = (
        '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
        "<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>"
    )

    async def refuse(_request) -> Response:  # type: ignore[no-untyped-def]
        return Response(body, status_code=403, media_type="application/xml")

    return Starlette(routes=[Route("/{path:path}", refuse, methods=["GET", "HEAD", "PUT", "POST"])])


@pytest.mark.parametrize(
    "case,expected_state,message",
    [
        ("missing bucket", "down", "does not exist"),
        ("wrong credentials", "auth_failed", "credentials refused (InvalidAccessKeyId)"),
        ("unreachable endpoint", "down", "cannot reach the endpoint"),
    ],
)
def test_errors_show_as_the_source_state_never_as_a_failed_request(s3_url: str, tmp_path: Path, case, expected_state, message):
    env = {"S3_KEY": ACCESS, "S3_SECRET": SECRET}
    with contextlib.ExitStack() as stack:
        endpoint = s3_url
        if case == "wrong credentials":
            endpoint = stack.enter_context(serve(refusing_s3()))
        if case == "unreachable endpoint":
            endpoint = f"http://127.0.0.1:{free_port()}"
        config = parse_config(config_text(endpoint, "no-such-bucket", write_docs(tmp_path / "docs")), env)
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            assert records(url, "signing keys"), "the other source still answers"
            status = {s["name"]: s for s in httpx.get(url + "/status").json()["sources"]}["runbooks"]
    assert status["state"] == expected_state, status
    assert message in status["index"]["last_refresh_error"]
    assert SECRET not in str(status)


def test_debug_logging_never_prints_s3_credentials(s3_url: str, bucket):
    """At --log-level debug, botocore's own loggers would print the signed request (session token, key id)."""
    import io
    import logging

    from aggregator.ops.logs import configure_logging

    _, name = bucket
    root = logging.getLogger()
    kept = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict})
    output = io.StringIO()
    try:
        configure_logging("debug")
        root.handlers[0].setStream(output)  # type: ignore[attr-defined]
        token = "session-token-that-must-not-be-logged"
        client = boto3.client(
            "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
            aws_session_token=token,
        )  # fmt: skip
        client.list_objects_v2(Bucket=name)
        logging.getLogger("aggregator").debug("debug lines of the gateway itself still come through")
    finally:
        root.handlers[:], level, levels = kept[0], kept[1], kept[2]
        root.setLevel(level)
        for logger_name, logger_level in levels.items():
            logging.getLogger(logger_name).setLevel(logger_level)
    text = output.getvalue()
    assert "debug lines of the gateway itself" in text
    assert token not in text and ACCESS not in text and SECRET not in text
