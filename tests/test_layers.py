"""The code's layers hold: imports only go down (the contract is `[tool.importlinter]` in pyproject.toml).

    web → runtime → ops → retrieval → state → ranking → shared → tasks → connectors → {contract, text}

A newcomer follows one retrieval top to bottom, one folder a layer; nothing on the request path
(`aggregator/retrieval` and below) imports `ops/`, and connectors reach the core only through the contract
and text helpers: their index, sync loop and shared rate limiter are the core's (`aggregator/state/sync.py`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip('import-linter is not installed: pip install -e ".[test]"')
    return subprocess.run([command, "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_imports_only_go_down():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_arrow_running_back_up_breaks_the_contract(tmp_path: Path):
    """The check can fail: a copy of the code where the fan-out imports ops/ (the request path reaching up)."""
    for package in ("aggregator", "connectors", "testkit"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fanout = tmp_path / "aggregator" / "retrieval" / "fanout.py"
    fanout.write_text(fanout.read_text() + "\nfrom aggregator.ops import tracing  # noqa: E402,F401\n")
    result = lint_imports(cwd=tmp_path)
    assert result.returncode != 0
    assert "aggregator.retrieval.fanout -> aggregator.ops.tracing" in result.stdout


def test_the_product_importing_the_test_support_breaks_the_contract(tmp_path: Path):
    """testkit/ is not shipped: a connector that imports it would fail on a user's machine."""
    for package in ("aggregator", "connectors", "testkit"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    files = tmp_path / "connectors" / "files.py"
    files.write_text(files.read_text() + "\nfrom testkit import loopback  # noqa: E402,F401\n")
    result = lint_imports(cwd=tmp_path)
    assert result.returncode != 0
    assert "connectors.files -> testkit.loopback" in result.stdout
