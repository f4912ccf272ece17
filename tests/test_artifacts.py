"""loramint/artifacts.py: `pack-defaults` -> `setup` round trip on a tiny library + residual generator (ΔW
within fp16 tolerance, nearly the same minted adapter), checksums refusing corrupted files by name, targets
never replaced without --force, and an interrupted setup leaving nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramint.adapters import LoraAdapter
from loramint.artifacts import (
    KEEP_FP32_NUMEL,
    MANIFEST,
    MARKER,
    ArtifactError,
    library_bank_factors,
    pack_defaults,
    read_shards,
    setup,
    write_shards,
)
from loramint.cli import main
from loramint.gen.config import GeneratorConfig
from loramint.gen.minter import Minter
from loramint.index import ExpertLibrary
from loramint.training.config import GeneratorTrainConfig
from loramint.training.generator import train_generator

MAX_BYTES = 24_000
"""A per-file limit far below the tiny library's size, so packing must shard and split tensors."""
FP16_TOLERANCE = 2e-3
"""Relative ΔW error allowed per module (fp16 rounding gives ~3e-4; another expert's ΔW is off by ~1)."""
TEXTS = [
    ("arith", "Add the two numbers and give their sum."),
    ("arith", "Multiply both numbers together."),
    ("arith", "Subtract the second number from the first one."),
    ("arith", "Compute the sum of a list of integers."),
    ("write", "Write a short poem about the sea."),
    ("write", "Tell a short story about a dragon."),
    ("write", "Write a haiku about autumn leaves."),
    ("write", "Compose a limerick about a cat."),
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny-llama library (two clusters of experts) and a residual generator trained briefly on it, under
    <root>/data, packed into <root>/artifacts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    data = root / "data"
    centres = {
        f: LoraAdapter.random("tiny-llama", r=2, seed=100 + c) for c, f in enumerate(("arith", "write"))
    }
    with ExpertLibrary.open(data / "library-tiny") as library:
        for j, (family, text) in enumerate(TEXTS):
            jitter = LoraAdapter.random("tiny-llama", r=2, seed=j)
            weights = {
                m: (a + 0.05 * jitter.weights[m][0], b + 0.05 * jitter.weights[m][1])
                for m, (a, b) in centres[family].weights.items()
            }
            metrics = {"answer_nll_after": 1.0 + j / 10, "config_hash": f"h{j}", "per_example": [0.5, j]}
            library.add(
                LoraAdapter(centres[family].config, weights),
                id=f"{family}_{j}",
                name=f"{family} task {j}",
                description=text,
                family=family,
                metrics=metrics,
            )
    config = GeneratorTrainConfig(
        library=str(data / "library-tiny"),
        out=str(data / "generator" / "tiny"),
        model=GeneratorConfig(d_model=32, hidden=64, d_latent=8, residual_k=2),
        steps=20,
        batch_size=4,
        lr=3e-3,
        top_k=2,
        val_tasks=0,
    )
    train_generator(config, progress=False)
    summary = pack_defaults(
        data / "library-tiny", data / "generator" / "tiny", root / "artifacts", data, max_bytes=MAX_BYTES
    )
    return {"root": root, "data": data, "artifacts": root / "artifacts", "summary": summary}


def _copy_artifacts(packed, tmp_path):
    return shutil.copytree(packed["artifacts"], tmp_path / "artifacts")


def _relative_errors(original: LoraAdapter, restored: LoraAdapter) -> list[float]:
    assert restored.modules == original.modules
    return [
        float((restored.delta(m) - original.delta(m)).norm() / original.delta(m).norm())
        for m in original.modules
    ]


def test_pack_writes_small_checksummed_files_and_no_databases(packed):
    artifacts, summary = packed["artifacts"], packed["summary"]
    manifest = json.loads((artifacts / MANIFEST).read_text())
    assert manifest["bundles"] == {
        "library": {"dir": "library-tiny", "target": "library-tiny"},
        "generator": {"dir": "generator-tiny", "target": "generator/tiny"},
    }
    on_disk = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {MANIFEST}
    for name, entry in manifest["files"].items():
        assert (artifacts / name).stat().st_size == entry["bytes"] <= MAX_BYTES, name
        assert name.endswith((".json", ".safetensors")), name  # no SQLite, FAISS or pickle files
    library_shards = [n for n in on_disk if n.startswith("library-tiny/experts")]
    assert len(library_shards) > 1, "the tiny limit must force several shards"
    split = [k for n in on_disk if n.endswith(".safetensors") for k in load_file(artifacts / n) if "@" in k]
    assert split, "a tensor above the limit must be split into parts"
    experts = load_file(artifacts / library_shards[0])
    assert experts and all(t.dtype == torch.float16 for t in experts.values())
    model = read_shards([artifacts / n for n in sorted(on_disk) if n.startswith("generator-tiny/model")])
    assert model and all(t.dtype == torch.float16 for k, t in model.items() if t.numel() > KEEP_FP32_NUMEL)
    small = [k for k, t in model.items() if t.numel() <= KEEP_FP32_NUMEL]  # biases, the mixing gains
    assert small and all(model[k].dtype == torch.float32 for k in small)
    index = json.loads((artifacts / "library-tiny" / "library.json").read_text())
    assert [e["id"] for e in index["experts"]] == [f"{f}_{j}" for j, (f, _) in enumerate(TEXTS)]
    assert 0 < summary["library"]["fp16_max_relative_delta_error"] < FP16_TOLERANCE
    assert summary["bank_missing"] == []  # the generator's bank names the packed library's experts
    # the bank's expert factors are the library's: packed once, in the library
    pack = json.loads((artifacts / "generator-tiny" / "pack.json").read_text())
    derived = pack["files"]["bank.safetensors"]["from_library"]
    assert derived["keys"] and all(k.startswith("factors.") for k in derived["keys"])
    assert 0 <= derived["max_relative_error"] < FP16_TOLERANCE
    stored = read_shards(
        [artifacts / "generator-tiny" / n for n in pack["files"]["bank.safetensors"]["shards"]]
    )
    assert {"keys", "mu", "logvar"} <= stored.keys() and not any(k.startswith("factors.") for k in stored)
    # generator.json ships byte for byte
    original = (packed["data"] / "generator" / "tiny" / "generator.json").read_bytes()
    assert (artifacts / "generator-tiny" / "generator.json").read_bytes() == original


def test_setup_round_trip_restores_library_and_generator(packed, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["setup", "--artifacts", str(packed["artifacts"]), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "library: restored" in out and "generator: restored" in out

    with (
        ExpertLibrary.open(packed["data"] / "library-tiny") as before,
        ExpertLibrary.open(data / "library-tiny", create=False) as after,
    ):
        old, new = before.list(), after.list()
        assert [e.id for e in new] == [e.id for e in old]  # same ids, same order
        for a, b in zip(old, new, strict=True):
            assert (b.name, b.description, b.family, b.metrics, b.created_at) == (
                a.name,
                a.description,
                a.family,
                a.metrics,
                a.created_at,  # kept, so repacking a restored library gives the same library.json
            )
            assert (b.base_model, b.rank, b.alpha, b.modules) == (a.base_model, a.rank, a.alpha, a.modules)
            assert max(_relative_errors(a.load_adapter(), b.load_adapter())) < FP16_TOLERANCE
        # the tolerance tells experts apart: a sibling in the same cluster (5% noise) is far outside it
        assert min(_relative_errors(old[0].load_adapter(), new[1].load_adapter())) > 10 * FP16_TOLERANCE
        _, old_vecs = before.embeddings()
        _, new_vecs = after.embeddings()
        assert float((old_vecs * new_vecs).sum(1).min()) > 0.999  # recomputed with the same encoder
        hit, _ = after.search(TEXTS[5][1], k=1)[0]
        assert hit.id == "write_5"

    original = packed["data"] / "generator" / "tiny"
    restored = data / "generator" / "tiny"
    for name in ("generator.json", "normalizer.safetensors"):
        assert (restored / name).read_bytes() == (original / name).read_bytes(), name
    bank_old, bank_new = load_file(original / "bank.safetensors"), load_file(restored / "bank.safetensors")
    assert bank_new.keys() == bank_old.keys()
    for (
        key
    ) in bank_old:  # retrieval keys and latents as stored; the experts' factors from the restored library
        if key.startswith("factors."):
            rel = (bank_new[key].float() - bank_old[key].float()).norm() / bank_old[key].float().norm()
            assert bank_new[key].dtype == torch.float16 and 0 <= float(rel) < FP16_TOLERANCE, key
        else:
            assert torch.equal(bank_new[key], bank_old[key]), key
    model_old, model_new = (
        load_file(original / "model.safetensors"),
        load_file(restored / "model.safetensors"),
    )
    assert model_new.keys() == model_old.keys()
    for key, tensor in model_old.items():
        assert model_new[key].dtype == tensor.dtype == torch.float32
        torch.testing.assert_close(model_new[key], tensor, rtol=1e-3, atol=1e-4)
        if tensor.numel() <= KEEP_FP32_NUMEL:  # kept float32 in the pack: restored exactly
            assert torch.equal(model_new[key], tensor), key

    text = "Add up the numbers and report the total."
    minted_old, minted_new = (
        Minter.from_pretrained(original).mint(text),
        Minter.from_pretrained(restored).mint(text),
    )
    assert minted_new.config == minted_old.config
    assert max(_relative_errors(minted_old, minted_new)) < 1e-2
    assert (restored / MARKER).is_file() and (data / "library-tiny" / MARKER).is_file()
    # a repack of the restored library keeps every expert's record (times included) and the factors exactly
    # (fp16 values are a fixed point of packing; only the pack's own fp16 error, now 0, changes)
    repack = tmp_path / "repack"
    pack_defaults(data / "library-tiny", None, repack, data, max_bytes=MAX_BYTES)
    first, again = packed["artifacts"] / "library-tiny", repack / "library-tiny"
    index_a, index_b = (json.loads((f / "library.json").read_text()) for f in (first, again))

    def records(index):  # the content hash is of the factors, which the first fp16 round trip rounds
        return [{k: v for k, v in e.items() if k != "content_hash"} for e in index["experts"]]

    assert records(index_b) == records(index_a)
    assert index_b["fp16_max_relative_delta_error"] == 0.0
    shards = sorted(p.name for p in first.glob("experts-*.safetensors"))
    old_t, new_t = read_shards([first / n for n in shards]), read_shards([again / n for n in shards])
    assert new_t.keys() == old_t.keys()
    for key, tensor in old_t.items():
        if not key.endswith("/embedding"):  # embeddings are recomputed by the encoder at setup
            assert torch.equal(new_t[key], tensor), key


def test_setup_is_idempotent_and_never_overwrites_without_force(packed, tmp_path, capsys):
    data = tmp_path / "data"
    first = setup(packed["artifacts"], data)
    assert first["library"]["status"] == first["generator"]["status"] == "restored"
    sqlite = data / "library-tiny" / "library.sqlite"
    stamp = sqlite.stat().st_mtime_ns
    again = setup(packed["artifacts"], data)
    assert again["library"]["status"] == again["generator"]["status"] == "up to date"
    assert sqlite.stat().st_mtime_ns == stamp

    # a target that setup did not write (a locally built generator) is refused, and nothing else is written
    shutil.rmtree(data / "library-tiny")
    generator = data / "generator" / "tiny"
    (generator / MARKER).unlink()
    (generator / "mine.txt").write_text("my own generator")
    with pytest.raises(ArtifactError, match=r"generator/tiny exists.*--force"):
        setup(packed["artifacts"], data)
    assert not (data / "library-tiny").exists(), "setup wrote before refusing"
    assert (generator / "mine.txt").read_text() == "my own generator"
    assert main(["setup", "--artifacts", str(packed["artifacts"]), "--data", str(data)]) == 2

    assert main(["setup", "--artifacts", str(packed["artifacts"]), "--data", str(data), "--force"]) == 0
    out = capsys.readouterr().out
    assert "generator: replaced" in out and "library: restored" in out
    assert not (generator / "mine.txt").exists() and (generator / "model.safetensors").is_file()
    assert not [p for p in (data / "generator").iterdir() if p.name.startswith(".")]  # no temp leftovers

    # a target set up from other (older) artifacts is not replaced silently either
    (data / "library-tiny" / MARKER).write_text(json.dumps({"bundle_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match=r"library-tiny was set up from other artifacts.*--force"):
        setup(packed["artifacts"], data)

    # pack refuses a non-empty artifacts folder too
    with pytest.raises(ArtifactError, match="not empty"):
        pack_defaults(data / "library-tiny", generator, packed["artifacts"], data)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_artifact_is_refused_by_name_before_anything_is_written(packed, tmp_path, capsys, damage):
    artifacts = _copy_artifacts(packed, tmp_path)
    victim = sorted((artifacts / "generator-tiny").glob("bank*.safetensors"))[-1]
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    data = tmp_path / "data"
    with pytest.raises(ArtifactError, match=victim.name) as info:
        setup(artifacts, data)
    assert "nothing was written" in str(info.value)
    assert not data.exists()
    assert main(["setup", "--artifacts", str(artifacts), "--data", str(data)]) == 2
    assert victim.name in capsys.readouterr().out and not data.exists()


def test_an_interrupted_setup_leaves_no_half_written_target(packed, tmp_path, monkeypatch):
    import loramint.artifacts as artifacts_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    data = tmp_path / "data"
    monkeypatch.setattr(artifacts_module, "_restore_generator", crash)
    with pytest.raises(KeyboardInterrupt):
        setup(packed["artifacts"], data)
    assert not (data / "generator" / "tiny").exists()
    assert not list((data / "generator").iterdir()), "the temp folder must be removed"
    assert (data / "library-tiny" / MARKER).is_file()  # the finished bundle stays
    monkeypatch.undo()
    result = setup(packed["artifacts"], data)
    assert result["library"]["status"] == "up to date" and result["generator"]["status"] == "restored"


def test_a_library_packed_alone_stays_current_when_a_generator_joins_the_artifacts(packed, tmp_path, capsys):
    data, root = packed["data"], tmp_path
    alone = pack_defaults(data / "library-tiny", None, root / "alone", data, max_bytes=MAX_BYTES)
    assert "generator" not in alone and json.loads((root / "alone" / MANIFEST).read_text())["bundles"] == {
        "library": {"dir": "library-tiny", "target": "library-tiny"}
    }
    restored = root / "data"
    assert setup(root / "alone", restored)["library"]["status"] == "restored"
    assert not (restored / "generator").exists()
    with ExpertLibrary.open(restored / "library-tiny", create=False) as lib:
        assert [e.id for e in lib.list()] == [f"{f}_{j}" for j, (f, _) in enumerate(TEXTS)]
    # the full artifacts hold the same library bundle: it is not stale, only the generator is new
    summary = setup(packed["artifacts"], restored)
    assert summary["library"]["status"] == "up to date" and summary["generator"]["status"] == "restored"
    assert main(["pack-defaults", "--library", str(data / "library-tiny"), "--generator", "null",
                 "--out", str(root / "cli"), "--data", str(data)]) == 0  # fmt: skip
    assert "packed 8 experts into" in capsys.readouterr().out


def test_shards_split_and_join_tensors_exactly(tmp_path):
    tensors = {
        "big": torch.randn(50, 40),
        "small": torch.arange(6, dtype=torch.int64),
        "half": torch.randn(3).half(),
    }
    names = write_shards(tensors, tmp_path, "t", max_bytes=5000)
    assert len(names) > 1 and all((tmp_path / n).stat().st_size <= 5000 for n in names)
    back = read_shards([tmp_path / n for n in names])
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ArtifactError, match="incomplete"):
        read_shards([tmp_path / n for n in names[1:]])
    with pytest.raises(ArtifactError, match="'@'"):
        write_shards({"a@1": torch.zeros(1)}, tmp_path, "bad")
    with pytest.raises(ArtifactError, match="cannot be split"):
        write_shards({"row": torch.zeros(2, 4000)}, tmp_path, "wide", max_bytes=5000)


COMMITTED = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.mark.e2e
@pytest.mark.skipif(
    not (COMMITTED / MANIFEST).is_file(), reason="no committed artifacts/ (loramint pack-defaults)"
)
def test_the_committed_default_artifacts_set_up_and_mint(tmp_path):
    """What a fresh clone does: the repository's own artifacts restore a library and a generator that mints."""
    summary = setup(COMMITTED, tmp_path / "data")
    bundles = json.loads((COMMITTED / MANIFEST).read_text())["bundles"]
    assert summary["library"]["experts"] > 0 and summary["library"]["min_embedding_cosine"] > 0.99
    with ExpertLibrary.open(tmp_path / "data" / bundles["library"]["target"], create=False) as lib:
        (hit, score), *_ = lib.search("Put these words in alphabetical order", k=3)
        assert hit.name == "proc.sort_words" and score > 0.5, (hit.name, score)
    if "generator" not in bundles:
        pytest.skip("the committed artifacts hold the library alone (no generator bundle yet)")
    generator = tmp_path / "data" / bundles["generator"]["target"]
    adapter = Minter.from_pretrained(generator).mint("Answer questions about how long everyday events last")
    adapter.validate("smollm2-135m")
    assert LoraAdapter.load(adapter.save(tmp_path / "minted")).config.r == adapter.config.r


def test_an_empty_library_left_by_serve_before_setup_is_replaced_but_a_used_one_is_not(packed, tmp_path):
    data = tmp_path / "data"
    ExpertLibrary.open(data / "library-tiny").close()  # what `loramint serve` leaves when run before setup
    result = setup(packed["artifacts"], data)
    assert result["library"]["status"] == "restored" and result["library"]["experts"] == len(TEXTS)

    other = tmp_path / "other"
    with ExpertLibrary.open(other / "library-tiny") as library:
        library.add(
            LoraAdapter.random("tiny-llama", r=2), id="mine", name="mine", description="My own expert."
        )
    with pytest.raises(ArtifactError, match="library-tiny exists and was not set up"):
        setup(packed["artifacts"], other)
    with ExpertLibrary.open(other / "library-tiny", create=False) as library:
        assert [e.id for e in library.list()] == ["mine"]


def test_an_ensemble_packs_once_per_bank_and_restores_minting_exactly(packed, tmp_path):
    """A bfloat16-decoding ensemble: its members' shared bank tensors are packed once (the experts' factors not
    at all: the library holds them), and the restored ensemble mints exactly (bit for bit) what the packed one
    mints over the packed library's factors."""
    from loramint.gen.ensemble import save_ensemble
    from loramint.gen.layout import Layout

    data = packed["data"]
    member = shutil.copytree(data / "generator" / "tiny", tmp_path / "member")
    meta = json.loads((member / "generator.json").read_text())
    bank = load_file(member / "bank.safetensors")
    bank |= library_bank_factors(
        data / "library-tiny", meta["bank"], Layout.from_json(meta["layout"]), fp16=True
    )
    save_file(bank, str(member / "bank.safetensors"))  # the factors the packed (fp16) library gives
    ensemble = save_ensemble(
        tmp_path / "src" / "generator" / "ens", [member, member], decode_dtype="bfloat16"
    )
    shutil.copytree(data / "library-tiny", tmp_path / "src" / "library-tiny")
    pack_defaults(
        tmp_path / "src" / "library-tiny",
        ensemble,
        tmp_path / "artifacts",
        tmp_path / "src",
        max_bytes=MAX_BYTES,
    )
    index = json.loads((tmp_path / "artifacts" / "generator-ens" / "pack.json").read_text())
    bank = index["files"]["member-1/bank.safetensors"]
    assert bank["shared"]["from"] == "member-0/bank.safetensors" and not bank["shards"]  # all shared
    assert index["files"]["member-0/bank.safetensors"]["from_library"]["max_relative_error"] == 0.0
    assert any(k.startswith("heads.") for k in index["files"]["member-0/model.safetensors"]["upcast"])
    summary = setup(tmp_path / "artifacts", tmp_path / "restored")
    assert summary["generator"]["status"] == "restored"
    before = Minter.from_pretrained(ensemble)
    after = Minter.from_pretrained(tmp_path / "restored" / "generator" / "ens")
    for text in ("Add up the numbers and report the total.", TEXTS[0][1]):
        a, b = before.mint(text), after.mint(text)
        assert a.config.r == b.config.r
        assert all(torch.equal(a.delta(m), b.delta(m)) for m in a.modules), text
