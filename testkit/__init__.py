"""What tests/ and bench/ share to run the gateway for real: loopback servers, PostgreSQL and Redis, fake SaaS
APIs, waiting for events, asking a gateway and writing its config.

Not part of the product: the wheel packages `aggregator` and `connectors` only (pyproject's package list), and
the import rules of tests/test_layers.py do not cover it. Imported from the checkout (pytest's `pythonpath`,
`python -m bench.…` from the repository's root).
"""
