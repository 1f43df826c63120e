"""What MCP's `search` costs over `POST /retrieval`, on the same requests.

    python -m bench.mcp [--rounds 5] [--per-round 100] [--delay 0]

One gateway process (`aggregator serve`, response cache off so that every request does the whole work) over
three Dify-compatible upstreams (`bench._upstream`, each its own process; `--delay` seconds each, 0: as fast
as loopback allows, the worst case for a fixed per-request overhead). The same requests, one at a time, each
asked in turn of:

- `/retrieval`: httpx posting Dify's body (the baseline);
- MCP over httpx: the same httpx client posting the `tools/call` JSON-RPC message to /mcp, as a stateless
  streamable-HTTP client does: what the gateway's MCP path itself adds;
- MCP through the SDK: the official `mcp` client's `call_tool` on a session kept open, as an agent calls it
  (its client-side work, JSON-RPC framing and result validation, counted too).

The variants take turns every ten requests (the order turning each round), so that the load of other
processes on a shared machine, which comes and goes within seconds, hits them alike. Prints p50 and p99 per variant and the ratio of each p50 to /retrieval's (the
goal: ≤ 1.1), and the gateway process's CPU time per request (from /proc: what each costs the server, which
the load of other processes on the machine moves less than it moves latency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from bench._cpu import cpu_seconds, pct  # noqa: E402
from bench.perf import KEY, processes, upstreams  # noqa: E402
from testkit.loopback import free_port, wait_ready  # noqa: E402

QUERIES = [
    "how do we rotate the release signing keys", "vpn profile expired", "expense policy for meals", "backup and restore",
    "incident postmortem template", "release pipeline signing", "restore a backup after an incident", "rotate keys",
    "pipeline policy", "postmortem of the vpn incident",
]  # fmt: skip
VARIANTS = ("/retrieval", "MCP search over httpx", "MCP search through the SDK client")
HEADERS = {"Authorization": f"Bearer {KEY}"}
MCP_HEADERS = {**HEADERS, "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}


@contextlib.contextmanager
def gateway(urls: list[str]) -> Iterator[tuple[str, int]]:
    connectors = "".join(f"  up{i}: {{type: dify, endpoint: '{u}', api_key: x, knowledge_id: kb, candidates: 20, retries: 0}}\n"
                         for i, u in enumerate(urls))  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "connectors.yaml"
        config.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n  cache_ttl_s: 0\n"
                          f"knowledge_bases:\n  kb: {{connectors: [up0, up1, up2]}}\nconnectors:\n{connectors}")  # fmt: skip
        port = free_port()
        command = [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
        with processes(command) as (server,):
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=30)
            yield url, server.pid


def body(query: str) -> dict:
    return {"knowledge_id": "kb", "query": query, "retrieval_setting": {"top_k": 5, "score_threshold": 0}}


def arguments(query: str) -> dict:
    return {"knowledge_base": "kb", "query": query, "top_k": 5, "score_threshold": 0}


async def measure(url: str, pid: int, rounds: int, per_round: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Latencies (ms) per variant, and the gateway process's CPU per request (µs) per variant."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    async with (
        httpx.AsyncClient(timeout=10) as http,
        httpx2.AsyncClient(headers=HEADERS, timeout=10) as http2,
        Client(streamable_http_client(url + "/mcp", http_client=http2), mode="legacy", cache=None) as sdk,  # type: ignore[arg-type]
    ):
        ids = iter(range(1, 1 << 30))

        async def retrieval(query: str) -> None:
            response = await http.post(url + "/retrieval", json=body(query), headers=HEADERS)
            assert response.status_code == 200 and response.headers["x-sources"].count("=ok") == 3, response.text
            assert response.json()["records"]  # each variant reads its answer once, as its caller would

        async def mcp_raw(query: str) -> None:
            message = {"jsonrpc": "2.0", "id": next(ids), "method": "tools/call", "params": {"name": "search", "arguments": arguments(query)}}
            response = await http.post(url + "/mcp", json=message, headers=MCP_HEADERS)
            result = response.json().get("result") if response.status_code == 200 else None
            assert result is not None and not result["isError"] and result["structuredContent"]["records"], response.text

        async def mcp_sdk(query: str) -> None:
            result = await sdk.call_tool("search", arguments(query))
            assert not result.is_error and result.structured_content["sources"].count("=ok") == 3

        calls = dict(zip(VARIANTS, (retrieval, mcp_raw, mcp_sdk)))
        for call in calls.values():  # warm: connections, the upstreams' answers in the rerank's caches
            for query in QUERIES:
                await call(query)
        for round_ in range(rounds):
            order = VARIANTS[round_ % 3:] + VARIANTS[: round_ % 3]
            for block in range(0, per_round, len(QUERIES)):  # the ten requests of each variant in turn, block by block
                for name in order:
                    cpu_before = cpu_seconds(pid)
                    for query in QUERIES[: per_round - block]:
                        started = time.perf_counter()
                        await calls[name](query)
                        samples[name].append((time.perf_counter() - started) * 1000)
                    cpu[name] += cpu_seconds(pid) - cpu_before
    return samples, {name: seconds / (rounds * per_round) * 1e6 for name, seconds in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.0, help="each upstream's answer time, seconds")
    args = parser.parse_args()
    with upstreams(3, args.delay) as urls, gateway(urls) as (url, pid):
        samples, cpu = asyncio.run(measure(url, pid, args.rounds, args.per_round))
    base = pct(samples[VARIANTS[0]], 0.5)
    print(f"\n## MCP search against /retrieval: the same {len(QUERIES)} requests, three upstreams answering in "
          f"{args.delay * 1000:.0f} ms, cache off, {args.rounds} × {args.per_round} each\n")  # fmt: skip
    print("| variant | p50 ms | p99 ms | p50 ratio to /retrieval | gateway CPU per request, µs | ratio |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in VARIANTS:
        p50 = pct(samples[name], 0.5)
        print(f"| {name} | {p50:.2f} | {pct(samples[name], 0.99):.2f} | {p50 / base:.3f} | {cpu[name]:.0f} | {cpu[name] / cpu[VARIANTS[0]]:.3f} |")


if __name__ == "__main__":
    main()
