"""Shared fixtures: a small document folder and a gateway config over it (testkit/gateway.py writes both)."""

from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from aggregator.runtime.config import GatewayConfig, parse_config
from testkit.gateway import DOCS, KEY, config_text, write_docs

# KEY, DOCS and write_docs are testkit's; tests import them from here too.
__all__ = ["DOCS", "KEY", "SCOPED_KEY", "write_docs", "make_config", "dify_source", "condition"]

SCOPED_KEY = "scoped-key-abcdef"
_databases = itertools.count(1)


def make_config(
    folder: Path, extra_connectors: str = "", kb_connectors: str = "[docs]", deadline_s: float = 4.0, cache_ttl_s: float | None = None
) -> GatewayConfig:
    """`demo` over a `files` source of `folder` (`kb_connectors` and `extra_connectors`, YAML, add others), and
    `other` for SCOPED_KEY. `cache_ttl_s=0` for a test that repeats one query to watch what the sources do."""
    server: dict[str, object] = {"deadline_s": deadline_s} | ({} if cache_ttl_s is None else {"cache_ttl_s": cache_ttl_s})
    text = config_text(
        {"docs": {"type": "files", "path": str(folder)}, **(yaml.safe_load(textwrap.dedent(extra_connectors)) or {})},
        {"demo": yaml.safe_load(kb_connectors), "other": ["docs"]},
        keys=[{"key": KEY}, {"key": SCOPED_KEY, "knowledge_ids": ["other"]}],
        defaults={"timeout_s": 2.0, "retries": 1},
        **server,
    )
    return parse_config(text, {})


def dify_source(name: str, endpoint: str, **fields: object) -> str:
    """A `dify` connector entry for `make_config`'s extra_connectors."""
    lines = [f"{name}:", "  type: dify", f"  endpoint: {endpoint}", "  api_key: k", "  knowledge_id: x"]
    lines += [f"  {key}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def condition(*conditions: tuple[str, str, object], logical: str = "and") -> dict:
    """A validated `metadata_condition` as the pipeline hands it to sources: (name, operator, value) triples."""
    return {"logical_operator": logical, "conditions": [
        {"name": [name], "comparison_operator": op, "value": value} for name, op, value in conditions
    ]}  # fmt: skip


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    return write_docs(tmp_path / "docs")


@pytest.fixture
def config(docs_dir: Path) -> GatewayConfig:
    return make_config(docs_dir)


# -- real PostgreSQL and Redis (testkit/servers.py), started once per session, only by tests that ask for them ------


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    pytest.importorskip("psycopg_pool", reason='the replicas extra is not installed: pip install -e ".[test]"')
    from testkit.servers import Unavailable, postgres_server

    try:
        with postgres_server() as server:
            yield server
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def pg_url(postgres, request: pytest.FixtureRequest) -> str:  # type: ignore[no-untyped-def]
    """A fresh database of the session's PostgreSQL server for this test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50] + f"_{os.getpid()}_{next(_databases)}"
    return postgres.create_database(name)


def new_redis_server():  # type: ignore[no-untyped-def]
    """A RedisServer not yet started, or a skip saying why there is none: every test that needs a server of its own
    makes it here (or through the fixtures below), never with `RedisServer()` directly, so that it skips, not fails."""
    pytest.importorskip("redis", reason='the replicas extra is not installed: pip install -e ".[test]"')
    from testkit.servers import RedisServer, Unavailable

    try:
        return RedisServer()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server():  # type: ignore[no-untyped-def]
    with new_redis_server().running() as server:
        yield server


@pytest.fixture
def own_redis():  # type: ignore[no-untyped-def]
    """A Redis of this test's own, for a test that stops and starts it."""
    with new_redis_server().running() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:  # type: ignore[no-untyped-def]
    """The session's Redis, emptied for this test (and started again if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


#: Fixtures that start a real server: a test using one is marked `servers` (`-m servers` selects every such test).
SERVER_FIXTURES = frozenset({"postgres", "pg_url", "redis_server", "redis_url", "own_redis"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "servers: needs a real PostgreSQL or Redis (skips, saying why, without them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
