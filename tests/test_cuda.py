"""The GPU paths give the CPU's results: minting with the generator on the GPU (bank and decoder there, the
experts' factors on the CPU) and the runtime's stacked experts, mixed batches and per-token routing on the
GPU. Skipped without CUDA; CI has no GPU, so these run when a session is lent one (README "GPU")."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

from loramint.adapters import LoraAdapter, apply_mixture
from loramint.gen.canonical import canonicalize
from loramint.gen.layout import Layout, Normalizer
from loramint.gen.minter import Bank, Minter, save_generator
from loramint.gen.model import GeneratorConfig, LoraCVAE
from loramint.runtime.lora import Plan, arrow_router, attach, detach
from loramint.runtime.runtime import Runtime
from loramint.runtime.stack import ExpertStack, linear_shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = ("q_proj", "v_proj")
COND = 16


class HashEncoder:
    """A deterministic stand-in for sentence-transformers: unit vectors from a hash of the text."""

    name, dim = "hash-encoder", COND

    def encode_task(self, description: str, examples=()) -> np.ndarray:
        text = description + "".join(examples or ())
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        v = np.random.default_rng(seed).standard_normal(COND).astype(np.float32)
        return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained residual generator over 6 random tiny-llama experts,
    its weights nudged off their initial values so every part contributes."""
    experts = [
        canonicalize(LoraAdapter.random("tiny-llama", r=2, target_modules=TARGETS, seed=s)) for s in range(6)
    ]
    layout = Layout.of(experts[0])
    samples = [layout.to_tokens(e) for e in experts]
    normalizer = Normalizer.fit(samples)
    config = GeneratorConfig(cond_dim=COND, d_model=32, hidden=64, d_latent=8, residual_k=2)
    torch.manual_seed(0)
    model = LoraCVAE(layout, config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder = HashEncoder()
    keys = torch.from_numpy(np.stack([encoder.encode_task(f"task {i}") for i in range(6)]))
    factors = {g: torch.stack([s[g] for s in samples]) for g in layout.groups}
    bank = Bank([f"e{i}" for i in range(6)], keys, torch.randn(6, 8), torch.randn(6, 8) * 0.1, factors)
    path = save_generator(
        tmp_path_factory.mktemp("gen") / "g", model, normalizer, bank, encoder="hash", top_k=3, tau=0.1
    )
    return path, encoder


def _close(a: LoraAdapter, b: LoraAdapter) -> None:
    assert a.config.r == b.config.r and sorted(a.modules) == sorted(b.modules)
    for m in a.modules:
        torch.testing.assert_close(a.delta(m), b.delta(m), atol=1e-5, rtol=1e-4)


def test_minting_on_the_gpu_equals_minting_on_the_cpu(checkpoint):
    path, encoder = checkpoint
    cpu = Minter.from_pretrained(path, encoder=encoder, device="cpu")
    gpu = Minter.from_pretrained(path, encoder=encoder, device="cuda")
    assert gpu.bank.keys.is_cuda and next(gpu.model.parameters()).is_cuda
    texts = ["task 1", "Add the numbers.", "Write a poem."]
    for text in texts:
        minted = gpu.mint(text)
        assert all(
            not a.is_cuda and not b.is_cuda for a, b in minted.weights.values()
        )  # written from the CPU
        _close(minted, cpu.mint(text))
    for a, b in zip(gpu.mint_many(texts), cpu.mint_many(texts), strict=True):
        _close(a, b)
    _close(gpu.mint(texts[1], rank=3), cpu.mint(texts[1], rank=3))
    _close(gpu.fuse(texts[1:]), cpu.fuse(texts[1:]))


@pytest.mark.parametrize("dense_max", [0, 64])
def test_the_runtime_stack_on_the_gpu_gives_the_cpu_logits(tiny, dense_max):
    """A mixed batch (row i: adapter i, row 3: a mixture) on the GPU-resident stack, dense and gathered,
    equals each row alone on the CPU with its mixture merged; per-token Arrow routing runs there too."""
    adapters = [
        LoraAdapter.random("tiny-llama", r=2 + 2 * s, target_modules=TARGETS, seed=s) for s in range(3)
    ]
    x = torch.randint(0, 200, (4, 7), generator=torch.Generator().manual_seed(0))
    gates = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.3, 0.0, 0.7]])
    model = copy.deepcopy(tiny.model).cuda()
    stack = ExpertStack(linear_shapes(model, TARGETS), capacity=4, max_rank=8, device="cuda")
    slots = torch.tensor([stack.add(f"a{i}", a) for i, a in enumerate(adapters)], device="cuda")
    holder = attach(model, stack)
    try:
        holder.plan = Plan(slots, gates=gates[:, None, :].cuda(), dense_max=dense_max)
        with torch.no_grad():
            mixed = model(input_ids=x.cuda()).logits
        assert mixed.is_cuda
        for row in range(4):
            mixture = [(a, float(w)) for a, w in zip(adapters, gates[row], strict=True) if w]
            with torch.no_grad(), apply_mixture(tiny.model, mixture):
                alone = tiny.model(input_ids=x[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1].cpu(), alone, atol=1e-4, rtol=1e-4)
        holder.plan = Plan(slots, router=arrow_router(stack, slots, top_k=2), dense_max=dense_max)
        with torch.no_grad():
            routed = model(input_ids=x.cuda()).logits
        assert routed.is_cuda and torch.isfinite(routed).all()
    finally:
        detach(model)


def test_the_runtime_generates_on_the_gpu_what_it_generates_on_the_cpu(tiny):
    """`Runtime` end to end on each device: a mixed batch of routes, greedy, the same tokens."""
    adapters = {
        f"e{i}": LoraAdapter.random("tiny-llama", r=4, target_modules=TARGETS, seed=i) for i in range(3)
    }
    texts = ["add 2 and 3", "a poem", "hello there"]
    routes = ["e0", {"e1": 0.5, "e2": 0.5}, None]
    out = {}
    for device in ("cpu", "cuda"):
        base = type(tiny)(tiny.name, tiny.hf_id, copy.deepcopy(tiny.model).to(device), tiny.tokenizer)
        rt = Runtime(base, capacity=4, max_rank=8, target_modules=TARGETS, device=device)
        for name, a in adapters.items():
            rt.add(name, a)
        out[device] = rt.generate(texts, routes, max_new_tokens=6)
        assert rt.stack.A[next(iter(rt.stack.A))].device.type == device
    assert out["cuda"] == out["cpu"]


def test_expert_and_generator_training_run_on_the_gpu(tiny, tmp_path):
    """Lightning on the GPU: experts trained there, then a residual generator trained functionally there
    (the base model's loss through the minted adapter), then minted there and applied to the GPU model."""
    from dataclasses import replace

    from conftest import TINY_TRAIN

    from loramint.adapters import apply_lora
    from loramint.index import ExpertLibrary
    from loramint.tasks import synthetic_suite
    from loramint.training.build import build_library
    from loramint.training.config import GeneratorTrainConfig
    from loramint.training.data import answer_nll, eval_split
    from loramint.training.generator import train_generator

    base = type(tiny)(tiny.name, tiny.hf_id, copy.deepcopy(tiny.model).cuda(), tiny.tokenizer)
    tasks = synthetic_suite(n_examples=32, seed=0)[:5]
    with ExpertLibrary.open(tmp_path / "lib") as library:
        build_library(library, tasks, base, replace(TINY_TRAIN, steps=8, n_metric_eval=4))
        assert len(library) == 5
    assert base.device.type == "cuda"  # Lightning's teardown moves its module to the CPU: put back
    config = GeneratorTrainConfig(
        library=str(tmp_path / "lib"),
        out=str(tmp_path / "generator"),
        model=GeneratorConfig(d_model=32, hidden=64, d_latent=8, residual_k=2),
        objective="functional",
        steps=8,
        lr=3e-3,
        top_k=2,
        val_tasks=0,
        functional_tasks=2,
        functional_batch=4,
        max_length=64,
    )
    report = train_generator(config, tasks, base, progress=False)
    assert report["steps"] == 8 and report["skipped_nonfinite_steps"] == 0 and not report["nonfinite_weights"]
    minter = Minter.from_pretrained(config.out, device="cuda")
    adapter = minter.mint(tasks[0].description)
    with apply_lora(base.model, adapter):
        nll = answer_nll(base.model, base.tokenizer, tasks[0], eval_split(tasks[0])[0][:8], 64)
    assert np.isfinite(nll)


def test_a_router_trains_on_the_gpu_and_routes_there(tiny, tmp_path):
    from loramint.tasks import synthetic_suite
    from loramint.training.config import RouterTrainConfig
    from loramint.training.router import train_router

    base = type(tiny)(tiny.name, tiny.hf_id, copy.deepcopy(tiny.model).cuda(), tiny.tokenizer)
    rt = Runtime(base, capacity=4, max_rank=8, target_modules=TARGETS, device="cuda")
    for i in range(3):
        rt.add(f"e{i}", LoraAdapter.random("tiny-llama", r=4, target_modules=TARGETS, seed=40 + i))
    tasks = synthetic_suite(n_examples=16, seed=0)[:2]
    router, info = train_router(
        rt,
        tasks,
        ["e0", "e1", "e2"],
        RouterTrainConfig(steps=5, max_length=64),
        tmp_path / "r",
        progress=False,
    )
    assert info["steps"] == 5 and base.device.type == "cuda"
    assert all(
        p.is_cuda for p in router.parameters()
    )  # where the runtime routes, not where Lightning left it
    rt.router = router
    assert len(rt.generate(["hello"], max_new_tokens=3, routing="learned")) == 1
