"""loramint.encoders: unit vectors, per-text cache, examples mixed in, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from loramint.encoders import Encoder, EncoderConfig
from loramint.errors import ModelError


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def test_vectors_are_unit_norm_and_semantic(encoder):
    vecs = encoder.encode(
        ["How long do everyday events last?", "Estimate the duration of an event", "Multiply two numbers"]
    )
    assert vecs.shape == (3, encoder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_single_text_and_empty_batch(encoder):
    assert encoder.encode("hello").shape == (encoder.dim,)
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_cache_avoids_recomputation(encoder, monkeypatch):
    encoder.encode(["a cached sentence", "another one"])
    seen = []
    original = encoder._embed
    monkeypatch.setattr(encoder, "_embed", lambda texts: seen.extend(texts) or original(texts))
    out = encoder.encode(["another one", "a new sentence", "a cached sentence", "a new sentence"])
    assert seen == ["a new sentence"], "only the uncached text, once, reaches the model"
    np.testing.assert_array_equal(out[1], out[3])


def test_same_vectors_as_sentence_transformers(encoder):
    texts = [
        "Classify the sentiment of a review",
        "Add two numbers",
        "x",
        "Translate English into French " * 9,
    ]
    expected = encoder.model.encode(texts, batch_size=2, normalize_embeddings=True, convert_to_numpy=True)
    fresh = Encoder(EncoderConfig(batch_size=2, cache_size=0))
    np.testing.assert_allclose(fresh.encode(texts), expected, atol=1e-6)


def test_threads_encode_at_once(encoder):
    """Callers on several threads share the model (only the tokenizer is locked) and get their own rows."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"Answer questions about topic number {i} in one word" for i in range(24)]
    expected = Encoder(EncoderConfig(cache_size=0)).encode(texts)
    fresh = Encoder(EncoderConfig(cache_size=0, batch_size=3))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fresh.encode, [texts[i : i + 6] for i in range(0, 24, 6)] * 3))
    for k, rows in enumerate(got):
        np.testing.assert_allclose(rows, expected[(k % 4) * 6 : (k % 4) * 6 + 6], atol=1e-6)


def test_lru_cache_is_bounded():
    small = Encoder(EncoderConfig(cache_size=2))
    small.encode(["one", "two", "three"])
    assert list(small._cache) == ["two", "three"]


def test_examples_pull_the_task_vector(encoder):
    plain = encoder.encode_task("Solve the problem")
    with_examples = encoder.encode_task("Solve the problem", ["3 plus 4 equals 7", "10 plus 5 equals 15"])
    assert abs(np.linalg.norm(with_examples) - 1.0) < 1e-5
    arithmetic = encoder.encode("Add two numbers")
    assert with_examples @ arithmetic > plain @ arithmetic


def test_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load encoder"):
        Encoder(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("kwargs", [dict(examples_weight=-1.0), dict(batch_size=0), dict(cache_size=-1)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        EncoderConfig(**kwargs)
