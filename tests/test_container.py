"""The image (Containerfile) and compose.yaml, built and run for real with podman (issue 27).

The base is Debian bookworm made with mmdebstrap (python3, python3-venv, python3-pip, ca-certificates) and
`podman import`ed, since no image registry is reachable in CI; the tarball is cached under
~/.cache/dify-knowledge-gateway-ci (GATEWAY_CI_CACHE), keyed by what goes into it. The image is built once
for this module; its build time and size are written to test-artifacts/container.json.

Skips, with the reason, where podman cannot run: not root, podman/runc/mmdebstrap missing (`.ci/run` installs
them), or a container that cannot start on this host. A build that fails is a failure.

What this host needs, set up here without touching /etc: podman's `crun` fails on hybrid cgroups, so
runtime = "runc"; podman's default rlimits exceed what root may set without CAP_SYS_RESOURCE, so
default_ulimits at the hard limits this process has (both in a containers.conf of our own, CONTAINERS_CONF).
CA certificates this host trusts beyond Debian's (a TLS-intercepting proxy) are copied into the base so pip
works during the build, and pip's index configuration is passed to the build as build arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from testkit.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT.parent / "shared" / "conformance" / "check.py"
CACHE = Path(os.environ.get("GATEWAY_CI_CACHE") or Path.home() / ".cache" / "dify-knowledge-gateway-ci")
ARTIFACTS = ROOT / "test-artifacts"

BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
MIRROR = os.environ.get("GATEWAY_CI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("GATEWAY_CI_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
SOURCES = [f"deb {MIRROR} bookworm main", f"deb {MIRROR} bookworm-updates main", f"deb {SECURITY} bookworm-security main"]
# Smaller base: no documentation, manual pages or translations (copyright files stay).
DPKG_OPTS = ["path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/man/*",
             "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/locale/*"]  # fmt: skip
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

IMAGE = "localhost/dify-knowledge-gateway-ci:test"
KEY = "container-" + secrets.token_urlsafe(16)
QUERY = "rotate the signing keys"


# -- podman, as this host needs it -----------------------------------------------------------------------


def skip_reason() -> str | None:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs them with apt-get)"
    if os.geteuid() != 0:
        return "needs root (mmdebstrap and podman run as root in CI)"
    return None


def podman_env(folder: Path) -> dict[str, str]:
    """The environment for every podman call: our own containers.conf (runc; rlimits root may set)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    # podman runs conmon with at most 32768 processes; a higher value cannot be set inside (EPERM).
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    conf = folder / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(cmd: list[str], env: dict[str, str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def extra_ca_files() -> list[Path]:
    """Certificates this host trusts beyond Debian's bundle: local CAs, and bundles pip or requests are told to use."""
    found: list[Path] = sorted(p for p in Path("/usr/local/share/ca-certificates").rglob("*.crt") if p.is_file())
    named = [os.environ.get(v) for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")]
    named.append(pip_config().get("cert"))
    for value in named:
        if value and Path(value).is_file() and Path(value).resolve() != SYSTEM_BUNDLE.resolve() and Path(value) not in found:
            found.append(Path(value))
    return found


def pip_config() -> dict[str, str]:
    """pip's settings on this machine (`pip config list`: files and PIP_* variables; the environment wins)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings: dict[str, str] = {}
    for line in sorted(proc.stdout.splitlines(), key=lambda s: s.startswith(":env:")):
        match = re.match(r"^([^.]+)\.([\w-]+)='(.*)'$", line.strip())
        if match and match.group(1) in ("global", "install", ":env:"):
            settings[match.group(2)] = match.group(3)
    return settings


def pip_build_args() -> tuple[list[str], list[str]]:
    """Build arguments that point the build's pip where this machine's pip looks, and the local folders it needs."""
    config = pip_config()
    args: list[str] = []
    folders: list[Path] = []
    for key, arg in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
                     ("find-links", "PIP_FIND_LINKS"), ("trusted-host", "PIP_TRUSTED_HOST")):  # fmt: skip
        kept = []
        for value in config.get(key, "").split():
            local = value[len("file://"):] if value.startswith("file://") else (value if value.startswith("/") else None)
            if local is not None:  # a folder of this machine: mounted read-only into the build where it exists
                folder = Path(local.rstrip("/"))
                if not folder.exists():
                    continue
                if folder.name == "simple":  # a PEP 503 index links to its files beside it (../files/…)
                    folder = folder.parent
                folders += [] if folder in folders else [folder]
            kept.append(value)
        if kept:
            args += ["--build-arg", f"{arg}={' '.join(kept)}"]
    return args, [arg for folder in folders for arg in ("--volume", f"{folder}:{folder}:ro")]


# -- the base: Debian bookworm from mmdebstrap -----------------------------------------------------------


def base_image(env: dict[str, str]) -> str:
    cas = extra_ca_files()
    digest = hashlib.sha256(json.dumps([BASE_PACKAGES, SOURCES, DPKG_OPTS, 1]).encode())
    for ca in cas:
        digest.update(ca.read_bytes())
    key = digest.hexdigest()[:16]
    name = f"localhost/dify-knowledge-gateway-ci-base:{key}"
    if run(["podman", "image", "exists", name], env, check=False).returncode == 0:
        return name
    tarball = CACHE / f"bookworm-{key}.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        hooks = ['mkdir -p "$1/usr/local/share/ca-certificates/ci"']
        hooks += [f'cp {ca} "$1/usr/local/share/ca-certificates/ci/{i}-{ca.stem}.crt"' for i, ca in enumerate(cas)]
        hooks += ['chroot "$1" update-ca-certificates >/dev/null 2>&1', 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin']
        cmd = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES)]
        cmd += [f"--dpkgopt={opt}" for opt in DPKG_OPTS] + [f"--customize-hook={hook}" for hook in hooks]
        proc = run(cmd + ["bookworm", str(partial), *SOURCES], env, timeout=600, check=False)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            pytest.skip(f"mmdebstrap could not make the Debian base: {(proc.stderr or proc.stdout)[-500:]}")
        partial.rename(tarball)
    run(["podman", "import", "--change", 'CMD ["/bin/bash"]', str(tarball), name], env, timeout=300)
    return name


def image_size(env: dict[str, str], image: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", image], env).stdout.strip())


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if reason := skip_reason():
        pytest.skip(reason)
    env = podman_env(tmp_path_factory.mktemp("podman"))
    proc = run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env, check=False)
    if proc.returncode != 0:
        pytest.skip(f"podman cannot run here: {proc.stderr.strip()[-500:]}")
    return env


@pytest.fixture(scope="module")
def base(podman: dict[str, str]) -> str:
    name = base_image(podman)
    proc = run(["podman", "run", "--rm", "--network", "none", name, "true"], podman, check=False)
    if proc.returncode != 0:
        pytest.skip(f"podman cannot start a container on this host: {proc.stderr.strip()[-500:]}")
    return name


@pytest.fixture(scope="module")
def image(podman: dict[str, str], base: str) -> str:
    """The gateway's image, built once (podman's layer cache makes a rebuild of unchanged sources quick)."""
    args, volumes = pip_build_args()
    started = time.monotonic()
    run(["podman", "build", "--format", "docker", "--layers", "-f", "Containerfile", "--build-arg", f"BASE_IMAGE={base}",
         "--build-arg", "EXTRAS=replicas", *args, *volumes, "-t", IMAGE, str(ROOT)], podman, timeout=900)  # fmt: skip
    seconds = time.monotonic() - started
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "container.json").write_text(json.dumps({
        "image": IMAGE, "base": base, "build_s": round(seconds, 1), "size_bytes": image_size(podman, IMAGE),
        "base_size_bytes": image_size(podman, base)}, indent=2) + "\n")  # fmt: skip
    return IMAGE


# -- talking to it ---------------------------------------------------------------------------------------


def post(url: str, key: str, query: str = QUERY, request_id: str | None = None) -> tuple[int, dict, Message]:
    body = json.dumps({"knowledge_id": "demo", "query": query, "retrieval_setting": {"top_k": 3, "score_threshold": 0}})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    request = urllib.request.Request(url + "/retrieval", data=body.encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def wait_ready(url: str, env: dict[str, str], container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    logs = run(["podman", "logs", container], env, check=False)
    raise AssertionError(f"{url}/readyz not 200 within {timeout} s\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}")


@pytest.fixture(scope="module")
def container(podman: dict[str, str], image: str):
    """The image started as a user would: a free port, the key from the environment, a state volume."""
    name = f"gateway-ci-{secrets.token_hex(4)}"
    port = free_port()
    run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", f"AGGREGATOR_API_KEY={KEY}",
         "-v", f"{name}-state:/srv/gateway/gateway-state", image], podman)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, podman, name)
        yield name, url
    finally:
        run(["podman", "stop", "-t", "10", name], podman, check=False)
        run(["podman", "rm", "-f", "-v", name], podman, check=False)
        run(["podman", "volume", "rm", "-f", f"{name}-state"], podman, check=False)


# -- the image -------------------------------------------------------------------------------------------


def test_the_image_answers_retrievals_and_refuses_a_wrong_key(container):
    _, url = container
    status, data, headers = post(url, KEY)
    assert status == 200, data
    assert data["records"] and "signing" in data["records"][0]["content"].lower()
    assert headers.get("X-Sources") == "samples=ok"
    status, data, _ = post(url, "not-" + KEY)
    assert status == 403 and data["error_code"] == 1002


def test_the_image_runs_as_a_non_root_user_with_its_state_in_the_volume(container, podman):
    name, _ = container
    ids = run(["podman", "exec", name, "id", "-u"], podman).stdout.strip()
    assert ids != "0"
    top = run(["podman", "top", name, "user", "args"], podman).stdout
    assert "aggregator serve" in top and "root" not in top, top
    # The state folder is the volume, owned by the gateway's user and private to it; the index is in it.
    listing = run(["podman", "exec", name, "stat", "-c", "%u %a", "/srv/gateway/gateway-state"], podman).stdout.split()
    assert listing == [ids, "700"]
    assert "samples" in run(["podman", "exec", name, "ls", "/srv/gateway/gateway-state"], podman).stdout


def test_the_healthcheck_reports_healthy(container, podman):
    name, _ = container
    proc = run(["podman", "healthcheck", "run", name], podman, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_metadata_and_no_compiler(podman, image):
    inspected = json.loads(run(["podman", "image", "inspect", image], podman).stdout)[0]
    config = inspected["Config"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/srv/gateway/gateway-state" in config["Volumes"]
    assert config["User"].split(":")[0] not in ("", "0", "root")
    assert "/readyz" in " ".join(inspected["Healthcheck"]["Test"])  # kept: built with --format docker
    # The C compiler stayed in the build stage; the rerank kernel it built did not.
    probe = "import shutil, aggregator.ranking._kernel; print(shutil.which('gcc') or shutil.which('cc') or 'none')"
    proc = run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", probe], podman)
    assert proc.stdout.strip() == "none"


def test_the_image_will_not_start_without_a_key(podman, image):
    proc = run(["podman", "run", "--rm", "--network", "none", image, "validate"], podman, check=False)
    assert proc.returncode != 0
    assert "AGGREGATOR_API_KEY" in proc.stdout + proc.stderr


@pytest.mark.skipif(not CONFORMANCE.exists(), reason="../shared/conformance/check.py is not beside this checkout (a user's clone has none)")
def test_conformance_check_passes_against_the_container(container):
    _, url = container
    proc = subprocess.run([sys.executable, str(CONFORMANCE), "--url", url, "--key", KEY, "--kb", "demo", "--query", QUERY],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("0 failed"), proc.stdout[-3000:] + proc.stderr[-2000:]


# -- compose.yaml ----------------------------------------------------------------------------------------


def services_image(env: dict[str, str], base: str) -> str:
    """Redis and HAProxy from Debian's packages on the same base, for what compose.yaml pulls from Docker Hub
    elsewhere: one image for both (compose gives Redis its command; HAProxy's is the image's)."""
    name = base.replace("-ci-base:", "-ci-services:")
    if run(["podman", "image", "exists", name], env, check=False).returncode != 0:
        containerfile = (f"FROM {base}\nRUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                         "--no-install-recommends redis-server haproxy >/dev/null && rm -rf /var/lib/apt/lists/*\n"
                         'USER nobody\nCMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]\n')  # fmt: skip
        run(["podman", "build", "-t", name, "-f", "-", str(ROOT / "deploy")], env, timeout=600, input=containerfile)
    return name


@pytest.fixture(scope="module")
def stack(podman: dict[str, str], image: str, base: str, tmp_path_factory: pytest.TempPathFactory):
    """compose.yaml with the profiles redis and replicas, on a network standing for Dify's docker_default."""
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.skip("podman-compose not installed (.ci/run installs it from PyPI)")
    services = services_image(podman, base)
    project = f"gateway-ci-{secrets.token_hex(3)}"
    network = f"{project}-dify"
    port, lb_port = free_port(), free_port()
    env = {**podman, "COMPOSE_PROJECT_NAME": project, "DIFY_NETWORK": network, "AGGREGATOR_API_KEY": KEY,
           "GATEWAY_IMAGE": image, "GATEWAY_REDIS_IMAGE": services, "GATEWAY_LB_IMAGE": services,
           "GATEWAY_PORT": str(port), "GATEWAY_LB_PORT": str(lb_port), "GATEWAY_REDIS_URL": "redis://gateway-redis:6379/5"}  # fmt: skip
    up = [compose, "-f", str(ROOT / "compose.yaml"), "--profile", "redis", "--profile", "replicas"]
    cwd = tmp_path_factory.mktemp("compose")  # run from elsewhere: compose.yaml's paths are relative to its own folder
    run(["podman", "network", "create", network], env)
    try:
        run([*up, "up", "-d", "--no-build"], env, timeout=300, cwd=cwd)
        names = {s: f"{project}_{s}_1" for s in ("knowledge-gateway", "knowledge-gateway-2", "gateway-redis", "knowledge-gateway-lb")}
        wait_ready(f"http://127.0.0.1:{port}", env, names["knowledge-gateway"])
        deadline = time.monotonic() + 120
        while run(["podman", "healthcheck", "run", names["knowledge-gateway-2"]], env, check=False).returncode != 0:
            assert time.monotonic() < deadline, run(["podman", "logs", names["knowledge-gateway-2"]], env, check=False).stderr[-3000:]
            time.sleep(1)
        time.sleep(2.5)  # HAProxy's next check (inter 2s) sees the second replica up
        yield env, names, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{lb_port}"
    finally:
        run([*up, "down", "-v", "-t", "5"], env, timeout=180, check=False, cwd=cwd)
        run(["podman", "network", "rm", "-f", network], env, check=False)


def test_compose_with_redis_answers_a_repeated_query_from_the_cache(stack):
    env, names, url, _ = stack
    query = f"{QUERY} {secrets.token_hex(4)}"  # a query no earlier run left in the cache
    first = post(url, KEY, query)
    second = post(url, KEY, query)
    assert first[0] == second[0] == 200
    assert first[2].get("X-Cache") == "miss" and second[2].get("X-Cache") == "hit", (dict(first[2]), dict(second[2]))
    assert first[1] == second[1]
    # The cache is in Redis (database 5, as configured), not only in this process.
    probe = "import json, urllib.request as u; print(json.dumps(json.load(u.urlopen('http://127.0.0.1:8000/status'))['shared_state']))"
    shared = json.loads(run(["podman", "exec", names["knowledge-gateway"], "python3", "-c", probe], env).stdout)
    assert shared["redis"]["state"] == "connected", shared
    assert run(["podman", "exec", names["gateway-redis"], "redis-cli", "-n", "5", "--scan"], env).stdout.split()


def test_compose_replicas_behind_the_load_balancer_share_the_cache(stack):
    """Round robin: two requests in a row reach both replicas; the second is answered from the first's answer
    through Redis, never computed again: a `hit`, or `coalesced` when it arrives before the first replica has
    finished storing it (that store runs beside sending the first response)."""
    env, names, _, lb = stack
    query = f"{QUERY} {secrets.token_hex(4)}"
    ids = [f"ci-{secrets.token_hex(6)}" for _ in range(2)]
    answers = [post(lb, KEY, query, request_id=i) for i in ids]
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][2].get("X-Cache") == "miss" and answers[1][2].get("X-Cache") in ("hit", "coalesced")
    logs = {}
    for service in ("knowledge-gateway", "knowledge-gateway-2"):
        proc = run(["podman", "logs", names[service]], env)
        logs[service] = proc.stdout + proc.stderr
    served = [[s for s, text in logs.items() if i in text] for i in ids]
    assert all(len(s) == 1 for s in served) and served[0] != served[1], served
