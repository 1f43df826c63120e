"""The worst filters the request limits allow, on an indexed source of 100,000 passages.

    python -m bench.filters [--passages 100000] [--deadline 4]

The gateway runs as `aggregator serve` in its own process over a `files` source whose every passage holds the
query's word, so a filter that matches nothing makes the source read and test every passage. For each shape of
filter at the limits (`aggregator/contract/models.py`), one request is timed while a second client asks `/healthz` over
and over: the answer must come within the deadline, and the health checks must keep being answered. The same
query without a filter, in the same run, is the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.contract.models import MAX_FILTER_FIELDS, MAX_FILTER_TESTS, MAX_VALUES_PER_CONDITION  # noqa: E402
from testkit.gateway import ask  # noqa: E402
from testkit.loopback import free_port, stop, wait_ready  # noqa: E402

KEY = "bench-key-0123456789"
PASSAGES_PER_FILE = 4


def write_corpus(folder: Path, passages: int) -> None:
    """Files of PASSAGES_PER_FILE paragraphs, each a passage of its own (chunk_chars 200), all holding 'alpha'."""
    folder.mkdir(parents=True)
    for f in range(passages // PASSAGES_PER_FILE):
        paragraphs = [f"alpha report {f} part {p}: " + "lorem ipsum dolor sit amet consectetur " * 4 for p in range(PASSAGES_PER_FILE)]
        (folder / f"note-{f:06d}.md").write_text(f"# Note {f}\n\n" + "\n\n".join(paragraphs), encoding="utf-8")


def shapes() -> dict[str, list[dict]]:
    """Filters at the limits, under `or`, that no passage passes: every condition is tested on every passage."""
    per_field = MAX_FILTER_TESTS // MAX_FILTER_FIELDS
    return {
        f"{MAX_FILTER_FIELDS} conditions x 1 name x {per_field} values (contains)": [
            {"name": ["title"], "comparison_operator": "contains", "value": [f"zz{c}-{v}" for v in range(per_field)]}
            for c in range(MAX_FILTER_FIELDS)
        ],
        f"2 conditions x 1 name x {MAX_VALUES_PER_CONDITION} values (contains)": [
            {"name": ["path"], "comparison_operator": "contains", "value": [f"zz{c}-{v}" for v in range(MAX_VALUES_PER_CONDITION)]}
            for c in range(MAX_FILTER_TESTS // MAX_VALUES_PER_CONDITION)
        ],
        f"{MAX_FILTER_FIELDS} conditions x 1 name (before, a date)": [
            {"name": ["updated_at"], "comparison_operator": "before", "value": "1990-01-01"} for _ in range(MAX_FILTER_FIELDS)
        ],
        f"{MAX_FILTER_FIELDS // 32} conditions x 32 names, missing fields (is)": [
            {"name": [f"field{c}-{n}" for n in range(32)], "comparison_operator": "is", "value": "x"} for c in range(MAX_FILTER_FIELDS // 32)
        ],
        f"{MAX_FILTER_FIELDS} conditions x 1 name, chunk_index read (≥)": [
            {"name": ["chunk_index"], "comparison_operator": "≥", "value": 1000 + c} for c in range(MAX_FILTER_FIELDS)
        ],
    }


def health_while(url: str, done: threading.Event) -> list[float]:
    """Ask /healthz back to back until `done`; the latency of each answer, in ms."""
    latencies = []
    with httpx.Client(timeout=60) as client:
        while not done.is_set():
            started = time.perf_counter()
            client.get(url + "/healthz").raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def measure(url: str, condition: list[dict] | None) -> tuple[float, str, list[float]]:
    fields = {} if condition is None else {"metadata_condition": {"logical_operator": "or", "conditions": condition}}
    done = threading.Event()
    latencies: list[float] = []
    checker = threading.Thread(target=lambda: latencies.extend(health_while(url, done)))
    checker.start()
    started = time.perf_counter()
    response = ask(url, "alpha report", "kb", top_k=4, key=KEY, timeout=120, **fields)
    elapsed = time.perf_counter() - started
    done.set()
    checker.join()
    if response.status_code != 200:
        raise SystemExit(f"the gateway answered {response.status_code}: {response.text}")
    return elapsed, response.headers.get("X-Sources", ""), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--deadline", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        write_corpus(root / "docs", args.passages)
        config = root / "connectors.yaml"
        config.write_text(
            f"server:\n  api_keys: [{{key: {KEY}}}]\n  deadline_s: {args.deadline}\n  cache_ttl_s: 0\n  state_dir: {root / 'state'}\n"
            f"knowledge_bases:\n  kb: {{connectors: [docs]}}\n"
            f"connectors:\n  docs: {{type: files, path: '{root / 'docs'}', watch: false, chunk_chars: 200, timeout_s: {args.deadline}}}\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_ready(url, timeout=900, process=process)  # the first sync indexes every passage
            status = httpx.get(url + "/status").json()
            indexed = sum((source.get("index") or {}).get("passages", 0) for source in status["sources"])
            print(f"# bench/filters.py: {indexed} passages indexed in {time.perf_counter() - started:.0f} s; deadline {args.deadline} s\n")
            print("| filter | answer (s) | source outcome | /healthz answers meanwhile | p50 (ms) | max (ms) |")
            print("| --- | ---: | --- | ---: | ---: | ---: |")
            rows = [("none (baseline)", None)] + list(shapes().items())
            for label, condition in rows:
                measure(url, condition)  # warm: terms and metadata cached as a repeated query would find them
                elapsed, sources, latencies = measure(url, condition)
                p50 = statistics.median(latencies) if latencies else float("nan")
                print(f"| {label} | {elapsed:.2f} | {sources} | {len(latencies)} | {p50:.1f} | {max(latencies, default=float('nan')):.1f} |")
        finally:
            stop(process)


if __name__ == "__main__":
    main()
