"""Immutable index segments: numpy postings in one file each, memory-mapped so worker processes share them.

A segment holds a batch of passages (the unit the index scores) and, for every
term id in them, the passages containing it with their term frequencies. It is
written once, then only read: every process maps the same file, so the
operating system keeps one copy of it in memory whatever the number of workers.
Removals never touch a segment; the store keeps its dead passages apart and
masks them, and a merge rewrites live passages into a new segment.

File layout: an 8-byte magic, an 8-byte header length, a JSON header naming
each array (dtype, offset, count) and the CRC-32 of everything after the
header, then the arrays, each 8-byte aligned. A file that is shorter than its
header says, or whose CRC does not match, is refused as `SegmentCorrupt`.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

MAGIC = b"GWSEG001"
_ALIGN = 8
#: Arrays of a segment, in file order: name -> dtype.
ARRAYS: dict[str, str] = {
    "pids": "<i8",  # passage id (the store's row id) of each local passage
    "lengths": "<f4",  # terms in each local passage
    "ties": "<u8",  # stable tie-break key of each local passage (hash of document id and passage number)
    "term_ids": "<i4",  # sorted term ids present in the segment
    "offsets": "<i8",  # postings of term_ids[i] are post_ids[offsets[i]:offsets[i + 1]]
    "post_ids": "<i4",  # local passage index
    "post_tfs": "<u2",  # term frequency (capped at 65,535)
}


class SegmentCorrupt(Exception):
    """A segment file is truncated, altered or unreadable."""


@dataclass(slots=True)
class SegmentData:
    """A segment's arrays before it is written (or as a merge produces them)."""

    pids: np.ndarray
    lengths: np.ndarray
    ties: np.ndarray
    term_ids: np.ndarray
    offsets: np.ndarray
    post_ids: np.ndarray
    post_tfs: np.ndarray

    def __len__(self) -> int:
        return len(self.pids)


def build(pids: Sequence[int], ties: Sequence[int], term_lists: Sequence[Sequence[int]]) -> SegmentData:
    """Postings for passages given as lists of term ids (one list per passage, repeats = frequency)."""
    count = len(pids)
    lengths = np.fromiter((len(t) for t in term_lists), dtype=np.float32, count=count)
    flat = np.fromiter(chain.from_iterable(term_lists), dtype=np.int64, count=int(lengths.sum()))
    owners = np.repeat(np.arange(count, dtype=np.int64), lengths.astype(np.int64))
    # One sort of (term, passage) keys gives every posting list in order, with its frequencies.
    keys, tfs = np.unique((flat << 32) | owners, return_counts=True)
    terms = (keys >> 32).astype(np.int32)
    post_ids = (keys & 0xFFFFFFFF).astype(np.int32)
    term_ids, starts = np.unique(terms, return_index=True)
    offsets = np.append(starts, len(terms)).astype(np.int64)
    return SegmentData(
        pids=np.asarray(pids, dtype=np.int64),
        lengths=lengths,
        ties=np.asarray(ties, dtype=np.uint64),
        term_ids=term_ids.astype(np.int32),
        offsets=offsets,
        post_ids=post_ids,
        post_tfs=np.minimum(tfs, 65535).astype(np.uint16),
    )


def merge(segments: Sequence["Segment"], live: Sequence[np.ndarray]) -> SegmentData:
    """One segment holding the live passages of `segments` (`live[i]` masks segment i's passages)."""
    pids, lengths, ties, terms, owners, tfs = [], [], [], [], [], []
    base = 0
    for segment, mask in zip(segments, live):
        new_local = np.cumsum(mask, dtype=np.int64) - 1 + base  # old local index -> new local index
        pids.append(segment.pids[mask])
        lengths.append(segment.lengths[mask])
        ties.append(segment.ties[mask])
        per_term = np.diff(segment.offsets)
        seg_terms = np.repeat(segment.term_ids.astype(np.int64), per_term)
        keep = mask[segment.post_ids]
        terms.append(seg_terms[keep])
        owners.append(new_local[segment.post_ids[keep]])
        tfs.append(np.asarray(segment.post_tfs)[keep])
        base += int(mask.sum())
    all_terms = np.concatenate(terms) if terms else np.zeros(0, np.int64)
    all_owners = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    all_tfs = np.concatenate(tfs) if tfs else np.zeros(0, np.uint16)
    order = np.argsort((all_terms << 32) | all_owners, kind="stable")
    all_terms, all_owners, all_tfs = all_terms[order], all_owners[order], all_tfs[order]
    term_ids, starts = np.unique(all_terms, return_index=True)
    return SegmentData(
        pids=np.concatenate(pids) if pids else np.zeros(0, np.int64),
        lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.float32),
        ties=np.concatenate(ties) if ties else np.zeros(0, np.uint64),
        term_ids=term_ids.astype(np.int32),
        offsets=np.append(starts, len(all_terms)).astype(np.int64),
        post_ids=all_owners.astype(np.int32),
        post_tfs=all_tfs.astype(np.uint16),
    )


def write(path: Path, data: SegmentData) -> int:
    """Write `data` to `path` durably (temporary file, fsync, rename); return the file's size."""
    header: dict[str, object] = {"arrays": []}
    body = []
    offset = 0
    for name, dtype in ARRAYS.items():
        array = np.ascontiguousarray(getattr(data, name), dtype=dtype)
        raw = array.tobytes()
        pad = (-len(raw)) % _ALIGN
        header["arrays"].append([name, dtype, offset, len(array)])  # type: ignore[union-attr]
        body.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    crc = 0
    for part in body:
        crc = zlib.crc32(part, crc)
    header["crc32"] = crc
    header["body_bytes"] = offset
    encoded = json.dumps(header).encode()
    encoded += b" " * ((-(len(encoded) + 16)) % _ALIGN)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as out:
        out.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
        for part in body:
            out.write(part)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return 16 + len(encoded) + offset


class Segment:
    """A segment file mapped read-only; its arrays are views of the mapping, shared with other processes."""

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                self.size = os.fstat(handle.fileno()).st_size
                if self.size < 16:
                    raise SegmentCorrupt(f"{path.name}: {self.size} bytes, shorter than a header")
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise SegmentCorrupt(f"{path.name}: cannot read ({exc.strerror or exc})") from None
        mapped = self._map
        if mapped[:8] != MAGIC:
            raise SegmentCorrupt(f"{path.name}: not a segment file")
        length = int.from_bytes(mapped[8:16], "little")
        try:
            header = json.loads(mapped[16 : 16 + length])
            body_start = 16 + length
            if self.size != body_start + int(header["body_bytes"]):
                raise SegmentCorrupt(f"{path.name}: {self.size} bytes, the header says {body_start + int(header['body_bytes'])}")
            if verify and zlib.crc32(memoryview(mapped)[body_start:]) != header["crc32"]:
                raise SegmentCorrupt(f"{path.name}: checksum mismatch")
            arrays = {
                name: np.frombuffer(mapped, dtype=dtype, count=count, offset=body_start + offset)
                for name, dtype, offset, count in header["arrays"]
            }
        except SegmentCorrupt:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise SegmentCorrupt(f"{path.name}: unreadable header ({exc})") from None
        self.pids: np.ndarray = arrays["pids"]
        self.lengths: np.ndarray = arrays["lengths"]
        self.ties: np.ndarray = arrays["ties"]
        self.term_ids: np.ndarray = arrays["term_ids"]
        self.offsets: np.ndarray = arrays["offsets"]
        self.post_ids: np.ndarray = arrays["post_ids"]
        self.post_tfs: np.ndarray = arrays["post_tfs"]

    def __len__(self) -> int:
        return len(self.pids)

    def postings(self, term_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(local ids, term frequencies) of one term, or None if no passage here has it."""
        at = int(np.searchsorted(self.term_ids, term_id))
        if at >= len(self.term_ids) or self.term_ids[at] != term_id:
            return None
        start, end = int(self.offsets[at]), int(self.offsets[at + 1])
        return self.post_ids[start:end], self.post_tfs[start:end]
