"""`s3`: text objects in AWS S3 or any S3-compatible store (MinIO, Ceph, R2, …), indexed and kept fresh.

Listing, signing and reading go through boto3 (run off the event loop in
threads); credentials come from the config when given, else from the
standard AWS chain (environment, shared config and profiles, instance role).
A sync lists the prefix, fetches only objects whose ETag changed, and drops
the ones that disappeared. botocore's own retries are off: the core's policy
decides about retries, and the next refresh retries a failed sync.
"""

from __future__ import annotations

import asyncio
import posixpath
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator

from connectors._html import html_to_text
from connectors.base import AuthFailed, Document, DocumentSource, IndexedSettings, SourceError, Unavailable, iso_utc

AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403", "401"})


class S3Settings(IndexedSettings):
    type: Literal["s3"] = "s3"
    bucket: str = Field(min_length=3, max_length=255)
    prefix: str = ""
    endpoint_url: str | None = Field(None, description="Omit for AWS; the store's URL otherwise.")
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = Field(None, description="A profile of the shared AWS config, instead of keys.")
    include: list[str] = Field(default_factory=lambda: [".txt", ".md"], min_length=1, description="Key suffixes to index.")
    max_object_bytes: int = Field(5 * 1024 * 1024, ge=1)
    verify_tls: bool | str = True

    @field_validator("include")
    @classmethod
    def _suffixes(cls, values: list[str]) -> list[str]:
        known = {".txt", ".md", ".markdown", ".html", ".htm", ".json", ".csv"}
        unknown = [v for v in values if v.lower() not in known]
        if unknown:
            raise ValueError(f"unsupported suffixes {unknown}; choose from {sorted(known)}")
        return [v.lower() for v in values]


def _client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
        aws_secret_access_key=settings.secret_access_key.get_secret_value() if settings.secret_access_key else None,
        aws_session_token=settings.session_token.get_secret_value() if settings.session_token else None,
        profile_name=settings.profile,
        region_name=settings.region,
    )
    timeout = settings.timeout_s
    config = Config(connect_timeout=timeout, read_timeout=max(timeout, 10.0), retries={"total_max_attempts": 1}, max_pool_connections=32)
    return session.client("s3", endpoint_url=settings.endpoint_url, verify=settings.verify_tls, config=config)


def _translate(exc: Exception, what: str) -> SourceError:
    """A boto error as the core's typed error, with a message that holds no secret."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in AUTH_CODES or status in (401, 403):
            return AuthFailed(f"{what}: credentials refused ({code or status})")
        if code in ("NoSuchBucket", "404") and "bucket" in what:
            return SourceError(f"{what}: the bucket does not exist")
        if status in (500, 502, 503, 504) or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return Unavailable(f"{what}: {code or status}")
        return SourceError(f"{what}: {code or status}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AuthFailed(f"{what}: no usable credentials in the config or the AWS credential chain")
    if isinstance(exc, EndpointConnectionError):
        return Unavailable(f"{what}: cannot reach the endpoint")
    return Unavailable(f"{what}: {type(exc).__name__}")


class S3Source(DocumentSource):
    settings_model = S3Settings
    settings: S3Settings
    fetch_concurrency: ClassVar[int] = 16

    def __init__(self, name: str, settings: S3Settings) -> None:
        super().__init__(name, settings)
        self._s3: Any = None
        self._listed: dict[str, tuple[Any, str]] = {}  # key -> (LastModified, ETag) from the last listing

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = _client(self.settings)
        return self._s3

    def _list(self) -> dict[str, str]:
        settings = self.settings
        what = f"listing s3://{settings.bucket}/{settings.prefix}"
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=settings.prefix)
            versions: dict[str, str] = {}
            listed: dict[str, tuple[Any, str]] = {}
            skipped = 0
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not key.lower().endswith(tuple(settings.include)) or key.endswith("/"):
                        continue
                    if item["Size"] > settings.max_object_bytes:
                        skipped += 1
                        continue
                    versions[key] = item["ETag"]
                    listed[key] = (item.get("LastModified"), item["ETag"])
        except Exception as exc:
            raise _translate(exc, what) from None
        self._listed = listed
        self.set_skipped(skipped)
        return versions

    async def list_versions(self) -> dict[str, str]:
        return await asyncio.to_thread(self._list)

    def _get(self, key: str) -> Document | None:
        settings = self.settings
        try:
            answer = self._client().get_object(Bucket=settings.bucket, Key=key)
            body = answer["Body"].read(settings.max_object_bytes + 1)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None  # deleted since the listing
            raise _translate(exc, f"reading s3://{settings.bucket}/{key}") from None
        if len(body) > settings.max_object_bytes:
            return None
        text = body.decode("utf-8", errors="replace").lstrip("\ufeff")
        if key.lower().endswith((".html", ".htm")):
            text = html_to_text(text)
        listed_modified, listed_etag = self._listed.get(key, (None, ""))
        modified = answer.get("LastModified") or listed_modified
        etag = answer.get("ETag") or listed_etag
        return Document(
            document_id=key,
            title=posixpath.basename(key),
            text=text,
            version=etag,
            updated_at=iso_utc(modified.timestamp()) if modified else None,
            metadata={
                "bucket": settings.bucket,
                "key": key,
                "path": f"s3://{settings.bucket}/{key}",
                "size": answer.get("ContentLength", len(body)),
                "etag": etag.strip('"'),
            },
        )

    async def fetch(self, document_id: str) -> Document | None:
        return await asyncio.to_thread(self._get, document_id)

    async def aclose(self) -> None:
        client, self._s3 = self._s3, None
        if client is not None:
            client.close()
