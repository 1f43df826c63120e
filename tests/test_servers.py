"""The README's test command on a machine without PostgreSQL or Redis: every test that needs one skips and says why.

The server tests run in a child pytest with `GATEWAY_TEST_HIDE_SERVERS` hiding both servers (from Debian's packages
and from the test extras' wheels alike, see `testkit/servers.py`), as on a fresh machine. With them present the same
tests run for real in the suite itself.
"""

from __future__ import annotations

import os
import re

import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("hidden", "paths", "at_least", "missing"),
    [
        # Neither server (a new user's machine): every test marked `servers` anywhere in the suite.
        ("redis,postgres", ["tests"], 15, ["Redis", "PostgreSQL"]),
        # PostgreSQL but no Redis (the machine of issue 24): the tests that need both skip on Redis, none fails.
        ("redis", ["tests/test_replicas.py", "tests/test_cache.py"], 5, ["Redis"]),
    ],
    ids=["neither", "no-redis"],
)
def test_every_server_test_skips_with_its_reason_when_a_server_is_not_installed(hidden: str, paths: list[str], at_least: int, missing: list[str]) -> None:
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not Path(d, "redis-server").exists())
    env = {**os.environ, "GATEWAY_TEST_HIDE_SERVERS": hidden, "PATH": path}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "servers", "-q", "-rs", "-p", "no:cacheprovider", *paths],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1]
    assert result.returncode == 0, output[-4000:]
    assert "failed" not in summary and "error" not in summary and "passed" not in summary, summary
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))  # type: ignore[union-attr]
    assert skipped >= at_least, f"the server tests were not selected: {summary}"
    reasons = re.findall(r"^SKIPPED \[\d+\] .*?: (.*)$", output, re.M)
    assert reasons and all("is not installed" in r for r in reasons), reasons
    for server in missing:
        assert any(r.startswith(f"{server} is not installed") for r in reasons), reasons
