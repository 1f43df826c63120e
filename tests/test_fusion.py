"""Fusion when sources disagree about scales: no source's scale decides the ranking, only relevance does."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.ranking.pool import TermCache
from aggregator.ranking.rerank import DEFAULT_FUSION, Answer, Ranked, fuse, rerank
from aggregator.ranking.statistics import PassageSample, merge_term_statistics
from connectors.base import Passage, TermStatistics

QUERY = "rotate the release signing keys"
STRONG = [
    "How to rotate the release signing keys: generate new signing keys in the hardware module, then rotate.",
    "Release signing keys are rotated every twelve months; rotate them earlier after a leak.",
    "Rotating signing keys for a release: revoke the old keys, publish the new release keys.",
]
WEAK = [f"Notes from meeting {i}: the release train, lunch orders and the office plants." for i in range(12)]
MIDDLE = [f"Keys for the office doors, set {i}: rotate the cleaning rota weekly." for i in range(6)]


def source(name: str, texts: list[str], given: list[float] | None, **kwargs: object) -> list[Answer]:
    """One source's answer, in its own order (rank 1 first), with the scores it gave (or none); a list, so `+` pools sources."""
    passages = [Passage(text, "", f"{name}-{i}", source_score=None if given is None else given[i], source_rank=i + 1) for i, text in enumerate(texts)]
    return [Answer(name, "dify", passages, **kwargs)]  # type: ignore[arg-type]


def order(ranked: list[Ranked]) -> list[str]:
    return [r.candidate.passage.content for r in ranked]


def descending(n: int, top: float = 1.0, bottom: float = 0.1) -> list[float]:
    return [top - (top - bottom) * i / max(n - 1, 1) for i in range(n)]


def test_a_source_that_multiplies_its_scores_by_ten_changes_nothing():
    a_texts, b_texts = STRONG[:2] + WEAK[:6], STRONG[2:] + MIDDLE
    a_scores, b_scores = descending(len(a_texts), 0.9, 0.2), descending(len(b_texts), 0.8, 0.3)
    before = rerank(QUERY, source("a", a_texts, a_scores) + source("b", b_texts, b_scores))
    inflated = rerank(QUERY, source("a", a_texts, [10 * s for s in a_scores]) + source("b", b_texts, b_scores))
    shifted = rerank(QUERY, source("a", a_texts, [s - 3.0 for s in a_scores]) + source("b", b_texts, b_scores))
    assert order(before) == order(inflated) == order(shifted)
    assert [r.score for r in before] == pytest.approx([r.score for r in inflated])


def test_a_source_whose_scores_are_all_one_does_not_push_a_better_passage_out():
    loud = source("loud", WEAK, [1.0] * len(WEAK))
    quiet = source("quiet", STRONG[:1], [0.31])
    ranked = rerank(QUERY, loud + quiet)
    assert order(ranked)[0] == STRONG[0], "the real match comes first, whatever the other source claims"
    assert ranked[0].score > 0.5 > max(r.score for r in ranked if r.candidate.source == "loud")


def test_a_source_with_inflated_raw_scores_does_not_take_every_slot():
    raw = source("raw", MIDDLE + WEAK, [12.7 - 0.5 * i for i in range(len(MIDDLE) + len(WEAK))])
    bounded = source("bounded", STRONG, [0.6, 0.5, 0.4])
    top10 = rerank(QUERY, raw + bounded)[:10]
    assert set(order(top10)[:3]) == set(STRONG)


def test_a_rank_only_source_best_passage_can_come_first():
    ranks_only = source("confluence", [STRONG[0], *WEAK[:5]], None)
    scored = source("scored", [STRONG[1], *MIDDLE], descending(7, 0.99, 0.9))
    ranked = rerank(QUERY, ranks_only + scored)
    assert ranked[0].candidate.source == "confluence" and ranked[0].calibration == "ranks"


def test_the_order_within_one_source_is_kept_by_its_calibrated_scores():
    # A source whose order disagrees with the text: its calibration may flatten, never invert.
    texts = WEAK[:4] + STRONG + MIDDLE[:3]
    ranked = rerank(QUERY, source("s", texts, descending(len(texts))))
    by_rank = sorted(ranked, key=lambda r: r.candidate.passage.source_rank)
    calibrated = [r.calibrated for r in by_rank]
    assert all(a >= b for a, b in zip(calibrated, calibrated[1:]))


def test_passages_the_gateway_cannot_tell_apart_keep_their_source_order():
    texts = [f"Signing keys are rotated: see runbook number {n}." for n in ("one", "two", "three", "four")]
    ranked = rerank("rotate signing keys", source("s", texts, descending(4)))
    assert order(ranked) == texts


@pytest.mark.parametrize(
    "scores",
    [[0.7], [5.0, 5.0], [0.9, 0.4], [1.0] * 5, [-2.0, -3.5, -9.0], [1e9, 2.0, -1e9], None],
    ids=["one", "two-tied", "two", "all-equal", "negative", "huge-range", "no-scores"],
)
def test_degenerate_answers_give_finite_scores_in_range(scores):
    texts = (STRONG + MIDDLE)[: len(scores) if scores else 4]
    ranked = rerank(QUERY, source("s", texts, scores) + source("other", WEAK[:3], [0.2, 0.1, 0.05]))
    assert all(0.0 <= r.score <= 1.0 for r in ranked)
    assert all(r.calibrated is None or 0.0 <= r.calibrated <= 1.0 for r in ranked)
    mine = [r for r in ranked if r.candidate.source == "s"]
    assert [r.candidate.passage.source_score for r in sorted(mine, key=lambda r: r.candidate.passage.source_rank)] == (
        scores or [None] * len(texts)
    ), "the raw score is kept as the source gave it"


def test_a_single_answer_is_judged_by_its_text():
    [only] = rerank(QUERY, source("s", STRONG[:1], [0.01]))
    assert only.calibrated == pytest.approx(only.relevance)


def test_distances_are_read_lower_is_better():
    texts = STRONG + WEAK[:5]
    distances = [0.1, 0.2, 0.25, 0.8, 0.85, 0.9, 0.95, 0.99]  # ascending down the list: a distance, not a similarity
    ranked = rerank(QUERY, source("vectors", texts, distances))
    best = max(ranked, key=lambda r: r.calibrated)
    assert best.candidate.passage.source_rank == 1 and best.calibration == "scores"


def test_a_weak_pool_stays_low_whatever_its_source_says():
    ranked = rerank("hardware security module firmware", source("s", WEAK[:6], [1000.0] * 6))
    assert max(r.score for r in ranked) < 0.3


@pytest.mark.parametrize("use,calibration", [("trust", "trusted"), ("rank", "ranks"), ("ignore", "ignored"), ("auto", "scores")])
def test_the_scores_setting_of_a_connector(use, calibration):
    ranked = rerank(QUERY, source("s", STRONG + WEAK[:3], [0.95, 0.9, 0.2, 0.15, 0.1, 0.05], scores=use))
    assert {r.calibration for r in ranked} == {calibration}
    first = next(r for r in ranked if r.candidate.passage.source_rank == 1)
    if use == "trust":
        assert first.calibrated == 0.95
    if use == "ignore":
        assert first.calibrated is None and first.score == pytest.approx(float(fuse(first.relevance, None, 1.0)))


def test_local_collection_statistics_change_how_rare_a_word_is():
    """Words common in the pool but rare in the whole collection count as rare once the index says so."""
    texts = [f"Rotate the keys of service {i} and restart it." for i in range(5)] + ["The hardware module is in rack four."]
    candidates = source("s", texts, None, indexed=True)
    pool_only = rerank("hardware keys", candidates)
    rare_keys = TermStatistics(passages=10_000, total_length=80_000, frequencies={"hardwar": 5_000, "key": 3})
    with_collection = rerank("hardware keys", candidates, local=rare_keys)
    assert order(pool_only)[0] == texts[-1] and order(with_collection)[0] != texts[-1]


def test_each_source_is_sampled_once_per_passage_and_knowledge_bases_do_not_mix():
    cache = TermCache()
    remote = source("remote", STRONG + WEAK[:3], None)
    rerank(QUERY, remote, cache)
    rerank(QUERY, remote, cache)
    assert cache.samples["remote"].passages == 6, "a passage seen twice is counted once"
    local = source("files", MIDDLE, None, indexed=True)
    rerank(QUERY, local, cache)
    assert "files" not in cache.samples, "an indexed source's passages are counted by its index, not sampled"
    other = source("other-kb-source", WEAK, None)
    before = [r.score for r in rerank(QUERY, remote, cache, sampled=["remote"])]
    rerank(QUERY, other, cache)
    after = [r.score for r in rerank(QUERY, remote, cache, sampled=["remote"])]
    assert before == after, "another knowledge base's sources do not change this one's statistics"


def test_the_sample_stays_bounded():
    sample = PassageSample(capacity=100)
    cache = TermCache()
    for i in range(1000):
        text = f"passage {i} about topic {i % 7}"
        sample.observe(i, cache.seen("", text).ids)
    # memory: at most `capacity` passages remembered; counts: halved at each turn, so at most twice the capacity
    assert len(sample._seen) <= 100 and 100 <= sample.passages <= 200
    assert sample.frequencies([cache.vocabulary["topic"]])[0] <= sample.passages


def test_a_passage_is_counted_once_per_sample_even_after_leaving_the_term_cache_and_again_after_a_halving():
    cache = TermCache(capacity=2)
    texts = [f"passage {i} about signing keys" for i in range(4)]
    for _ in range(2):
        for text in texts:  # capacity 2: every text leaves the term cache before it comes back
            cache.count("remote", [cache.seen("", text)])
    sample = cache.samples["remote"]
    assert sample.passages == 4, "evicted and met again: still counted once"
    sample.capacity = 4
    cache.count("remote", [cache.seen("", "a fifth passage")])  # full: the sample halves and forgets what it counted
    assert sample.passages == 4 * 0.5 + 1
    cache.count("remote", [cache.seen("", texts[3])])
    assert sample.passages == 4 * 0.5 + 2, "after the halving, a text met again counts again"
    cache.count("remote", [cache.seen("", texts[3])])
    assert sample.passages == 4 * 0.5 + 2


def test_merged_statistics_add_disjoint_collections():
    merged = merge_term_statistics([TermStatistics(10, 100, {"a": 2}), None, TermStatistics(5, 40, {"a": 1, "b": 5})])
    assert merged == TermStatistics(15, 140, {"a": 3, "b": 5})
    assert merge_term_statistics([None, None]) is None


def test_samples_survive_a_round_trip_and_refuse_another_tokenizer():
    from aggregator.ranking.statistics import dump_samples, load_samples

    cache = TermCache()
    rerank(QUERY, source("remote", STRONG + WEAK, None), cache)
    raw = dump_samples(cache.samples, cache.vocabulary, "1")
    fresh = TermCache()
    loaded = load_samples(raw, fresh.vocabulary, "1")
    ids_before = [cache.vocabulary["key"], cache.vocabulary["rotat"]]
    ids_after = [fresh.vocabulary["key"], fresh.vocabulary["rotat"]]
    assert loaded["remote"].passages == cache.samples["remote"].passages == len(STRONG + WEAK)
    assert list(loaded["remote"].frequencies(ids_after)) == list(cache.samples["remote"].frequencies(ids_before))
    fresh.samples.update(loaded)
    rerank(QUERY, source("remote", STRONG, None), fresh)
    assert fresh.samples["remote"].passages == len(STRONG + WEAK), "passages seen before the restart are not counted twice"
    with pytest.raises(ValueError):
        load_samples(raw, {}, "2")
    with pytest.raises(ValueError):
        load_samples(raw[:20], {}, "1")


def test_samples_are_saved_while_retrievals_keep_adding_to_them():
    """The service saves the samples on a thread while the event loop goes on adding words and passages."""
    import threading

    from aggregator.ranking.statistics import dump_samples, load_samples

    cache = TermCache()
    for i in range(100_000):
        cache.vocabulary[f"w{i}"] = i
    sample = cache.sample("remote")
    sample.observe(1, array("i", range(0, 100_000, 7)).tobytes())
    failures: list[BaseException] = []
    dumped: list[bytes] = []

    def save() -> None:
        try:
            for _ in range(5):
                dumped.append(dump_samples(cache.samples, cache.vocabulary, "1"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    mark = 2
    while saver.is_alive():  # what retrievals do meanwhile: new words, new passages, new sources
        word = f"new{mark}"
        cache.vocabulary[word] = len(cache.vocabulary)
        cache.sample(f"s{mark % 50}").observe(mark, array("i", [cache.vocabulary[word]]).tobytes())
        sample.observe(mark, array("i", [mark % 1000]).tobytes())
        mark += 1
    saver.join()
    assert not failures, failures
    assert len(dumped) == 5
    assert load_samples(dumped[-1], {}, "1")["remote"].passages >= 1


async def test_the_service_keeps_its_samples_in_the_state_folder(tmp_path):
    from aggregator.runtime.service import SAMPLES_FILE, Service

    from .conftest import dify_source, make_config, write_docs
    from testkit.fakes.dify import FakeUpstream
    from testkit.loopback import serve

    with serve(FakeUpstream().app()) as url:
        config = make_config(write_docs(tmp_path / "docs"), dify_source("remote", url), kb_connectors="[docs, remote]")
        config.server.state_dir = tmp_path / "state"
        from aggregator.contract.models import RetrievalRequest
        from aggregator.retrieval.pipeline import retrieve

        first = Service(lambda: config)
        await first.start()
        await retrieve(first.gateway, RetrievalRequest.model_validate({"knowledge_id": "demo", "query": "signing keys"}))
        assert first.gateway.term_cache.samples["remote"].passages == 1
        assert "docs" not in first.gateway.term_cache.samples, "an indexed source is not sampled"
        await first.aclose()
        assert (tmp_path / "state" / SAMPLES_FILE).exists()

        second = Service(lambda: config)
        await second.start()
        assert second.gateway.term_cache.samples["remote"].passages == 1
        await second.aclose()
        (tmp_path / "state" / SAMPLES_FILE).write_bytes(b"garbage")
        third = Service(lambda: config)
        await third.start()  # an unreadable file is logged and ignored
        assert not third.gateway.term_cache.samples
        await third.aclose()


def test_the_ranking_does_not_depend_on_arrival_order():
    """Ties (common among passages the text does not match) break by source, document and chunk."""
    import random

    pool = source("a", WEAK[:6] + STRONG[:1], None) + source("b", MIDDLE + WEAK[6:], [0.5] * 12) + source("c", STRONG[1:], None)
    expected = [(r.candidate.source, r.candidate.passage.document_id) for r in rerank(QUERY, pool)]
    for seed in range(5):
        rng = random.Random(seed)
        shuffled = [Answer(a.source, a.source_type, rng.sample(a.passages, len(a.passages))) for a in rng.sample(pool, len(pool))]
        assert [(r.candidate.source, r.candidate.passage.document_id) for r in rerank(QUERY, shuffled)] == expected


SCORE = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 0.5, 1.0]))


@st.composite
def answers(draw: st.DrawFn) -> list[Answer]:
    """A few sources' answers: texts drawn from a small set (so copies happen), any scores, ranks with gaps and ties."""
    texts = STRONG + MIDDLE[:3] + WEAK[:5]
    found = []
    for name in draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True)):
        picked = draw(st.lists(st.sampled_from(texts), min_size=1, max_size=8))
        scores = [draw(SCORE) for _ in picked]
        ranks = [draw(st.one_of(st.none(), st.integers(1, 6))) for _ in picked]
        passages = [Passage(t, "", f"{name}-{i}", source_score=s, source_rank=r) for i, (t, s, r) in enumerate(zip(picked, scores, ranks))]
        found.append(Answer(name, "dify", passages, weight=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0])), scores=draw(st.sampled_from(["auto", "auto", "rank", "trust", "ignore"]))))
    return found


@settings(max_examples=300, deadline=None)
@given(pool=answers(), relevance_of=st.sampled_from(["spread", "flat", "ties"]))
def test_the_fusion_of_any_pool_is_in_range_sorted_and_knows_its_ties(pool, relevance_of):
    """Calibration, fusion and order on any answers (copies, missing scores and ranks, every `scores` setting)."""
    from aggregator.ranking import rerank as module

    cache = TermCache()
    answers_ = module._one_per_source(pool)
    group_of, first, copies = module._groups([s for a in answers_ for s in cache.recall(a.passages)])
    n = len(first)
    relevance = {"spread": np.linspace(0.9, 0.05, n), "flat": np.zeros(n), "ties": np.repeat([0.5, 0.2], (n + 1) // 2)[:n]}[relevance_of]
    fusion = module._fuse(answers_, relevance, group_of, first, copies, DEFAULT_FUSION)
    assert len(fusion.calibrated) == len(group_of) and all(c == -1.0 or 0.0 <= c <= 1.0 for c in fusion.calibrated)
    assert set(fusion.how) == {a.source for a in answers_} and set(fusion.how.values()) <= {"scores", "ranks", "trusted", "ignored"}
    assert [group_of[w] for w in fusion.winner] == list(range(n)), "each text is spoken for by one of its copies"
    assert all(fusion.calibrated[w] == max(fusion.calibrated[i] for i in copies.get(g, [w])) for g, w in enumerate(fusion.winner))
    assert all(0.0 <= s <= 1.0 for s in fusion.scores) and sorted(fusion.order) == list(range(n))
    keys = [(fusion.scores[g], relevance[g]) for g in fusion.order]
    assert keys == sorted(keys, reverse=True), "best first: by score, then relevance"
    assert fusion.ties == any(a == b for a, b in zip(keys, keys[1:]))
    for g, h in zip(fusion.order, fusion.order[1:]):
        if (fusion.scores[g], relevance[g]) == (fusion.scores[h], relevance[h]):
            assert g < h, "equal score and relevance: in order of first appearance (the pipeline breaks such ties by source)"
