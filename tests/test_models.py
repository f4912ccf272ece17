"""loramint.models: registry, tiny-llama determinism, local paths, verified conversion cache."""

from __future__ import annotations

import shutil

import pytest
import torch

from loramint import models
from loramint.errors import ModelError


def test_tiny_llama_is_deterministic_and_has_a_real_tokenizer():
    a, tok = models.tiny_llama()
    b, _ = models.tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    text = "Ünïcode 😀 and 12 + 30 = 42"
    assert tok.decode(tok(text).input_ids) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    c, _ = models.tiny_llama(seed=1)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize(
    "given,expected",
    [
        ("smollm2-135m", "smollm2-135m"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
        ("huggingfacetb/smollm2-135m-instruct", "smollm2-135m"),
        ("loramint/tiny-llama", "tiny-llama"),
        ("some-org/other-model", "some-org/other-model"),
    ],
)
def test_canonical_names(given, expected):
    assert models.canonical_name(given) == expected


def test_any_local_path_loads(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_base_model(str(tmp_path))
    ids = tiny.tokenizer("Add the two numbers", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**ids).logits, tiny.model(**ids).logits)
    assert models.linear_shapes(str(tmp_path)) == models.linear_shapes("tiny-llama")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load base model"):
        models.load_base_model(str(tmp_path / "missing"))


def test_cached_build_builds_once_and_rebuilds_a_broken_cache(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.bin.safetensors").write_bytes(b"x" * 1000)
        (out / "config.json").write_text("{}")

    final = tmp_path / "model"
    assert models.cached_build(final, build, "test") == final
    models.cached_build(final, build, "test")
    assert len(calls) == 1, "a verified cache must not be rebuilt"

    (final / "weights.bin.safetensors").write_bytes(b"y" * 1000)  # same size, different bytes
    models.cached_build(final, build, "test")
    assert len(calls) == 2 and (final / "weights.bin.safetensors").read_bytes() == b"x" * 1000

    (final / models.MANIFEST).unlink()
    models.cached_build(final, build, "test")
    assert len(calls) == 3

    def failing(out):
        raise RuntimeError("conversion crashed")

    shutil.rmtree(final)
    with pytest.raises(RuntimeError):
        models.cached_build(final, failing, "test")
    assert not final.exists(), "a failed build must not leave a cache behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.") and p.is_dir()]


@pytest.mark.e2e
def test_smollm2_loads_offline_and_answers(smollm2):
    assert smollm2.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = smollm2.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1] :])


@pytest.mark.e2e
def test_smollm2_broken_cache_is_rebuilt(smollm2, tmp_path, monkeypatch):
    real = models.prepare_smollm2()
    gguf = models._fetch_smollm2_gguf()
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path))
    monkeypatch.setenv("LORAMINT_SMOLLM2_GGUF", str(gguf))
    shutil.copytree(real, tmp_path / "models" / "smollm2-135m")
    with open(tmp_path / "models" / "smollm2-135m" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    rebuilt = models.prepare_smollm2()
    assert models.verify_manifest(rebuilt)
    assert (rebuilt / "model.safetensors").stat().st_size == (real / "model.safetensors").stat().st_size
