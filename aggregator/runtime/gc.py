"""Garbage-collector settings for a serving process: fewer, cheaper collections under load.

CPython's cyclic collector runs its youngest generation every 700 net
allocations of container objects. A retrieval allocates thousands (passages,
their metadata, records), and the objects of requests still in flight when
it runs are promoted to older generations, whose full collections walk every
object of the process: about 100,000 after start-up, 40 ms each. Measured on
`bench/perf.py --only cpu`'s load, collections took about 6 % of the
server's CPU. So a serving process freezes what exists before it starts
serving (the imported modules and the app, which live as long as the process
and need never be walked again; the gateway the app builds at its start-up
is not frozen) and collects its
youngest generation every 20,000 allocations: about 8 % less CPU per
retrieval, for at most a few megabytes of garbage awaiting collection.
"""

from __future__ import annotations

import gc

#: Allocations between collections of the youngest generation (CPython's default: 700), then of the two older.
THRESHOLDS = (20_000, 20, 20)


def settle_for_serving() -> None:
    """Freeze what exists now (imports, the app) and collect less often. Call once, before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
