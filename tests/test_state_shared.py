"""What both stores share: which candidates a search reads, page by page, and how a writer numbers terms."""

from __future__ import annotations

import pytest

from aggregator.state.base import StoredPassage
from aggregator.state.reading import MAX_PAGE, MetadataCache, Pages
from aggregator.state.vocabulary import Vocabulary


def ranked(n: int) -> list[tuple[int, StoredPassage]]:
    return [(i, StoredPassage(f"d{i}", 0, "", "", {"n": i}, None, 1.0 / (i + 1))) for i in range(n)]


def read(pages: Pages[int], candidates: list[tuple[int, StoredPassage]], missing: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Drive `pages` over `candidates` as a store does; the (offset, count) it asked for."""
    asked = []
    for offset, count in pages:
        asked.append((offset, count))
        page = [c for c in candidates[offset : offset + count] if c[0] not in missing]
        pages.take(page, last=offset + count >= len(candidates))
    return asked


def test_without_a_filter_it_reads_only_the_passages_still_wanted():
    pages: Pages[int] = Pages(5, None)
    assert read(pages, ranked(100), missing=frozenset({1, 3})) == [(0, 5), (5, 2)]  # two removed since the view: two more
    assert [key for key, _ in pages.kept] == [0, 2, 4, 5, 6]


def test_a_filter_reads_ever_larger_pages_up_to_the_largest_and_stops_at_the_last_candidate():
    pages: Pages[int] = Pages(10, lambda passage: False)
    asked = read(pages, ranked(20_000))
    assert [count for _, count in asked][:7] == [64, 128, 256, 512, 1024, 2048, MAX_PAGE]
    assert max(count for _, count in asked) == MAX_PAGE and sum(count for _, count in asked) >= 20_000
    assert pages.kept == [] and asked[-1][0] + asked[-1][1] >= 20_000


def test_a_filter_sees_candidates_in_rank_order_until_enough_pass():
    seen = []

    def accept(passage: StoredPassage) -> bool:
        seen.append(passage.metadata["n"])
        return passage.metadata["n"] % 3 == 0

    pages: Pages[int] = Pages(4, accept)
    read(pages, ranked(1000))
    assert [p.metadata["n"] for p in pages.passages()] == [0, 3, 6, 9]
    assert seen == list(range(10)), "nothing tested after the last passage it needed"


def test_a_call_given_up_stops_at_its_next_candidate():
    class GivenUp(Exception):
        pass

    seen = []

    def accept(passage: StoredPassage) -> bool:
        seen.append(passage.metadata["n"])
        if len(seen) == 100:
            raise GivenUp
        return False

    with pytest.raises(GivenUp):
        read(Pages(4, accept), ranked(10_000))
    assert len(seen) == 100


def test_the_metadata_cache_decodes_a_document_once_and_stays_bounded():
    cache = MetadataCache(2)
    first = cache.decoded(1, '{"a": 1}')
    assert cache.decoded(1, '{"a": "not read again"}') is first
    cache.decoded(2, "{}")
    cache.decoded(3, "{}")  # full: emptied, then holds the new one
    assert cache.decoded(1, '{"a": 2}') == {"a": 2}
    passage = cache.passage((4, "text", 9, "doc", "title", None, '{"k": "v"}'), 0.5)
    assert (passage.document_id, passage.chunk_index, passage.content, passage.metadata, passage.score) == ("doc", 4, "text", {"k": "v"}, 0.5)


def test_new_terms_are_numbered_on_and_taken_back_when_the_batch_is_not_stored():
    vocabulary = Vocabulary({"a": 1, "b": 2}, 3)
    assert vocabulary.ids(["a", "b", "a"]) == [1, 2, 1] and vocabulary.fresh == {}
    assert vocabulary.ids(["c", "a", "c", "d"]) == [3, 1, 3, 4]
    assert vocabulary.fresh == {3: "c", 4: "d"} and vocabulary.next_id == 5
    vocabulary.rolled_back()
    assert vocabulary.fresh == {} and vocabulary.next_id == 3
    assert vocabulary.ids(["d"]) == [3], "the id given out before is free again"
    vocabulary.committed()
    vocabulary.ids(["e"])
    vocabulary.rolled_back()
    assert vocabulary.ids(["d", "e"]) == [3, 4]
