"""Text tools shared by the ranking and by connectors: the one tokenizer and the passage splitter.

Connectors may import from here (and from `aggregator.ranking`); they never import the web app.
"""
