"""Scoring behaviour the users rely on: scores in [0, 1], comparable, monotone, and good on Chinese too."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.ranking.pool import TermCache
from aggregator.ranking.rerank import Answer, fuse, rerank
from aggregator.runtime.gateway import Gateway
from aggregator.text.tokenize import tokenize
from connectors.base import Passage

from testkit.gateway import ask_gateway

from .conftest import make_config, write_docs

# Known-item Chinese check: each query must find its own document first.
CHINESE_DOCS = {
    "leave.md": "# 年假申请\n\n员工每年有十五天带薪年假，需要提前五个工作日在人事系统中提交申请，由直属经理审批。",
    "expense.md": "# 差旅报销\n\n出差回来三十天内提交报销单，附上发票和行程单。超过两千元需要财务审核。",
    "vpn.md": "# 远程办公网络\n\n在家办公时通过公司虚拟专用网络访问内部系统，首次使用需要在门户下载配置文件。",
    "keys.md": "# 签名密钥轮换\n\n发布签名密钥每十二个月轮换一次，新密钥在硬件安全模块中生成，旧密钥随后吊销。",
    "backup.md": "# 数据库备份\n\n生产数据库每天凌晨两点做全量备份，预写日志持续归档，可以恢复到三十五天内任意时间点。",
    "oncall.md": "# 值班手册\n\n收到告警后五分钟内确认，建立事故频道，按照告警中的运行手册处理，事后写复盘报告。",
    "wifi.md": "# 办公室无线网络\n\n员工连接 Corp-WiFi 并用公司账号登录，访客使用 Guest-WiFi，密码每周一更新。",
    "review.md": "# 代码评审\n\n每个合并到主干的改动都需要一位同事批准，涉及安全的代码还需要安全团队评审。",
    "japanese.md": "# 経費精算の手順\n\n出張後三十日以内に経費精算システムで申請し、領収書を添付してください。",
}
CHINESE_QUERIES = {
    "年假怎么申请": "leave.md",
    "出差报销需要什么材料": "expense.md",
    "在家怎么访问内部系统": "vpn.md",
    "签名密钥多久轮换一次": "keys.md",
    "数据库能恢复到什么时间": "backup.md",
    "收到告警以后怎么办": "oncall.md",
    "访客无线网络密码": "wifi.md",
    "代码合并需要谁批准": "review.md",
    "経費精算はいつまでに申請しますか": "japanese.md",
}


def passage(text: str, score: float | None = None, rank: int | None = None, title: str = "") -> Passage:
    return Passage(text, title, text[:10], source_score=score, source_rank=rank)


@pytest.fixture
async def chinese_gateway(tmp_path: Path):
    gateway = Gateway(make_config(write_docs(tmp_path / "zh", CHINESE_DOCS)))
    await gateway.start()
    await gateway.slots["docs"].connector.wait_ready(10)
    yield gateway
    await gateway.aclose()


async def ask(gateway: Gateway, query: str, top_k: int = 3, threshold: float = 0.0) -> list[dict]:
    return (await ask_gateway(gateway, query, top_k=top_k, threshold=threshold)).records


@pytest.mark.parametrize("query,expected", CHINESE_QUERIES.items())
async def test_chinese_and_japanese_known_items_rank_first(chinese_gateway, query, expected):
    records = await ask(chinese_gateway, query)
    assert records and records[0]["metadata"]["document_id"] == f"docs:{expected}"


def test_scores_are_deterministic_and_in_range():
    passages = [passage(f"rotate the signing keys, step {i}. " * (i + 1), 0.1 * i) for i in range(8)]
    first = [(r.candidate.passage.content, r.score) for r in rerank("rotate signing keys", [Answer("s", "t", passages)])]
    second = [(r.candidate.passage.content, r.score) for r in rerank("rotate signing keys", [Answer("s", "t", passages[::-1])])]
    assert sorted(first) == sorted(second)
    assert all(0.0 <= s <= 1.0 for _, s in first)


def test_fusion_is_monotone_in_every_input():
    grid = [i / 10 for i in range(11)]
    for weight in (0.5, 1.0, 2.0):
        for other in grid:
            along_relevance = [float(fuse(x, other, weight)) for x in grid]
            along_source = [float(fuse(other, x, weight)) for x in grid]
            for series in (along_relevance, along_source):
                assert series == sorted(series)
                assert all(0.0 <= v <= 1.0 for v in series)
    assert float(fuse(0.0, 0.0, 2.0)) == 0.0 and float(fuse(1.0, 1.0, 0.5)) == 1.0
    assert float(fuse(0.4, None, 1.0)) == float(fuse(0.4, 0.4, 1.0)), "no source score: the relevance alone"


def test_weight_lifts_a_source_without_changing_its_own_order():
    scores = [0.1, 0.3, 0.6]
    light = [float(fuse(s, s, 1.0)) for s in scores]
    heavy = [float(fuse(s, s, 2.0)) for s in scores]
    assert heavy == sorted(heavy) and all(h > l for h, l in zip(heavy, light))


def test_a_weak_match_is_not_promoted_by_a_weak_pool():
    """The best of a pool that only shares one common word with the query still scores low."""
    weak = [passage(f"the weekly team lunch menu number {i}") for i in range(5)]
    strong = [passage("how to rotate the release signing keys in the hardware security module")]
    query = "rotate release signing keys hardware module"
    best_weak = rerank(query + " lunch", [Answer("s", "t", weak)])[0].score
    best_strong = rerank(query, [Answer("s", "t", strong + weak)])[0].score
    assert best_weak < 0.5 < best_strong


def test_a_query_with_no_known_word_scores_zero():
    ranked = rerank("zzqx vvkw", [Answer("s", "t", [passage("anything at all")])])
    assert ranked[0].score == 0.0


def test_phrase_order_counts():
    together = passage("guide: signing keys rotation policy for releases and builds")
    apart = passage("guide: keys rotation policy, signing of releases and builds")
    ranked = rerank("signing keys", [Answer("s", "t", [apart, together])])
    assert ranked[0].candidate.passage is together and ranked[0].proximity > ranked[1].proximity == 0.0


def test_duplicates_are_merged_under_the_source_that_vouches_most():
    meta_a: dict = {"source": "a"}
    meta_b: dict = {"source": "b"}
    text = "rotate the signing keys every year"
    a = Answer("a", "files", [passage("rotate keys, a checklist", rank=1), passage("Rotate the signing   KEYS every year", rank=2)],
               metadata=[{}, meta_a])  # fmt: skip
    b = Answer("b", "dify", [passage(text, rank=1), passage("an unrelated page about lunch", rank=2)], metadata=[meta_b, {}])
    ranked = rerank("rotate signing keys", [a, b])
    assert len(ranked) == 3, "the same text from two sources is one record"
    top = ranked[0]
    assert top.candidate.source == "b", "b ranks it first, a only second: b vouches more"
    assert top.also_in == ["a"] and top.candidate.metadata is meta_b


async def test_threshold_keeps_only_records_at_or_above_it(chinese_gateway):
    everything = await ask(chinese_gateway, "密钥 轮换 备份 报销", top_k=10)
    assert len(everything) >= 3
    cut = everything[1]["score"]
    kept = await ask(chinese_gateway, "密钥 轮换 备份 报销", top_k=10, threshold=cut)
    assert kept == everything[: len(kept)] and all(r["score"] >= cut for r in kept) and len(kept) >= 2


def test_term_cache_reuses_tokenized_passages():
    cache = TermCache(capacity=2)
    popular = cache.seen("t", "a popular passage")
    assert cache.seen("t", "a popular passage") is popular, "tokenized once"
    cache.seen("t", "one-off a")
    cache.seen("t", "one-off b")
    assert cache.seen("t", "a popular passage") is popular, "a passage met again outlives those met once"
    for i in range(4):
        cache.seen("t", f"filler {i}")
    assert cache.seen("t", "a popular passage") is not popular, "not met for a while: evicted"
    assert len(cache._seen) <= 2


def test_a_pool_scores_the_same_whatever_was_scored_before():
    from aggregator.ranking.pool import QueryPlan, score_pool

    texts = ["rotate the signing keys", "signing keys in the module", "lunch menu and keys", "vpn profile rotate"]
    shared = TermCache()
    docs = [shared.seen("", t).ids for t in texts]
    score_pool(QueryPlan(tokenize("lunch menu vpn"), shared.vocabulary), docs, shared)
    after = score_pool(QueryPlan(tokenize("rotate signing keys"), shared.vocabulary), docs, shared)
    fresh = TermCache()
    fresh_docs = [fresh.seen("", t).ids for t in texts]
    alone = score_pool(QueryPlan(tokenize("rotate signing keys"), fresh.vocabulary), fresh_docs, fresh)
    assert after.bm25.tolist() == alone.bm25.tolist() and after.proximity.tolist() == alone.proximity.tolist()


WORDS = "rotate signing keys release vpn profile backup restore the of module hardware lunch".split()


@settings(max_examples=200, deadline=None)
@given(
    query=st.lists(st.sampled_from(WORDS + ["zzqx"]), min_size=1, max_size=8),
    texts=st.lists(st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join), min_size=1, max_size=12),
    collection=st.one_of(st.none(), st.tuples(st.floats(0.0, 1e6), st.one_of(st.just(0.0), st.floats(1.0, 500.0)), st.integers(0, 10**6))),
)
def test_the_compiled_counts_are_the_numpy_counts_so_the_scores_are_the_same(query, texts, collection):
    """The C loop (when built) and numpy count the same terms and pairs; the scores come from one formula, so they match to the bit."""
    from aggregator.ranking import pool
    from aggregator.ranking.statistics import QueryStatistics

    if pool._kernel is None:
        pytest.skip("the compiled counter was not built (no C compiler): numpy counts alone")
    cache = TermCache()
    docs = [cache.seen("", t).ids for t in texts]
    terms = tokenize(" ".join(query))
    statistics = None
    if collection is not None:
        passages, average, seed = collection
        distinct = list(dict.fromkeys(terms))
        statistics = QueryStatistics(passages, average, array("d", [float((seed >> i) % 50) for i in range(len(distinct))]))
    plan = pool.QueryPlan(terms, cache.vocabulary)
    if plan.terms:
        table = cache.columns(plan.ids)
        compiled, reference = pool._count_compiled(plan, docs, table), pool._count_numpy(plan, docs, table)
        cache.release(plan.ids)
        assert compiled.k == reference.k == len(plan.terms)
        assert compiled.rows.tolist() == reference.rows.tolist() and compiled.lengths.tolist() == reference.lengths.tolist()
    compiled_scores = pool.score_pool(plan, docs, cache, statistics=statistics)
    reference_scores = pool.score_pool(plan, docs, cache, statistics=statistics, compiled=False)
    assert compiled_scores.has_pairs == reference_scores.has_pairs
    assert compiled_scores.bm25.tolist() == reference_scores.bm25.tolist()
    assert compiled_scores.proximity.tolist() == reference_scores.proximity.tolist()


@settings(max_examples=200, deadline=None)
@given(
    query=st.lists(st.sampled_from(WORDS + ["zzqx"]), min_size=1, max_size=8),
    texts=st.lists(st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join), min_size=1, max_size=12),
)
def test_the_pool_scores_are_the_documented_formula(query, texts):
    """score_pool against the formula of README's Ranking section written out term by term, pair by pair."""
    import math

    from aggregator.ranking import pool
    from aggregator.ranking.bm25 import B, K1

    cache = TermCache()
    tokens = [tokenize(t) for t in texts]
    docs = [cache.seen("", t).ids for t in texts]
    terms = tokenize(" ".join(query))
    scores = pool.score_pool(pool.QueryPlan(terms, cache.vocabulary), docs, cache)
    n, avgdl = len(texts), (sum(map(len, tokens)) / len(texts)) or 1.0

    def bm25(units: list, counts_in: list[list]) -> list[float]:
        weight = {u: units.count(u) * math.log1p((n - sum(u in c for c in counts_in) + 0.5) / (sum(u in c for c in counts_in) + 0.5))
                  for u in units}  # fmt: skip
        ceiling = sum(weight.values()) * (K1 + 1)
        return [sum(w * c.count(u) * (K1 + 1) / (c.count(u) + K1 * (1 - B + B * len(t) / avgdl)) for u, w in weight.items()) / ceiling
                if ceiling > 0 else 0.0 for c, t in zip(counts_in, tokens)]  # fmt: skip

    np.testing.assert_allclose(scores.bm25, bm25(terms, tokens), rtol=1e-12, atol=1e-15)
    pairs = [(a, b) for a, b in zip(terms, terms[1:]) if a != b]
    if pairs:
        adjacent = [list(zip(t, t[1:])) for t in tokens]
        np.testing.assert_allclose(scores.proximity, bm25(pairs, adjacent), rtol=1e-12, atol=1e-15)
    else:
        assert not scores.has_pairs and not scores.proximity.any()


def test_the_kernel_is_built_wherever_there_is_a_c_compiler():
    """The extension is optional, so a failed build only warns: where a compiler exists, its absence is a bug."""
    import shutil
    import sysconfig

    from aggregator.ranking import pool

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the numpy and Python reference runs, as documented")
    assert pool._kernel is not None, "a C compiler is here but aggregator/ranking/_kernel.c was not built: pip install -e . again"


def test_the_kernel_refuses_inconsistent_input_instead_of_reading_past_it():
    """Internal callers never pass such input; if one ever did, it must be an exception, not a crash or garbage."""
    from aggregator.ranking import pool

    if pool._kernel is None:
        pytest.skip("the compiled kernel was not built (no C compiler)")
    count = pool._kernel.count
    plan = pool.QueryPlan(["key"], {"key": 0})
    table = np.array([1], dtype=np.int32)
    with pytest.raises(ValueError, match="whole number of int32"):
        count([b"\x00\x00\x00"], table, 1, plan.pair_index, 0, np.empty((1, 1)), np.empty(1))
    with pytest.raises(ValueError):
        count([b"\x00" * 4], table, 1, plan.pair_index, 0, np.empty((1, 1)), np.empty(2))  # lengths for two passages
    with pytest.raises(ValueError):
        count([b"\x00" * 4], table, 1, plan.pair_index, 1, np.empty((1, 1)), np.empty(1))  # no row for the pair
    with pytest.raises(ValueError):
        count([b"\x00" * 4], table, 2, plan.pair_index, 0, np.empty((2, 1)), np.empty(1))  # pair_index of one term, not two
    with pytest.raises(ValueError):
        count([b"\x00" * 4], table, -1, plan.pair_index, 0, np.empty((1, 1)), np.empty(1))
    with pytest.raises(TypeError):
        count((b"\x00" * 4,), table, 1, plan.pair_index, 0, np.empty((1, 1)), np.empty(1))  # a tuple, not a list
    rows = np.empty((1, 1))
    count([b"\x05\x00\x00\x00" + b"\x00" * 4], table, 1, plan.pair_index, 0, rows, lengths := np.empty(1))
    assert rows.tolist() == [[1.0]] and lengths.tolist() == [2.0], "a term id past the table is no query term"
