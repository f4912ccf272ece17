"""loramint.adapters: PEFT-format round trip, validation errors, application and merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramint.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, LoraAdapter, apply_lora, merge_lora
from loramint.errors import AdapterError


def _logits(base, text="Add the two numbers: 3 plus 4"):
    ids = base.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return base.model(**ids).logits


def _peft_logits(base, folder, merged: bool):
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(folder))
    if merged:
        model = model.merge_and_unload()
    ids = base.tokenizer("Add the two numbers: 3 plus 4", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _check_peft_equivalence(base, adapter, tmp_path, atol=1e-5):
    folder = adapter.save(tmp_path / "adapter")
    before = _logits(base)
    with apply_lora(base.model, adapter):
        ours = _logits(base)
    assert torch.equal(_logits(base), before), "apply_lora must leave the model as it was"
    assert (ours - before).abs().max() > 1e-4, "the adapter must change the outputs"
    for merged in (False, True):
        theirs = _peft_logits(base, folder, merged)
        torch.testing.assert_close(theirs, ours, atol=atol, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, target_modules=("q_proj", "v_proj")),
        dict(
            r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        ),
        dict(r=2, target_modules=("v_proj",), layers=[1]),
        dict(r=16, alpha=4.0, target_modules=("down_proj",)),
    ],
)
def test_peft_round_trip_tiny(tiny, tmp_path, kwargs):
    adapter = LoraAdapter.random("tiny-llama", seed=1, std=0.2, **kwargs)
    _check_peft_equivalence(tiny, adapter, tmp_path)
    again = LoraAdapter.load(tmp_path / "adapter")
    assert again.content_hash() == adapter.content_hash()
    assert again.config.base_model == "tiny-llama"


@pytest.mark.e2e
def test_peft_round_trip_smollm2(smollm2, tmp_path):
    adapter = LoraAdapter.random("smollm2-135m", r=8, seed=3, std=0.05)
    # 30 layers of float32 rounding on logits of magnitude ~20: 2e-4 absolute is still float noise
    _check_peft_equivalence(smollm2, adapter, tmp_path, atol=2e-4)
    cfg = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_written_config_is_vllm_friendly(tmp_path):
    LoraAdapter.random("tiny-llama", r=4).save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] is None and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "loramint/tiny-llama"
    keys = load_file(tmp_path / WEIGHTS_FILE).keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)


def test_merge_equals_hooks(tiny):
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=5, std=0.2)
    with apply_lora(tiny.model, adapter):
        hooked = _logits(tiny)
    before = _logits(tiny)
    merge_lora(tiny.model, adapter)
    try:
        torch.testing.assert_close(_logits(tiny), hooked, atol=1e-5, rtol=1e-4)
    finally:
        merge_lora(tiny.model, adapter, scale=-1.0)
    torch.testing.assert_close(_logits(tiny), before, atol=1e-5, rtol=1e-4)


def _corrupt(folder, edit):
    state = load_file(folder / WEIGHTS_FILE)
    edit(state)
    save_file(state, folder / WEIGHTS_FILE)


def _first_a(state):
    return next(k for k in state if k.endswith("lora_A.weight"))


BAD_ADAPTERS = [
    ("nan", lambda f: _corrupt(f, lambda s: s[_first_a(s)].__setitem__((0, 0), float("nan"))), "NaN"),
    (
        "wrong width",
        lambda f: _corrupt(f, lambda s: s.__setitem__(_first_a(s), torch.zeros(4, 65))),
        "another base model",
    ),
    (
        "unknown module",
        lambda f: _corrupt(
            f,
            lambda s: s.update(
                {
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
                }
            ),
        ),
        "does not have",
    ),
    (
        "A without B",
        lambda f: _corrupt(f, lambda s: s.pop(next(k for k in list(s) if k.endswith("lora_B.weight")))),
        "without",
    ),
    (
        "bias tensor",
        lambda f: _corrupt(
            f, lambda s: s.update({"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
        ),
        "unexpected tensors",
    ),
    ("pickle file", lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."), "pickle"),
    ("no weights", lambda f: (f / WEIGHTS_FILE).unlink(), "no adapter_model.safetensors"),
    ("garbage weights", lambda f: (f / WEIGHTS_FILE).write_bytes(b"not safetensors"), "safetensors"),
    ("bad json", lambda f: (f / CONFIG_FILE).write_text("{"), "not valid JSON"),
    ("dora", lambda f: _edit_config(f, use_dora=True), "DoRA"),
    ("modules_to_save", lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    (
        "unknown base",
        lambda f: _edit_config(f, base_model_name_or_path="/nonexistent/model"),
        "unknown base model",
    ),
    # uploads that once gave a 500, a dropped connection, or an adapter that failed every completion
    ("r infinite", lambda f: _edit_config(f, r=float("inf")), "'r' must be an integer"),
    ("r huge", lambda f: _edit_config(f, r=1e308), "'r' must be an integer"),
    ("alpha nan", lambda f: _edit_config(f, lora_alpha=float("nan")), "'lora_alpha' must be a finite"),
    ("rank_pattern int", lambda f: _edit_config(f, rank_pattern=3), "rank_pattern must be an object"),
    (
        "rank_pattern list",
        lambda f: _edit_config(f, rank_pattern=["q_proj"]),
        "rank_pattern must be an object",
    ),
    ("base model an int", lambda f: _edit_config(f, base_model_name_or_path=7), "must be a string"),
    ("bad regex key", lambda f: _edit_config(f, rank_pattern={"q_proj(": 2}), "not a module path"),
    ("costly regex key", lambda f: _edit_config(f, rank_pattern={"(a+)+$": 2}), "not a module path"),
    ("string alpha value", lambda f: _edit_config(f, alpha_pattern={"q_proj": "8"}), "finite positive"),
    ("zero rank value", lambda f: _edit_config(f, rank_pattern={"q_proj": 0}), r"integers in \[1"),
]


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,damage,message", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapters_are_refused_with_a_clear_error(tmp_path, name, damage, message):
    folder = LoraAdapter.random("tiny-llama", r=4).save(tmp_path / "a")
    damage(folder)
    with pytest.raises(AdapterError, match=message):
        LoraAdapter.load(folder)


def test_wrong_base_model_is_refused(tmp_path):
    folder = LoraAdapter.random("tiny-llama", r=4).save(tmp_path / "a")
    with pytest.raises(AdapterError, match="made for base model"):
        LoraAdapter.load(folder, base_model="smollm2-135m")


def test_scaling_follows_peft_patterns():
    adapter = LoraAdapter.random("tiny-llama", r=4, alpha=8.0)
    module = "model.layers.0.self_attn.q_proj"
    assert adapter.config.scaling(module) == 2.0
    adapter.config.rank_pattern = {"q_proj": 2}
    assert adapter.config.scaling(module) == 4.0
    adapter.config.use_rslora = True
    assert adapter.config.scaling(module) == pytest.approx(8.0 / 2**0.5)
    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "base_model_name_or_path": "tiny-llama",
        "rank_pattern": {"layers.0.*q_proj|^x$": 2},
    }
    assert AdapterConfig.from_peft(cfg, [module], None).scaling(module) == 4.0  # PEFT-style keys still work


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_serializer_writes_the_same_bytes_as_safetensors_torch(dtype):
    from safetensors.torch import save

    from loramint.adapters import serialize

    state = {k: v.to(dtype) for k, v in LoraAdapter.random("tiny-llama", r=4, seed=1).state_dict().items()}
    assert serialize(state) == save(state, metadata={"format": "pt"})


def test_serializer_matches_safetensors_for_mixed_dtypes_empty_and_strided_tensors(tmp_path):
    from safetensors.torch import load_file, save

    from loramint.adapters import serialize

    state = {
        "z.t": torch.randn(5, 3).T,  # not contiguous
        "a": torch.randn(4).half(),
        "m": torch.zeros(0, 7),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.tensor([True, False, True]),
    }
    blob = serialize(state)
    assert blob == save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    (tmp_path / "x.safetensors").write_bytes(blob)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_save_writes_the_serialized_bytes_and_replaces_an_old_file(tmp_path):
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=3)
    adapter.save(tmp_path / "ad")
    LoraAdapter.random("tiny-llama", r=4, seed=4).save(tmp_path / "ad")  # replaced whole
    adapter.save(tmp_path / "ad")
    from loramint.adapters import serialize

    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == serialize(adapter.state_dict())
    assert LoraAdapter.load(tmp_path / "ad").content_hash() == adapter.content_hash()
    assert not [p for p in (tmp_path / "ad").iterdir() if p.name.endswith(".tmp")]


def test_a_config_that_misstates_the_rank_or_the_targets_is_refused(tmp_path):
    """An upload whose adapter_config.json says r=4096 over rank-2 factors, or gives target_modules as a
    number, was accepted (the fault suite found both): PEFT would refuse to load what was stored."""
    import json

    adapter = LoraAdapter.random("tiny-llama", r=2, seed=1)
    folder = adapter.save(tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    for change, message in (
        ({"r": 64}, "the factors have rank 2 but the config says r=64"),
        ({"rank_pattern": {"q_proj": 4}}, "config says r=4"),
        ({"target_modules": 7}, "'target_modules' must be"),
    ):
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            LoraAdapter.load(folder, base_model="tiny-llama").validate()


def test_compact_halves_the_bytes_and_keeps_outputs_and_identity(tiny, tmp_path):
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=3, std=0.2)
    small = adapter.compact()
    assert small.nbytes() * 2 == adapter.nbytes()
    assert all(t.dtype == torch.float16 for pair in small.weights.values() for t in pair)
    assert small.compact() is small  # already float16
    with apply_lora(tiny.model, adapter):
        exact = _logits(tiny)
    with apply_lora(tiny.model, small):
        approx = _logits(tiny)
    torch.testing.assert_close(approx, exact, atol=2e-3, rtol=1e-3)
    folder = small.save(tmp_path / "ad")  # stock PEFT loads float16 factors into a float32 model
    torch.testing.assert_close(_peft_logits(tiny, folder, merged=False), approx, atol=1e-4, rtol=1e-4)
    assert LoraAdapter.load(folder).content_hash() == small.content_hash()
    huge = LoraAdapter.random("tiny-llama", r=4, seed=3)
    first = next(iter(huge.weights))
    huge.weights[first][0][0, 0] = 1e6  # beyond float16: kept as it is
    assert huge.compact() is huge


def test_content_hash_is_remembered_until_a_tensor_or_the_config_changes():
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=1)
    first = adapter.content_hash()
    assert adapter.content_hash() == first
    module = next(iter(adapter.weights))
    adapter.weights[module][1].mul_(2)  # in place: torch bumps the tensor's version
    doubled = adapter.content_hash()
    assert doubled != first
    adapter.weights[module][1].div_(2)
    assert adapter.content_hash() == first
    a, b = adapter.weights[module]
    adapter.weights[module] = (a, b.t().contiguous().t())  # same values, another tensor
    assert adapter.content_hash() == first
    adapter.config.alpha *= 2
    assert adapter.content_hash() != first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_validation_finds_a_single_non_finite_value_in_any_dtype(dtype, bad):
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=2)
    adapter.weights = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in adapter.weights.items()}
    adapter.validate()
    module = list(adapter.weights)[-1]
    adapter.weights[module][1][-1, -1] = bad
    with pytest.raises(AdapterError, match="NaN or infinite"):
        adapter.validate()
