"""The rerank model stage: each provider's shape against a loopback fake, failures that fall back to the fusion,
the deadline, the score mapping, and its settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from aggregator.runtime.config import ConfigError, parse_config
from aggregator.ranking.rerank import Candidate, Ranked
from aggregator.retrieval.rerank_model import (
    RerankModel, RerankModels, Reranked, RerankSettings, describe_error, parse_scores, request_body, stage_detail,
)  # fmt: skip
from connectors.base import BadResponse, Passage

from testkit.fakes import rerank as fake_rerank
from testkit.loopback import serve

KEY = "rerank-secret-key-42"
TEXTS = ["alpha about cats", "beta about dogs", "gamma about keys", "delta about vpn", "epsilon about leave"]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, fake_rerank.FakeRerank]]:
    state = fake_rerank.FakeRerank()
    with serve(fake_rerank.app(state)) as url:
        yield url, state


@pytest.fixture
def fake(server) -> Iterator[tuple[str, fake_rerank.FakeRerank]]:
    url, state = server
    state.reset()
    yield url, state
    state.reset()


def fused(texts: list[str] = TEXTS) -> list[Ranked]:
    """A fused ranking in the given order, with falling scores 0.9, 0.8, …"""
    return [Ranked(Candidate(Passage(t, f"t{i}", f"d{i}"), "src", "files", 1.0), round(0.9 - 0.1 * i, 6), 0.0, 0.0) for i, t in enumerate(texts)]


def model(url: str, provider: str = "tei", **fields) -> RerankModel:
    settings = {"provider": provider, "url": url, "model": None if provider == "tei" else "bge-reranker-v2-m3", **fields}
    return RerankModel(RerankSettings.model_validate(settings))


async def reorder(m: RerankModel, ranking: list[Ranked] | None = None, deadline_in: float = 3.0):
    loop = asyncio.get_running_loop()
    try:
        order, outcome = await m.reorder("which keys", ranking if ranking is not None else fused(), loop.time() + deadline_in)
        return list(order), outcome
    finally:
        await m.aclose()


# -- each provider's documented shape ----------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "prefix", "path"), [
    ("cohere", "/cohere", "/cohere/v2/rerank"),
    ("cohere", "/cohere/v1", "/cohere/v1/rerank"),
    ("jina", "/jina", "/jina/v1/rerank"),
    ("xinference", "/xinference", "/xinference/v1/rerank"),
    ("vllm", "/vllm", "/vllm/v1/rerank"),
    ("vllm", "/vllm/rerank", "/vllm/rerank"),
    ("tei", "/tei", "/tei/rerank"),
])  # fmt: skip
async def test_each_provider_is_asked_in_its_shape_and_its_order_wins(fake, provider, prefix, path):
    url, state = fake
    state.api_key = KEY
    state.relevance = {"keys": 0.97, "vpn": 0.6}
    order, outcome = await reorder(model(url + prefix, provider, api_key=KEY))
    assert outcome.name == "rerank" and outcome.outcome == "ok" and outcome.attempts == 1, outcome
    assert [r.candidate.passage.content for r in order[:2]] == ["gamma about keys", "delta about vpn"]
    assert [r.score for r in order[:2]] == [0.97, 0.6], "the model's relevance is the record's score"
    scores = [r.score for r in order]
    assert scores == sorted(scores, reverse=True)
    sent_path, headers, body = state.requests[-1]
    assert sent_path == path and headers["authorization"] == f"Bearer {KEY}"
    if provider == "tei":
        assert body == {"query": "which keys", "texts": TEXTS, "raw_scores": False, "truncate": True}
    else:
        assert body["model"] == "bge-reranker-v2-m3" and body["query"] == "which keys"
        assert body["documents"] == TEXTS and body["top_n"] == len(TEXTS)
        assert ("return_documents" in body) == (provider == "jina")


async def test_a_user_and_password_in_the_url_are_sent_as_basic_auth_and_kept_out_of_messages(fake):
    url, state = fake
    state.fail_next = 1
    _, outcome = await reorder(model(url.replace("http://", "http://ops:pa55word@") + "/tei"))
    assert state.requests[-1][1]["authorization"] == "Basic b3BzOnBhNTV3b3Jk" and state.requests[-1][0] == "/tei/rerank"
    assert outcome.outcome == "error" and "pa55word" not in outcome.error and "ops@" not in outcome.error


async def test_only_the_top_n_are_sent_and_the_rest_follow_below_the_judged(fake):
    url, state = fake
    state.relevance = {"beta": 0.4, "alpha": 0.3}
    order, outcome = await reorder(model(url + "/tei", top_n=2))
    assert outcome.outcome == "ok" and state.requests[-1][2]["texts"] == TEXTS[:2]
    assert [r.candidate.passage.content for r in order] == ["beta about dogs", "alpha about cats"] + TEXTS[2:]
    assert [r.score for r in order] == [0.4, 0.3, 0.3, 0.3, 0.3], "unjudged passages are capped at the lowest judged score"
    assert stage_detail(order[0]) == {"rerank": 0.4, "fused": 0.8} and stage_detail(order[2]) == {"rerank": None, "fused": 0.7}


async def test_passages_are_clipped_to_max_chars(fake):
    url, state = fake
    await reorder(model(url + "/tei", max_chars=100), fused(["x" * 500, "y"]))
    assert [len(t) for t in state.requests[-1][2]["texts"]] == [100, 1]


async def test_weight_blends_the_model_with_the_fusion(fake):
    url, state = fake
    state.relevance = {"epsilon": 1.0}
    order, _ = await reorder(model(url + "/tei", weight=0.5))
    assert order[0].candidate.passage.content == "epsilon about leave" and order[0].score == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert order[1].score == pytest.approx(0.5 * 0.05 + 0.5 * 0.9)


async def test_logits_are_mapped_to_probabilities_and_stray_scores_clipped(fake):
    url, state = fake
    state.logits, state.relevance = True, {"keys": 0.9}
    order, _ = await reorder(model(url + "/tei", scores="logit"))
    assert order[0].candidate.passage.content == "gamma about keys" and order[0].score == pytest.approx(0.9, abs=1e-6)
    order, _ = await reorder(model(url + "/tei"))  # the same logits read as probabilities: outside [0, 1], clipped
    assert all(0.0 <= r.score <= 1.0 for r in order)


# -- failures fall back to the fusion ------------------------------------------------------------------------


def assert_fusion_kept(order: list[Ranked]) -> None:
    assert [r.candidate.passage.content for r in order] == TEXTS
    assert [r.score for r in order] == [r.score for r in fused()]
    assert not any(isinstance(r, Reranked) for r in order)


@pytest.mark.parametrize("provider", ["cohere", "jina", "xinference", "vllm", "tei"])
async def test_an_error_status_keeps_the_fusion_and_says_why(fake, provider):
    url, state = fake
    state.fail_next, state.fail_status = 1, 500
    order, outcome = await reorder(model(f"{url}/{provider}", provider, api_key="k"))
    assert_fusion_kept(order)
    assert outcome.outcome == "error" and "HTTP 500" in outcome.error and "CUDA out of memory" in outcome.error


async def test_a_refused_key_is_auth_failed_and_the_key_never_shows(fake):
    url, state = fake
    state.api_key = "the-right-one"
    order, outcome = await reorder(model(url + "/cohere", "cohere", api_key=KEY))
    assert_fusion_kept(order)
    assert outcome.outcome == "auth_failed" and KEY not in (outcome.error or "")


async def test_a_429_with_a_long_retry_after_gives_up_at_once(fake):
    url, state = fake
    state.rate_limit_next, state.retry_after = 1, "30"
    started = time.perf_counter()
    order, outcome = await reorder(model(url + "/jina", "jina", api_key="k", retries=2))
    assert_fusion_kept(order)
    assert outcome.outcome == "rate_limited" and outcome.attempts == 1 and time.perf_counter() - started < 1.0


async def test_a_429_whose_retry_after_fits_is_retried(fake):
    url, state = fake
    state.rate_limit_next, state.retry_after, state.relevance = 1, "0.1", {"vpn": 0.8}
    order, outcome = await reorder(model(url + "/tei", retries=1))
    assert outcome.outcome == "ok" and outcome.attempts == 2 and order[0].candidate.passage.content == "delta about vpn"


async def test_a_slow_model_times_out_within_its_budget(fake):
    url, state = fake
    state.delay_s = 2.0
    started = time.perf_counter()
    order, outcome = await reorder(model(url + "/tei", timeout_s=0.3))
    elapsed = time.perf_counter() - started
    assert_fusion_kept(order)
    assert outcome.outcome == "timeout" and 0.25 < elapsed < 0.8, elapsed


async def test_the_request_deadline_bounds_the_call_and_no_time_left_means_no_call(fake):
    url, state = fake
    state.delay_s = 2.0
    started = time.perf_counter()
    _, outcome = await reorder(model(url + "/tei", timeout_s=1.0), deadline_in=0.2)
    assert outcome.outcome == "timeout" and time.perf_counter() - started < 0.6
    calls = len(state.requests)
    order, outcome = await reorder(model(url + "/tei"), deadline_in=-0.01)
    assert_fusion_kept(order)
    assert outcome.outcome == "timeout" and "no time left" in outcome.error and len(state.requests) == calls


@pytest.mark.parametrize("provider", ["cohere", "tei"])
async def test_a_malformed_answer_keeps_the_fusion(fake, provider):
    url, state = fake
    state.malformed = True
    order, outcome = await reorder(model(f"{url}/{provider}", provider, api_key="k"))
    assert_fusion_kept(order)
    assert outcome.outcome == "error" and "out of range" in outcome.error


async def test_a_model_that_is_down_is_unavailable_then_skipped_by_its_circuit(fake):
    url, _ = fake
    m = RerankModel(RerankSettings.model_validate({"provider": "tei", "url": "http://127.0.0.1:9", "circuit": {"failures": 2, "cooldown_s": 60}}))
    loop = asyncio.get_running_loop()
    outcomes = []
    for _ in range(3):
        order, result = await m.reorder("q", fused(), loop.time() + 2)
        assert_fusion_kept(list(order))
        outcomes.append(result.outcome)
    await m.aclose()
    assert outcomes == ["error", "error", "skipped"]
    assert m.reserve_s == 0.0, "no time is kept from the sources for a stage that will be skipped"
    assert model("http://127.0.0.1:9", timeout_s=0.7).reserve_s == 0.7


async def test_nothing_to_judge_is_empty_and_costs_no_call(fake):
    url, state = fake
    order, outcome = await reorder(model(url + "/tei"), [])
    assert order == [] and outcome.outcome == "empty" and state.requests == []


# -- shapes read strictly -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    {"results": [{"index": 0, "relevance_score": float("nan")}]},
    {"results": [{"index": 0, "relevance_score": 0.5}, {"index": 0, "relevance_score": 0.4}]},
    {"results": [{"index": "0", "relevance_score": 0.5}]},
    {"results": [{"index": 0, "relevance_score": True}]},
    {"results": {"index": 0}},
    {"data": []},
    [{"index": 0, "relevance_score": 0.5}],
])  # fmt: skip
def test_answers_that_are_not_the_documented_shape_are_refused(data):
    with pytest.raises(BadResponse):
        parse_scores(data, 2, "cohere", "POST x")


def test_tei_answers_are_a_list_of_index_and_score():
    assert parse_scores([{"index": 1, "score": 0.9}, {"index": 0, "score": 0.1}], 2, "tei", "x") == {1: 0.9, 0: 0.1}
    with pytest.raises(BadResponse):
        parse_scores({"results": []}, 2, "tei", "x")


def test_error_envelopes_are_read_for_the_message():
    assert describe_error(400, {"message": "bad model"}, "x") == "bad model"
    assert describe_error(400, {"detail": "Model not found"}, "x") == "Model not found"
    assert describe_error(400, {"error": {"message": "too long", "code": 400}}, "x") == "too long"
    assert describe_error(413, {"error": "Input validation error", "error_type": "validation"}, "x") == "Input validation error"
    assert describe_error(500, None, "x") is None


def test_request_bodies():
    s = RerankSettings(provider="cohere", model="rerank-v3.5", api_key="k")
    assert request_body(s, "q", ["a", "b"]) == {"model": "rerank-v3.5", "query": "q", "documents": ["a", "b"], "top_n": 2}
    assert request_body(RerankSettings(provider="tei", url="http://t"), "q", ["a"])["texts"] == ["a"]
    logits = RerankSettings(provider="tei", url="http://t", scores="logit")
    assert request_body(logits, "q", ["a"])["raw_scores"] is True, "TEI's logits, mapped once by the gateway"


# -- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "url", "endpoint"), [
    ("cohere", None, "https://api.cohere.com/v2/rerank"),
    ("cohere", "https://api.cohere.com/v1", "https://api.cohere.com/v1/rerank"),
    ("jina", None, "https://api.jina.ai/v1/rerank"),
    ("jina", "https://api.jina.ai/v1/", "https://api.jina.ai/v1/rerank"),
    ("xinference", "http://xinference:9997", "http://xinference:9997/v1/rerank"),
    ("vllm", "http://vllm:8000/rerank", "http://vllm:8000/rerank"),
    ("tei", "http://tei:8080", "http://tei:8080/rerank"),
])  # fmt: skip
def test_the_endpoint_follows_the_url_as_dify_users_write_it(provider, url, endpoint):
    settings = RerankSettings.model_validate({"provider": provider, "url": url, "model": "m", "api_key": "k"})
    assert settings.endpoint() == endpoint


def config_text(server_rerank: str = "", kb_rerank: str = "", connector: str = "docs") -> str:
    return f"""
server:
  api_keys: [{{key: k}}]
  deadline_s: 4
{server_rerank}
knowledge_bases:
  a: {{connectors: [{connector}]}}
  b:
    connectors: [{connector}]
{kb_rerank}
connectors:
  {connector}: {{type: files, path: /tmp}}
"""


def test_a_knowledge_base_overrides_fields_of_the_servers_model_or_turns_it_off():
    server = "  rerank: {provider: cohere, model: rerank-v3.5, api_key: '${COHERE_KEY}', top_n: 30}"
    config = parse_config(config_text(server, "    rerank: {top_n: 5}"), {"COHERE_KEY": KEY})
    a, b = config.rerank_for("a"), config.rerank_for("b")
    assert (a.top_n, b.top_n, b.model, b.api_key.get_secret_value()) == (30, 5, "rerank-v3.5", KEY)
    assert KEY in config.secrets()
    assert parse_config(config_text(server, "    rerank: {enabled: false}"), {"COHERE_KEY": KEY}).rerank_for("b") is None
    only_b = parse_config(config_text("", "    rerank: {provider: tei, url: 'http://tei:8080'}"), {})
    assert only_b.rerank_for("a") is None and only_b.rerank_for("b").provider == "tei"
    models = RerankModels({kb: only_b.rerank_for(kb) for kb in only_b.knowledge_bases})
    assert models.get("a") is None and models.get("b") is not None and models.stages == {"rerank": "rerank-model"}


def test_another_provider_for_one_knowledge_base_does_not_inherit_the_servers_key():
    server = "  rerank: {provider: cohere, model: rerank-v3.5, api_key: secret-cohere}"
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(server, "    rerank: {provider: jina, model: jina-reranker-v2-base-multilingual}"), {})
    assert caught.value.errors == ["knowledge_bases.b.rerank: Value error, api_key: field required for the hosted jina API"]
    tei = parse_config(config_text(server, "    rerank: {provider: tei, url: 'http://tei:8080'}"), {}).rerank_for("b")
    assert tei.api_key is None


@pytest.mark.parametrize(("server", "kb", "connector", "error"), [
    ("  rerank: {provider: tei}", "", "docs", "server.rerank: Value error, url: field required for provider tei"),
    ("  rerank: {provider: vllm, url: 'http://v'}", "", "docs", "server.rerank: Value error, model: field required for provider vllm"),
    ("  rerank: {provider: openai, url: 'http://v'}", "", "docs", "server.rerank.provider: Input should be"),
    ("  rerank: {provider: tei, url: 'http://t', topn: 3}", "", "docs", "server.rerank.topn: unknown key"),
    ("  rerank: {provider: tei, url: 'ftp://t'}", "", "docs", "server.rerank.url: Value error, must be an http:// or https:// URL"),
    ("  rerank: {provider: tei, url: 'http://t', top_n: 0}", "", "docs", "server.rerank.top_n: Input should be greater than or equal to 1"),
    ("  rerank: {provider: tei, url: 'http://t', timeout_s: 2.5}", "", "docs", "server.rerank.timeout_s: at most half of server.deadline_s"),
    ("", "    rerank: {top_n: 3}", "docs", "knowledge_bases.b.rerank: Value error, provider: field required"),
    ("", "    rerank: {provider: tei, url: 'http://t', timeout_s: 3}", "docs", "knowledge_bases.b.rerank.timeout_s: at most half"),
    ("  rerank: {provider: tei, url: 'http://t'}", "", "rerank", "connectors.rerank: this name reports the rerank model's outcome"),
])  # fmt: skip
def test_settings_errors_name_their_place(server, kb, connector, error):
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(server, kb, connector), {})
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_a_connector_may_be_named_rerank_while_no_model_is_configured():
    assert parse_config(config_text(connector="rerank"), {}).rerank_for("a") is None


def test_settings_are_validated_on_their_own_too():
    with pytest.raises(ValidationError):
        RerankSettings(provider="jina", model="m")  # the hosted API needs its key
    assert RerankSettings(enabled=False).provider is None


def test_the_readme_example_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "provider: xinference" in b)
    data = yaml.safe_load(block)
    names = {n for kb in data["knowledge_bases"].values() for n in kb["connectors"]}
    text = block.replace("server:\n", "server:\n  api_keys: [{key: k}]\n", 1) + "connectors:\n" + "".join(
        f"  {n}: {{type: files, path: /tmp}}\n" for n in sorted(names)
    )
    config = parse_config(text, {"RERANK_API_KEY": KEY})
    assert config.rerank_for("eng-docs").top_n == 10 and config.rerank_for("eng-docs").model == "bge-reranker-v2-m3"
    assert config.rerank_for("archive") is None
    assert config.rerank_for("eng-docs").endpoint() == "http://xinference:9997/v1/rerank"
