"""connectors.yaml: what loads, and errors that say where the problem is."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from aggregator.runtime.config import ConfigError, load_config, parse_config

GOOD = """
server:
  api_keys:
    - key: ${KEY}
      knowledge_ids: [demo]
    - key: ${OTHER:-fallback-key}
  deadline_s: 3.5
defaults:
  timeout_s: 2.0
knowledge_bases:
  demo:
    connectors: [samples, partner]
connectors:
  samples:
    type: files
    path: ./samples
  partner:
    type: dify
    endpoint: http://127.0.0.1:9/api/
    api_key: ${PARTNER_KEY}
    knowledge_id: abc
    timeout_s: 1.0
    weight: 0.5
"""


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), environ or {"KEY": "k", "PARTNER_KEY": "p"})
    return caught.value.errors


def test_a_good_config_loads_with_env_and_defaults():
    config = parse_config(GOOD, {"KEY": "secret-1", "PARTNER_KEY": "secret-2"})
    assert config.server.api_keys[0].key.get_secret_value() == "secret-1"
    assert config.server.api_keys[1].key.get_secret_value() == "fallback-key"
    assert config.server.api_keys[1].knowledge_ids == ["*"]
    assert config.server.deadline_s == 3.5
    partner = config.effective("partner")
    assert partner.timeout_s == 1.0 and partner.retries == 2  # own value kept, default filled
    assert config.effective("samples").timeout_s == 2.0
    assert partner.endpoint == "http://127.0.0.1:9/api"
    assert len(config.version) == 12


def test_environment_value_wins_over_default():
    config = parse_config(GOOD, {"KEY": "a", "OTHER": "from-env", "PARTNER_KEY": "p"})
    assert config.server.api_keys[1].key.get_secret_value() == "from-env"


def test_missing_variable_names_its_place():
    errors = errors_of(GOOD, {"KEY": "k"})
    assert errors == ["connectors.partner.api_key: environment variable PARTNER_KEY is not set (and no ${PARTNER_KEY:-default} given)"]


def test_unknown_keys_are_rejected_everywhere():
    errors = errors_of(GOOD.replace("deadline_s: 3.5", "deadline_s: 3.5\n  deadlin: 2").replace("    weight: 0.5", "    weight: 0.5\n    wieght: 2"))
    assert "server.deadlin: unknown key" in errors
    assert "connectors.partner.wieght: unknown key" in errors


def test_missing_required_field_names_connector_and_field():
    errors = errors_of(GOOD.replace("    knowledge_id: abc\n", ""))
    assert errors == ["connectors.partner.knowledge_id: field required"]


def test_unknown_connector_type_lists_known_ones():
    errors = errors_of(GOOD.replace("type: files", "type: filez"))
    assert len(errors) == 1 and errors[0].startswith("connectors.samples: unknown connector type 'filez'; known types:")
    assert "files" in errors[0] and "dify" in errors[0]


def test_knowledge_base_may_only_name_defined_connectors():
    errors = errors_of(GOOD.replace("[samples, partner]", "[samples, partner, wiki]"))
    assert errors == ["knowledge_bases.demo.connectors[2]: no connector named 'wiki' is defined"]


def test_key_scope_must_name_existing_knowledge_bases():
    errors = errors_of(GOOD.replace("knowledge_ids: [demo]", "knowledge_ids: [demo, nope]"))
    assert errors == ["server.api_keys[0].knowledge_ids[1]: no knowledge base named 'nope'"]


def test_every_error_is_listed_not_just_the_first():
    broken = GOOD.replace("deadline_s: 3.5", "deadline_s: -1").replace("weight: 0.5", "weight: lots").replace("    path: ./samples\n", "")
    errors = errors_of(broken)
    assert len(errors) == 3
    assert any(e.startswith("server.deadline_s:") for e in errors)
    assert any(e.startswith("connectors.partner.weight:") for e in errors)
    assert "connectors.samples.path: field required" in errors


def test_bad_yaml_says_where():
    errors = errors_of("server:\n  api_keys: [\n")
    assert len(errors) == 1 and errors[0].startswith("line ") and "not valid YAML" in errors[0]


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "42"])
def test_not_a_mapping(text):
    assert errors_of(text)[0].startswith("(top level)")


def test_endpoint_must_be_http():
    errors = errors_of(GOOD.replace("http://127.0.0.1:9/api/", "ftp://example.com"))
    assert errors[0].startswith("connectors.partner.endpoint:")


def test_errors_never_echo_secrets():
    try:
        parse_config(GOOD.replace("weight: 0.5", "weight: [1]"), {"KEY": "topsecret-key", "PARTNER_KEY": "topsecret-partner"})
    except ConfigError as exc:
        assert "topsecret" not in str(exc)
    else:
        pytest.fail("expected a ConfigError")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text(GOOD)
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "conf" / "c.yaml", {"KEY": "k", "PARTNER_KEY": "p"})
    assert config.connectors["samples"].path == (tmp_path / "conf" / "samples").resolve()


def test_config_path_falls_back_to_environment_then_cwd(tmp_path: Path, monkeypatch):
    (tmp_path / "connectors.yaml").write_text(GOOD)
    (tmp_path / "other.yaml").write_text(GOOD.replace("deadline_s: 3.5", "deadline_s: 2.5"))
    monkeypatch.chdir(tmp_path)
    env = {"KEY": "k", "PARTNER_KEY": "p"}
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    assert load_config(None, env).server.deadline_s == 3.5
    monkeypatch.setenv("AGGREGATOR_CONFIG", str(tmp_path / "other.yaml"))
    assert load_config(None, env).server.deadline_s == 2.5


def test_unreadable_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in caught.value.errors[0]


def test_bundled_config_is_valid():
    config = load_config(Path(__file__).parent.parent / "connectors.yaml", {})
    assert "demo" in config.knowledge_bases


def test_connector_names_must_be_safe_in_headers_and_metrics():
    errors = errors_of(GOOD.replace("  samples:\n", "  sam;ples=x:\n").replace("[samples, partner]", "['sam;ples=x', partner]"))
    assert errors == ["connectors.sam;ples=x: a connector name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"]


def test_a_password_written_into_a_url_is_a_secret_too(tmp_path: Path):
    """A dead upstream's error names its URL; the password in it never reaches /status or the page."""
    from fastapi.testclient import TestClient

    from aggregator.web.api import create_app

    from testkit.loopback import free_port

    endpoint = f"http://reader:pa%24%24word-42@127.0.0.1:{free_port()}/api"
    config = parse_config(GOOD.replace("http://127.0.0.1:9/api/", endpoint).replace("./samples", str(tmp_path)), {"KEY": "k", "PARTNER_KEY": "p"})
    assert {"pa%24%24word-42", "pa$$word-42"} <= set(config.secrets())
    with TestClient(create_app(lambda: config)) as client:
        body = {"knowledge_id": "demo", "query": "keys", "retrieval_setting": {"top_k": 3, "score_threshold": 0}}
        response = client.post("/retrieval", json=body, headers={"Authorization": "Bearer k"})
        assert response.status_code == 200 and "partner=error" in response.headers["X-Sources"]
        status, page = client.get("/status").text, client.get("/").text
    assert "127.0.0.1" in status, "the error is shown, with its URL"
    assert "word-42" not in status and "word-42" not in page


def test_one_home_for_defaults_a_block_fills_only_what_a_source_leaves_unset(tmp_path):
    """A source's settings start from connectors/base.py's defaults (so a connector built without a config has
    them too); `defaults:` replaces them where a source is silent; a source's own value wins, even the default's."""
    from aggregator.runtime.config import Defaults
    from connectors.files import FilesSettings

    built = FilesSettings(type="files", path=tmp_path)
    assert (built.timeout_s, built.retries, built.chunk_chars) == (Defaults().timeout_s, Defaults().retries, Defaults().chunk_chars)
    config = parse_config(
        "server: {api_keys: [{key: k-0123456789abcdef}]}\n"
        "defaults: {timeout_s: 5.0, chunk_chars: 800}\n"
        "knowledge_bases: {kb: {connectors: [quiet, own]}}\n"
        f"connectors:\n  quiet: {{type: files, path: {tmp_path}}}\n  own: {{type: files, path: {tmp_path}, timeout_s: 3.0, retries: 0}}\n",
        {},
    )
    quiet, own = config.effective("quiet"), config.effective("own")
    assert (quiet.timeout_s, quiet.chunk_chars, quiet.retries) == (5.0, 800, Defaults().retries)
    assert (own.timeout_s, own.chunk_chars, own.retries) == (3.0, 800, 0)
