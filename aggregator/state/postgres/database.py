"""The database of the shared store: its schema and migrations, how the gateway connects, and dropping a store.

    gateway_schema  the schema's version: the gateway creates and migrates its tables itself (MIGRATIONS)
    gw_stores       one row per source and settings fingerprint: counters, the syncer's status and name, and a
                    generation that every commit bumps
    gw_documents    id, version, title, metadata of every document
    gw_passages     every passage's text and length, and its distinct term ids (to take its postings back out)
    gw_terms        the term dictionary: each term's id, document frequency, and the generation that last changed it
    gw_postings     the inverted index, (store, term, passage) -> term frequency, passage length, tie key, under one
                    covering B-tree: a query's candidates and everything their scores need are one index range per term
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import psycopg

log = logging.getLogger("aggregator.state")

#: The first key of every advisory lock the gateway takes (the second is a store's id).
LOCK_SPACE = 0x6777
#: Seconds a read may take before it is abandoned (the request's own deadline is shorter anyway).
STATEMENT_TIMEOUT_MS = 5000
#: Rough bytes of one posting row and its index entry, for the size shown in /status.
POSTING_BYTES = 64
#: What a lost connection or an unreachable server raises.
DOWN = (psycopg.Error, OSError)

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE gw_stores (
    id serial PRIMARY KEY, source text NOT NULL, fingerprint text NOT NULL,
    documents bigint NOT NULL DEFAULT 0, passages bigint NOT NULL DEFAULT 0, total_length bigint NOT NULL DEFAULT 0,
    postings bigint NOT NULL DEFAULT 0, text_bytes bigint NOT NULL DEFAULT 0,
    next_passage bigint NOT NULL DEFAULT 1, next_term integer NOT NULL DEFAULT 1,
    synced_once boolean NOT NULL DEFAULT false, status text NOT NULL DEFAULT '{}', syncer text,
    generation bigint NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, fingerprint));
CREATE TABLE gw_documents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, store integer NOT NULL, doc_id text NOT NULL,
    version text NOT NULL, title text NOT NULL, updated_at text, metadata text NOT NULL,
    UNIQUE (store, doc_id));
CREATE TABLE gw_passages (
    store integer NOT NULL, id bigint NOT NULL, document bigint NOT NULL, chunk_index integer NOT NULL,
    content text NOT NULL, length integer NOT NULL, terms integer[] NOT NULL,
    PRIMARY KEY (store, id));
CREATE INDEX gw_passages_document ON gw_passages (store, document);
CREATE TABLE gw_terms (
    store integer NOT NULL, id integer NOT NULL, term text NOT NULL, df integer NOT NULL, generation bigint NOT NULL,
    PRIMARY KEY (store, id), UNIQUE (store, term));
CREATE INDEX gw_terms_generation ON gw_terms (store, generation);
CREATE TABLE gw_postings (
    store integer NOT NULL, term integer NOT NULL, passage bigint NOT NULL, tf smallint NOT NULL,
    length integer NOT NULL, tie bigint NOT NULL,
    PRIMARY KEY (store, term, passage) INCLUDE (tf, length, tie));
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def display_url(url: str) -> str:
    """The URL without its password, for /status and logs."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    host, port, database, user = info.get("host", ""), info.get("port", ""), info.get("dbname", ""), info.get("user", "")
    return f"postgresql://{user + '@' if user else ''}{host}{':' + str(port) if port else ''}/{database}"


def connect_options() -> dict[str, Any]:
    """Keepalives so that a syncer whose machine vanished loses its lock within about half a minute."""
    return {"autocommit": True, "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "application_name": f"knowledge-gateway/{os.getpid()}"}  # fmt: skip


class SchemaTooNew(Exception):
    """The database was migrated by a newer gateway: this one serves nothing from it rather than misread it."""


async def migrate(connection: "psycopg.AsyncConnection[Any]") -> int:
    """Create or upgrade the schema (one replica at a time); the version it is at. Refuses a newer schema."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SPACE,))
        await connection.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version integer NOT NULL)")
        row = await (await connection.execute("SELECT max(version) FROM gateway_schema")).fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database's gateway schema is version {current}, newer than this gateway's {SCHEMA_VERSION}: upgrade the gateway"
            )
        for version, statements in MIGRATIONS:
            if version > current:
                await connection.execute(statements)
                await connection.execute("DELETE FROM gateway_schema")
                await connection.execute("INSERT INTO gateway_schema (version) VALUES (%s)", (version,))
                log.info("PostgreSQL state: schema migrated to version %d", version)
                current = version
    return current


def drop_store(connection: "psycopg.Connection[Any]", store_id: int) -> bool:
    """Delete one store unless a replica syncs it (holds its lock); True if deleted."""
    won = connection.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, store_id)).fetchone()
    if not (won and won[0]):
        return False
    try:
        with connection.transaction():
            for table in ("gw_postings", "gw_passages", "gw_terms", "gw_documents"):
                connection.execute(f"DELETE FROM {table} WHERE store = %s", (store_id,))
            connection.execute("DELETE FROM gw_stores WHERE id = %s", (store_id,))
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, store_id))
    return True


def unused_stores(url: str, in_use: set[str]) -> list[tuple[int, str, int]]:
    """(id, source, estimated bytes) of stores whose source the config no longer names (what `aggregator gc` removes)."""
    with psycopg.connect(url, **connect_options()) as connection:
        if connection.execute("SELECT to_regclass('gw_stores')").fetchone() == (None,):
            return []
        rows = connection.execute("SELECT id, source, text_bytes + postings * %s FROM gw_stores ORDER BY source", (POSTING_BYTES,)).fetchall()
    return [(int(r[0]), r[1], int(r[2])) for r in rows if r[1] not in in_use]


def remove_stores(url: str, store_ids: Sequence[int]) -> list[bool]:
    with psycopg.connect(url, **connect_options()) as connection:
        return [drop_store(connection, store_id) for store_id in store_ids]


