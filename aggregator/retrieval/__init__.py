"""One retrieval: fan-out with breakers, the response cache, filtering, fusion and the rerank stage."""
