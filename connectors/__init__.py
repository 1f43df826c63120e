"""Sources of passages, one module per type, registered by their `type:` name in connectors.yaml.

Adding a source type: write `connectors/<type>.py` with a `Connector` subclass
and its settings model, then add one line to `REGISTRY` below.
"""

from __future__ import annotations

from .base import Connector
from .confluence import ConfluenceConnector
from .dify import DifyConnector
from .dify_dataset import DifyDatasetConnector
from .elasticsearch import ElasticsearchConnector
from .files import FilesConnector
from .http_search import HttpSearchConnector
from .notion import NotionConnector
from .ragflow import RagflowConnector
from .s3 import S3Connector

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
