"""Sources of passages, one module per type, registered by their `type:` name in connectors.yaml.

Adding a source type: write `connectors/<type>.py` with its settings model and either a `Connector` subclass
(a source searched at query time, on `connectors/_remote.py`) or a `DocumentSource` subclass (a source that
can only list and fetch documents: the core indexes it), then add one line to `REGISTRY` below.
"""

from __future__ import annotations

from connectors.base import Connector, ConnectorSettings, DocumentSource
from connectors.confluence import ConfluenceConnector
from connectors.dify import DifyConnector
from connectors.dify_dataset import DifyDatasetConnector
from connectors.elasticsearch import ElasticsearchConnector
from connectors.files import FilesSource
from connectors.http_search import HttpSearchConnector
from connectors.notion import NotionSource
from connectors.ragflow import RagflowConnector
from connectors.s3 import S3Source

REGISTRY: dict[str, type[Connector] | type[DocumentSource]] = {
    "files": FilesSource,
    "dify": DifyConnector,
    "s3": S3Source,
    "confluence": ConfluenceConnector,
    "notion": NotionSource,
    "elasticsearch": ElasticsearchConnector,
    "dify_dataset": DifyDatasetConnector,
    "ragflow": RagflowConnector,
    "http": HttpSearchConnector,
}


def build_source(name: str, settings: ConnectorSettings) -> Connector | DocumentSource:
    """Instantiate the class registered for `settings.type` (the core wraps a `DocumentSource` in its sync engine)."""
    cls = REGISTRY[settings.type]
    return cls(name, settings)  # type: ignore[arg-type]
