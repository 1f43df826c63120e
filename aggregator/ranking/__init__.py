"""Scoring: BM25 over local indexes and over the merged pool, proximity, and the fusion of sources."""
