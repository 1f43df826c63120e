"""The `notion` source: headers and a full sync against a fake Notion, over real HTTP."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.state.sync import IndexedConnector
from connectors.base import AuthFailed, SourceQuery
from connectors.notion import NOTION_VERSION, NotionSettings, NotionSource, flatten_property

from testkit.fakes.notion import FakeNotion, app, block, rich
from testkit.fakes.recorder import Recorder
from testkit.loopback import serve, until

TOKEN = "secret_notion_integration_token"


async def test_requests_carry_the_token_and_the_pinned_version():
    recorder = Recorder({("POST", "/v1/search"): (200, {"object": "list", "results": [], "has_more": False, "next_cursor": None})})
    with serve(recorder.app()) as url:
        connector = IndexedConnector(NotionSource("n", NotionSettings(token=TOKEN, base_url=url)))
        await connector.sync()
        await connector.aclose()
    request = recorder.requests[-1]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["notion-version"] == NOTION_VERSION
    assert request.json()["filter"] == {"property": "object", "value": "page"}


def test_database_properties_are_flattened():
    assert flatten_property({"type": "number", "number": 3}) == 3
    assert flatten_property({"type": "select", "select": {"name": "Ops"}}) == "Ops"
    assert flatten_property({"type": "multi_select", "multi_select": [{"name": "a"}, {"name": "b"}]}) == ["a", "b"]
    assert flatten_property({"type": "date", "date": {"start": "2025-01-02", "end": None}}) == "2025-01-02"
    assert flatten_property({"type": "checkbox", "checkbox": False}) is False
    assert flatten_property({"type": "rich_text", "rich_text": rich("hello")}) == "hello"
    assert flatten_property({"type": "relation", "relation": []}) is None


def workspace(state: FakeNotion) -> None:
    state.add_page("p-runbook", "Incident runbook", [
        block("b1", "heading_1", "When you are paged"),
        block("b2", "paragraph", "Acknowledge the page within five minutes."),
        block("b3", "bulleted_list_item", "Open an incident channel", children=[block("b3a", "paragraph", "Name it inc-date-topic.")]),
        block("b4", "to_do", "Write the postmortem", checked=True),
        block("b5", "toggle", "Escalation", children=[block("b5a", "quote", "Page the incident commander for SEV1.")]),
        block("b6", "code", "kubectl rollout undo deploy/api", language="bash"),
        block("b7", "callout", "Never delete production data."),
        block("b8", "table", children=[block("r1", "table_row", cells=[rich("Severity"), rich("Response")]),
                                       block("r2", "table_row", cells=[rich("SEV1"), rich("30 minutes")])],
              table_width=2, has_column_header=True),
    ])  # fmt: skip
    state.add_page(
        "p-task", "Rotate release keys", [block("c1", "paragraph", "Rotate the signing keys in the HSM.")],
        parent={"type": "database_id", "database_id": "db-1"},
        properties={
            "Status": {"id": "s", "type": "status", "status": {"name": "In progress"}},
            "Tags": {"id": "t", "type": "multi_select", "multi_select": [{"name": "security"}]},
            "Due": {"id": "d", "type": "date", "date": {"start": "2025-06-30", "end": None}},
            "Points": {"id": "p", "type": "number", "number": 5},
            "Done": {"id": "x", "type": "checkbox", "checkbox": False},
        },
    )  # fmt: skip
    state.add_page("p-wifi", "Office wifi", [block("w1", "paragraph", "Guests use the Guest network.")])


@pytest.fixture
def fake():
    state = FakeNotion(token=TOKEN)
    workspace(state)
    with serve(app(state)) as url:
        yield state, url


async def test_sync_reads_every_block_type_and_database_properties(fake):
    state, url = fake
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url, requests_per_second=50))) as notion:
        await notion.wait_ready(10)
        assert notion.stats().documents == 3
        [runbook] = await notion.search(SourceQuery("incident commander escalation", 1))
        [task] = await notion.search(SourceQuery("signing keys", 1))
    text = runbook.content
    for expected in ("# When you are paged", "- Open an incident channel", "Name it inc-date-topic.", "[x] Write the postmortem",
                     "> Page the incident commander for SEV1.", "kubectl rollout undo", "Never delete production data.",
                     "Severity | Response", "SEV1 | 30 minutes"):  # fmt: skip
        assert expected in text, expected
    assert runbook.title == "Incident runbook" and runbook.document_id == "p-runbook"
    assert runbook.metadata["parent"] == "workspace" and runbook.metadata["url"].startswith("https://www.notion.so/")
    assert runbook.updated_at == "2025-03-10T12:00:00.000Z"
    assert task.metadata["parent"] == "database:db-1"
    assert task.metadata["Status"] == "In progress" and task.metadata["Tags"] == ["security"]
    assert task.metadata["Due"] == "2025-06-30" and task.metadata["Points"] == 5 and task.metadata["Done"] is False
    assert state.versions_seen == {NOTION_VERSION}


async def test_refresh_rereads_only_edited_pages_and_drops_unshared_ones(fake):
    state, url = fake
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url, requests_per_second=50))) as notion:
        await notion.wait_ready(10)
        state.requests.clear()
        state.add_page("p-wifi", "Office wifi", [block("w1", "paragraph", "Guests now use the Visitor network.")], edited="2025-04-01T00:00:00.000Z")
        del state.pages["p-task"]  # unshared from the integration
        await notion.sync()
        block_reads = {path for _, path in state.requests if path.startswith("/v1/blocks/")}
        assert block_reads == {"/v1/blocks/p-wifi/children"}
        assert [p.document_id for p in await notion.search(SourceQuery("visitor network", 5))] == ["p-wifi"]
        assert await notion.search(SourceQuery("signing keys HSM", 5)) == []
        assert notion.stats().documents == 2


async def test_the_limiter_keeps_under_three_requests_a_second(fake):
    state, url = fake
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url))) as notion:
        await notion.wait_ready(20)
    times = sorted(t for t, _ in state.requests)
    assert len(times) >= 10
    for i in range(len(times) - 6):
        assert times[i + 6] - times[i] >= 1.0, "at most a burst of 3 plus 3 a second in any second"
    steady = (len(times) - 1 - 3) / (times[-1] - times[0])
    assert steady <= 3.3, f"{steady:.2f} requests/s after the initial burst"


async def test_first_sync_does_not_block_and_a_429_pauses_it(fake):
    state, url = fake
    state.rate_limit_next, state.retry_after = 1, "1"
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url, requests_per_second=50))) as notion:
        assert not notion.ready, "start() returns before the first sync"
        await until(lambda: notion.stats().last_refresh_outcome == "rate_limited", 5, "the 429 reported")
        assert not notion.ready, "paused for Retry-After (1 s), not ready meanwhile"
        await notion.wait_ready(5)  # resumed after Retry-After
        assert notion.stats().documents == 3 and notion.stats().last_refresh_error is None


async def test_a_wrong_token_is_reported_as_auth_failed(fake):
    _, url = fake
    async with IndexedConnector(NotionSource("notion", NotionSettings(token="wrong", base_url=url))) as notion:
        await notion.wait_ready(5)
        assert notion.stats().last_refresh_outcome == AuthFailed.outcome
        assert "wrong" not in (notion.stats().last_refresh_error or "")


async def test_a_page_gone_between_listing_and_reading_is_left_out(fake):
    state, url = fake
    del state.blocks["p-wifi"]  # listed, but its blocks answer 404
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url, requests_per_second=50))) as notion:
        await notion.wait_ready(10)
        assert notion.stats().documents == 2 and notion.stats().last_refresh_error is None


async def test_an_edit_shows_within_refresh_s_plus_its_fetch_not_after_paging_through_the_workspace():
    """Issue 24: an edit showed 14.7 s after it with refresh_s 3: every refresh paged through the whole workspace
    (Notion's search, at three requests a second) before fetching anything. Now refreshes list what changed."""
    state = FakeNotion(token=TOKEN, page_size=2)  # 30 pages: 15 search answers for a full listing
    for i in range(30):
        state.add_page(f"p-{i:02}", f"Page {i}", [block(f"b{i}", "paragraph", f"Paragraph about topic{i}.")], edited=f"2025-03-10T12:{i:02}:00.000Z")
    with serve(app(state)) as url:
        settings = NotionSettings(token=TOKEN, base_url=url, refresh_s=1, requests_per_second=20)
        async with IndexedConnector(NotionSource("notion", settings)) as notion:
            await notion.wait_ready(20)
            loop = asyncio.get_running_loop()
            for round_, (page, words) in enumerate((("p-03", "zeppelin timetable"), ("p-17", "walrus orchestra"))):
                seen = len(state.requests)
                state.add_page(page, f"Page {page}", [block(f"n{round_}", "paragraph", words)], edited=f"2025-04-0{round_ + 1}T09:00:00.000Z")
                edited = loop.time()
                while not await notion.search(SourceQuery(words, 1)):
                    assert loop.time() - edited < 10, "the edit never showed"
                    await asyncio.sleep(0.02)
                elapsed = loop.time() - edited
                searches = [path for _, path in state.requests[seen:] if path == "/v1/search"]
                assert len(searches) <= 4, f"{len(searches)} search requests before the edit showed: a full listing"
                assert elapsed < settings.refresh_s + 1.0, f"{elapsed:.2f} s"


async def test_a_full_listing_still_removes_unshared_pages_between_quick_ones(fake, monkeypatch):
    import aggregator.state.sync as indexed

    monkeypatch.setattr(indexed, "FULL_LISTING_S", 1.5)
    state, url = fake
    async with IndexedConnector(NotionSource("notion", NotionSettings(token=TOKEN, base_url=url, refresh_s=1, requests_per_second=50))) as notion:
        await notion.wait_ready(10)
        del state.pages["p-task"]  # unshared: only a full listing can tell
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await notion.search(SourceQuery("signing keys HSM", 5)):
            assert loop.time() < deadline, "the unshared page stayed"
            await asyncio.sleep(0.05)
        assert notion.stats().documents == 2
