"""A store's term dictionary as its writer holds it: every term's id, and new terms numbered as they come.

Both stores keep postings by term id. Ids given out since the last commit are `fresh` (the writer stores them
with the batch) and are taken back when the batch's transaction fails, so that the ids a writer holds stay in
step with the stored dictionary.
"""

from __future__ import annotations

from collections.abc import Collection


class Vocabulary:
    def __init__(self, known: dict[str, int], next_id: int) -> None:
        self._ids = known
        self.next_id = next_id
        self.fresh: dict[int, str] = {}  # id -> term, given out since the last commit
        self._committed_next = next_id

    def ids(self, terms: Collection[str]) -> list[int]:
        """The id of each term, in order, repeats included; a new term gets the next free id."""
        try:
            return list(map(self._ids.__getitem__, terms))  # the common case: every term known already
        except KeyError:
            pass
        ids = []
        for term in terms:
            term_id = self._ids.get(term)
            if term_id is None:
                term_id = self._ids[term] = self.next_id
                self.fresh[term_id] = term
                self.next_id += 1
            ids.append(term_id)
        return ids

    def committed(self) -> None:
        """The fresh ids are stored now."""
        self.fresh = {}
        self._committed_next = self.next_id

    def rolled_back(self) -> None:
        """The batch that gave out the fresh ids was not stored: forget them."""
        for term in self.fresh.values():
            self._ids.pop(term, None)
        self.fresh = {}
        self.next_id = self._committed_next
