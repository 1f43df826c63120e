"""The syncer's side of a shared store: every write goes through the connection that holds the store's lock.

A batch is one transaction: documents, passages, postings and new terms copied in, document frequencies and
counters updated, and the store's generation bumped so that every replica's poller loads what changed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aggregator.state.base import IndexWriter, PreparedDocument, SyncStatus, tie_key
from aggregator.state.postgres.database import DOWN, drop_store
from aggregator.state.vocabulary import Vocabulary

if TYPE_CHECKING:
    import psycopg

    from aggregator.state.postgres.store import PostgresStore

log = logging.getLogger("aggregator.state")


def signed(key: int) -> int:
    """A 64-bit unsigned tie key as a bigint that sorts the same way."""
    return key - (1 << 63)



class PostgresWriter(IndexWriter):
    """The syncer's side: every write goes through the connection that holds the store's lock."""

    def __init__(self, store: "PostgresStore", connection: "psycopg.Connection[Any]", store_id: int) -> None:
        self.store = store
        self.connection = connection
        self.store_id = store_id
        self._versions = dict(connection.execute("SELECT doc_id, version FROM gw_documents WHERE store = %s", (store_id,)).fetchall())
        known = dict(connection.execute("SELECT term, id FROM gw_terms WHERE store = %s", (store_id,)).fetchall())
        row = connection.execute("SELECT next_passage, next_term FROM gw_stores WHERE id = %s", (store_id,)).fetchone()
        assert row is not None
        self._next_passage = int(row[0])
        self._vocabulary = Vocabulary(known, int(row[1]))

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def apply(self, documents: Sequence[PreparedDocument], removed: Sequence[str], status: SyncStatus) -> None:
        replaced = [d.document_id for d in documents] + list(removed)
        vocabulary = self._vocabulary  # its new ids are taken back unless the transaction commits
        next_passage = self._next_passage
        passages: list[tuple[int, str, int, str, int, list[int]]] = []
        postings: list[tuple[int, int, int, int, int, int]] = []
        delta: Counter[int] = Counter()
        try:
            for document in documents:
                for chunk_index, (content, terms) in enumerate(document.passages):
                    counts = Counter(terms)
                    ids = vocabulary.ids(counts)
                    pid, next_passage = next_passage, next_passage + 1
                    tie = signed(tie_key(document.document_id, chunk_index))
                    passages.append((pid, document.document_id, chunk_index, _text(content), len(terms), ids))
                    postings.extend((self.store_id, term_id, pid, min(tf, 32767), len(terms), tie) for term_id, tf in zip(ids, counts.values()))
                    delta.update(ids)
            self._write(documents, replaced, status, passages, postings, delta, vocabulary.fresh, next_passage, vocabulary.next_id)
        except BaseException as exc:
            vocabulary.rolled_back()
            if isinstance(exc, DOWN):
                self.store.lost_lead()  # the connection (and with it the lock) may be gone: ask again before writing
            raise
        vocabulary.committed()
        self._next_passage = next_passage
        for document_id in removed:
            self._versions.pop(document_id, None)
        for document in documents:
            self._versions[document.document_id] = document.version

    def _write(self, documents: Sequence[PreparedDocument], replaced: list[str], status: SyncStatus,
               passages: list[tuple[int, str, int, str, int, list[int]]], postings: list[tuple[int, int, int, int, int, int]],
               delta: Counter[int], fresh: dict[int, str], next_passage: int, next_term: int) -> None:  # fmt: skip
        store_id = self.store_id
        connection = self.connection
        with connection.transaction():
            row = connection.execute("UPDATE gw_stores SET generation = generation + 1 WHERE id = %s RETURNING generation", (store_id,)).fetchone()
            assert row is not None
            generation = int(row[0])
            gone = self._delete(replaced, delta)
            doc_rows: dict[str, int] = {}
            if documents:
                cursor = connection.execute(
                    "INSERT INTO gw_documents (store, doc_id, version, title, updated_at, metadata) "
                    "SELECT %s::integer, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) RETURNING doc_id, id",
                    (store_id, [d.document_id for d in documents], [d.version for d in documents], [_text(d.title) for d in documents],
                     [d.updated_at for d in documents], [json.dumps(d.metadata, ensure_ascii=False, default=str) for d in documents]),
                )  # fmt: skip
                doc_rows = dict(cursor.fetchall())
            with connection.cursor() as cursor:
                with cursor.copy("COPY gw_passages (store, id, document, chunk_index, content, length, terms) FROM STDIN") as copy:
                    for pid, doc_id, chunk_index, content, length, ids in passages:
                        copy.write_row((store_id, pid, doc_rows[doc_id], chunk_index, content, length, ids))
                with cursor.copy("COPY gw_postings (store, term, passage, tf, length, tie) FROM STDIN") as copy:
                    for posting in postings:
                        copy.write_row(posting)
                with cursor.copy("COPY gw_terms (store, id, term, df, generation) FROM STDIN") as copy:
                    for term_id, term in fresh.items():
                        copy.write_row((store_id, term_id, term, delta.pop(term_id, 0), generation))
            changed = [(term_id, count) for term_id, count in delta.items() if count]
            if changed:
                connection.execute(
                    "UPDATE gw_terms t SET df = t.df + x.d, generation = %s FROM unnest(%s::integer[], %s::integer[]) AS x (id, d) "
                    "WHERE t.store = %s AND t.id = x.id",
                    (generation, [c[0] for c in changed], [c[1] for c in changed], store_id),
                )  # fmt: skip
            connection.execute(
                "UPDATE gw_stores SET documents = documents + %s, passages = passages + %s, total_length = total_length + %s, "
                "postings = postings + %s, text_bytes = text_bytes + %s, next_passage = %s, next_term = %s, status = %s WHERE id = %s",
                (len(documents) - gone[0], len(passages) - gone[1], sum(p[4] for p in passages) - gone[2],
                 len(postings) - gone[3], sum(len(p[3].encode()) for p in passages) - gone[4], next_passage, next_term,
                 status.to_json(), store_id),
            )  # fmt: skip

    def _delete(self, document_ids: Sequence[str], delta: Counter[int]) -> tuple[int, int, int, int, int]:
        """Remove documents, their passages and postings, counting the terms they held out of `delta`;
        (documents, passages, length, postings, text bytes) removed."""
        if not document_ids:
            return 0, 0, 0, 0, 0
        connection, store_id = self.connection, self.store_id
        rows = connection.execute("SELECT id FROM gw_documents WHERE store = %s AND doc_id = ANY(%s)", (store_id, list(document_ids))).fetchall()
        if not rows:
            return 0, 0, 0, 0, 0
        doc_rows = [r[0] for r in rows]
        for term_id, count in connection.execute(
            "SELECT t, count(*) FROM gw_passages p, unnest(p.terms) AS t WHERE p.store = %s AND p.document = ANY(%s) GROUP BY t",
            (store_id, doc_rows),
        ):  # fmt: skip
            delta[term_id] -= count
        connection.execute(
            "DELETE FROM gw_postings po USING (SELECT p.id, unnest(p.terms) AS t FROM gw_passages p WHERE p.store = %s AND p.document = ANY(%s)) x "
            "WHERE po.store = %s AND po.term = x.t AND po.passage = x.id",
            (store_id, doc_rows, store_id),
        )  # fmt: skip
        row = connection.execute(
            "WITH gone AS (DELETE FROM gw_passages WHERE store = %s AND document = ANY(%s) RETURNING length, octet_length(content) AS bytes, cardinality(terms) AS postings) "
            "SELECT count(*), coalesce(sum(length), 0), coalesce(sum(postings), 0), coalesce(sum(bytes), 0) FROM gone",
            (store_id, doc_rows),
        ).fetchone()  # fmt: skip
        assert row is not None
        connection.execute("DELETE FROM gw_documents WHERE id = ANY(%s)", (doc_rows,))
        return len(doc_rows), int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def finish(self, status: SyncStatus) -> None:
        try:
            self.connection.execute(
                "UPDATE gw_stores SET status = %s, synced_once = true, generation = generation + 1 WHERE id = %s",
                (status.to_json(), self.store_id),
            )
            self._drop_other_settings()
        except DOWN:
            self.store.lost_lead()
            raise

    def _drop_other_settings(self) -> None:
        """Stores of this source under settings no replica syncs any more (an edit that reshaped the index)."""
        connection = self.connection
        others = connection.execute(
            "SELECT id FROM gw_stores WHERE source = %s AND fingerprint <> %s", (self.store.source, self.store.fingerprint)
        ).fetchall()
        for (store_id,) in others:
            if drop_store(connection, store_id):
                log.info("source %s: deleted its index stored under earlier settings", self.store.source)

    def close(self) -> None:
        """The connection belongs to the store (it holds the lock)."""


def _text(value: str) -> str:
    """PostgreSQL's text holds no NUL character."""
    return value.replace("\x00", "") if "\x00" in value else value
