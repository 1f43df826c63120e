"""Sources of passages, one module per type, registered by their `type:` name in connectors.yaml.

Adding a source type: write `connectors/<type>.py` with a `Connector` subclass
and its settings model, then add one line to `REGISTRY` below.
"""

from __future__ import annotations

from connectors.base import Connector
from connectors.confluence import ConfluenceConnector
from connectors.dify import DifyConnector
from connectors.dify_dataset import DifyDatasetConnector
from connectors.elasticsearch import ElasticsearchConnector
from connectors.files import FilesConnector
from connectors.http_search import HttpSearchConnector
from connectors.notion import NotionConnector
from connectors.ragflow import RagflowConnector
from connectors.s3 import S3Connector

REGISTRY: dict[str, type[Connector]] = {
    "files": FilesConnector,
    "dify": DifyConnector,
    "s3": S3Connector,
    "confluence": ConfluenceConnector,
    "notion": NotionConnector,
    "elasticsearch": ElasticsearchConnector,
    "dify_dataset": DifyDatasetConnector,
    "ragflow": RagflowConnector,
    "http": HttpSearchConnector,
}


def build_connector(name: str, settings: object) -> Connector:
    """Instantiate the connector class registered for `settings.type`."""
    cls = REGISTRY[getattr(settings, "type")]
    return cls(name, settings)  # type: ignore[arg-type]
