"""training/generator.py + gen/minter.py + gen/phrasings.py: the generator learns to mint held-out experts of a
clustered library, the functional objective lowers the task loss of minted adapters on tiny-llama, and the
checkpoint mints deterministic, truncated and fused adapters that stock PEFT loads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_TRAIN

from loramint.adapters import LoraAdapter, apply_lora
from loramint.cli import main
from loramint.errors import GeneratorError
from loramint.gen.config import GeneratorConfig
from loramint.gen.minter import Minter, truncate
from loramint.gen.phrasings import phrasings, sentences, without_opening
from loramint.index import ExpertLibrary
from loramint.tasks import synthetic_suite
from loramint.training.build import build_library
from loramint.training.config import GeneratorTrainConfig
from loramint.training.data import answer_nll, eval_split
from loramint.training.generator import train_generator

SMALL = GeneratorConfig(d_model=32, hidden=64, d_latent=8)

ARITH = [
    "Add the two numbers and give their sum.",
    "Subtract the second number from the first one.",
    "Multiply both numbers together.",
    "Compute the sum of a list of integers.",
    "Double the given number.",
    "Divide the first number by the second.",
    "Add one to the number.",
]
WRITING = [
    "Write a short poem about the sea.",
    "Tell a short story about a dragon.",
    "Write a haiku about autumn leaves.",
    "Compose a limerick about a cat.",
    "Write a fairy tale about a brave knight.",
    "Tell a bedtime story about the moon.",
    "Write a sonnet about love.",
]


def test_phrasings_by_rule():
    text = "In this task, you're given a passage about animals. Your job is to answer. Keep it short."
    assert sentences(text) == [
        "In this task, you're given a passage about animals.",
        "Your job is to answer.",
        "Keep it short.",
    ]
    assert (
        without_opening("In this task, you're given a passage about animals.") == "A passage about animals."
    )
    assert without_opening("Answer the question.") == "Answer the question."
    out = phrasings(text, ["Answer about animals.", text])
    assert out[0] == text and out[1] == "Answer about animals."
    assert "A passage about animals." in out and len(out) == len(set(out))  # the duplicate is dropped


def _clustered_library(root, noise: float = 0.05) -> ExpertLibrary:
    """14 experts in two clusters: every arithmetic expert is one update plus a little noise, every writing
    expert another one: a generator that reads descriptions can mint a held-out member of either."""
    library = ExpertLibrary.open(root)
    centres = [LoraAdapter.random("tiny-llama", r=2, seed=100 + c) for c in range(2)]
    for c, texts in enumerate([ARITH, WRITING]):
        for j, text in enumerate(texts):
            jitter = LoraAdapter.random("tiny-llama", r=2, seed=10 * c + j)
            weights = {
                m: (a + noise * jitter.weights[m][0], b + noise * jitter.weights[m][1])
                for m, (a, b) in centres[c].weights.items()
            }
            name = f"{'arith' if c == 0 else 'write'}_{j}"
            library.add(LoraAdapter(centres[c].config, weights), id=name, name=name, description=text)
    return library


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    _clustered_library(root / "lib").close()
    config = GeneratorTrainConfig(
        library=str(root / "lib"),
        out=str(root / "generator"),
        model=SMALL,
        steps=300,
        batch_size=8,
        lr=3e-3,
        top_k=3,
        val_tasks=2,
        val_every=50,
        patience=20,
    )
    report = train_generator(config, progress=False)
    return {"report": report, "config": config, "root": root}


def test_recon_training_mints_held_out_experts_of_the_right_cluster(trained):
    report = trained["report"]
    assert report["n_experts"] == 14 and len(report["val"]) == 2 and len(report["train"]) == 12
    first, best = report["curve"][0]["val/mse"], report["best"]
    assert all(-1 <= p["val/minted_cos"] <= 1 and -1 <= p["val/expert_cos"] <= 1 for p in report["curve"])
    # predicting the library mean scores ~1 (normalised units): the generator mints the held-out experts'
    # cluster from their descriptions alone
    assert best < 0.25 and best < 0.5 * first
    assert report["generator_params"] > 0 and report["library_bytes"] > 0


def _delta_distance(a: LoraAdapter, b: LoraAdapter) -> float:
    return sum(float((a.delta(m) - b.delta(m)).norm()) for m in a.modules)


def test_minter_mints_from_the_checkpoint(trained, tmp_path):
    minter = Minter.from_pretrained(trained["config"].out)
    assert minter.meta["train_config"]["objective"] == "recon" and len(minter.bank) == 14
    with ExpertLibrary.open(trained["root"] / "lib") as library:
        arith, write = library.get("arith_0").load_adapter(), library.get("write_0").load_adapter()
    adapter = minter.mint("Add up the numbers and report the total.")
    assert adapter.config.base_model == "tiny-llama" and adapter.config.r == 2
    assert _delta_distance(adapter, arith) < 0.5 * _delta_distance(adapter, write)
    poem = minter.mint("Write a poem about the mountains.")
    assert _delta_distance(poem, write) < 0.5 * _delta_distance(poem, arith)
    # deterministic: the learned prior's mean, never a sample
    again = minter.mint("Add up the numbers and report the total.")
    assert all(torch.equal(adapter.weights[m][0], again.weights[m][0]) for m in adapter.modules)
    with pytest.raises(TypeError):
        minter.mint("Add up the numbers.", seed=1)  # type: ignore[call-arg]
    # batched minting equals one at a time
    many = minter.mint_many(["Add up the numbers and report the total.", "Write a poem about the mountains."])
    assert _delta_distance(many[0], adapter) < 1e-4 and _delta_distance(many[1], poem) < 1e-4
    # examples move the condition
    shots = minter.mint("Do this task.", examples=["2 3\n5", "4 4\n8"])
    assert _delta_distance(shots, minter.mint("Do this task.")) > 0
    # fusion lies between its parts
    fused = minter.fuse(["Add up the numbers and report the total.", "Write a poem about the mountains."])
    assert _delta_distance(fused, adapter) < _delta_distance(poem, adapter)
    assert _delta_distance(fused, poem) < _delta_distance(adapter, poem)
    # rank truncation keeps the leading component at the same scale
    low = minter.mint("Add up the numbers and report the total.", rank=1)
    assert low.config.r == 1 and low.config.scaling(low.modules[0]) == adapter.config.scaling(
        adapter.modules[0]
    )
    module = adapter.modules[0]
    u, s, vh = torch.linalg.svd(adapter.delta(module))
    torch.testing.assert_close(low.delta(module), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-4)
    # what it writes is a PEFT folder
    folder = adapter.save(tmp_path / "minted")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"].endswith(
        "tiny-llama"
    )
    assert _delta_distance(LoraAdapter.load(folder), adapter) < 1e-5


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m.mint(""), "non-empty string"),
        (lambda m: m.mint("x" * 9000), "limit"),
        (lambda m: m.mint("Add.", rank=3), "rank must be"),
        (lambda m: m.mint("Add.", examples=[""]), "examples must be"),
        (lambda m: m.fuse(["Add.", "Write."], weights=[1.0, -1.0]), "weights must be"),
        (lambda m: m.fuse([]), "at least one"),
    ],
)
def test_bad_mint_requests_are_refused(trained, call, match):
    minter = Minter.from_pretrained(trained["config"].out)
    with pytest.raises(GeneratorError, match=match):
        call(minter)


def test_not_a_checkpoint_and_a_corrupt_one_are_refused(trained, tmp_path):
    with pytest.raises(GeneratorError, match="not a generator checkpoint"):
        Minter.from_pretrained(tmp_path)
    (tmp_path / "generator.json").write_text('{"format": "something-else"}')
    with pytest.raises(GeneratorError, match="expected format"):
        Minter.from_pretrained(tmp_path)


def test_truncate_is_the_best_low_rank_approximation():
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=3)
    low = truncate(adapter, 2)
    for module in adapter.modules:
        u, s, vh = torch.linalg.svd(adapter.delta(module))
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(low.delta(module), best, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [4, 40])
def test_a_rank_at_or_above_the_adapters_keeps_it_and_its_config_matches_its_tensors(rank, tmp_path):
    """Minting a stored rank-4 expert at rank 40 once wrote r=40 over rank-4 tensors, which PEFT refuses."""
    adapter = LoraAdapter.random("tiny-llama", r=4, seed=3)
    kept = truncate(adapter, rank)
    assert kept.config.r == 4 and all(a.shape[0] == 4 for a, _ in kept.weights.values())
    kept.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="objective"):
        GeneratorTrainConfig(objective="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="monitor"):
        GeneratorTrainConfig(monitor="val/nll", val_examples=0)
    assert GeneratorTrainConfig(model={"d_latent": 4}).model.d_latent == 4
    with pytest.raises(ValueError, match="mix_lr"):
        GeneratorTrainConfig(mix_lr=0.0)
    # settings of removed variants: a checkpoint recording them switched off still loads, on is refused
    old = {"d_latent": 4, "adaptive_mix": False, "own_gate": False, "max_correction": 0.0}
    assert GeneratorConfig.from_dict(old) == GeneratorConfig(d_latent=4)
    for key, on in (("adaptive_mix", True), ("own_gate", True), ("max_correction", 2.0)):
        with pytest.raises(ValueError, match=f"\\['{key}'\\] belong to variants that were removed"):
            GeneratorTrainConfig(model={**old, key: on})
    with pytest.raises(TypeError):
        GeneratorConfig(adaptive_mix=False)  # type: ignore[call-arg]  (no longer a setting)


def test_training_needs_an_explicit_out(tmp_path):
    """No default checkpoint folder: a training run must never silently replace the served generator."""
    from loramint.training.generator import train_generator

    assert GeneratorTrainConfig().out == ""
    with pytest.raises(ValueError, match="train.out is required"):
        train_generator(GeneratorTrainConfig(library=str(tmp_path / "lib")), progress=False)
    assert not (tmp_path / "lib").exists()


def test_validation_experts_are_chosen_by_hash():
    from loramint.training.generator import select_val

    names = [f"task{i}" for i in range(13)]
    by_hash = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"0:{names[i]}".encode()).hexdigest())
    assert select_val(names, 3, 0) == sorted(by_hash[:3])  # the split every run so far used
    assert select_val(names, 3, 1) == select_val(names, 3, 1) != select_val(names, 3, 0)


def test_too_small_a_library_is_refused(tmp_path):
    with ExpertLibrary.open(tmp_path / "lib") as library:
        library.add(LoraAdapter.random("tiny-llama", r=2, seed=0), id="one", name="one", description="Add.")
    with pytest.raises(ValueError, match="cannot train a generator"):
        train_generator(
            GeneratorTrainConfig(library=str(tmp_path / "lib"), out=str(tmp_path / "g")), progress=False
        )


def test_experts_that_do_not_beat_the_base_model_are_not_learned_from(tmp_path):
    """An expert whose quality card shows no gain (`retrievable: false`) is neither in the generator's bank
    nor among its training experts: minting never retrieves it."""
    from loramint.training.generator import load_training_data

    library = _clustered_library(tmp_path / "lib")
    unfit = LoraAdapter.random("tiny-llama", r=2, seed=77)
    library.add(
        unfit, id="unfit", name="unfit", description="Add two numbers.", metrics={"retrievable": False}
    )
    fit = LoraAdapter.random("tiny-llama", r=2, seed=78)
    library.add(fit, id="fit", name="fit", description="Sum the numbers.", metrics={"retrievable": True})
    data = load_training_data(library, [], GeneratorTrainConfig(val_tasks=2, examples_prob=0.0))
    library.close()
    assert "unfit" not in data.experts.names and "fit" in data.experts.names and len(data.experts) == 15


UNSEEN = ["copy_repeat", "classify_parity"]  # one free-text, one multiple-choice task


@pytest.fixture(scope="module")
def functional(tiny, tmp_path_factory):
    """A tiny-llama library of the synthetic seen tasks and a generator trained functionally on it (plus an
    untrained one: one step at a negligible learning rate)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("functional")
    tasks = synthetic_suite(n_examples=48, seed=0)
    seen = [t for t in tasks if t.name not in UNSEEN]
    with ExpertLibrary.open(root / "lib") as library:
        build_library(library, seen, tiny, replace(TINY_TRAIN, steps=15, n_metric_eval=8))
    config = GeneratorTrainConfig(
        library=str(root / "lib"),
        out=str(root / "generator"),
        model=SMALL,
        objective="functional",
        steps=40,
        lr=3e-3,
        top_k=2,
        val_tasks=0,
        functional_tasks=2,
        functional_batch=8,
        max_length=64,
        examples_prob=0.3,
    )
    untrained = train_generator(
        replace(config, steps=1, lr=1e-9, out=str(root / "g0")), seen, tiny, progress=False
    )
    report = train_generator(config, seen, tiny, progress=False)
    return {"root": root, "tasks": tasks, "seen": seen, "report": report, "untrained": untrained}


def test_functional_objective_lowers_the_loss_of_minted_adapters(functional, tiny):
    """Gradients flow from the base model's answer loss through the applied adapter into the generator."""
    assert functional["untrained"]["steps"] == 1 and functional["report"]["steps"] == 40

    def minted_nll(path) -> float:
        minter = Minter.from_pretrained(path)
        total = 0.0
        for task in functional["seen"]:  # reworded: a task's own description mints its expert exactly
            with apply_lora(tiny.model, minter.mint(f"{task.description} Answer briefly.")):
                total += answer_nll(tiny.model, tiny.tokenizer, task, eval_split(task)[0][:16], 64)
        return total / len(functional["seen"])

    before, after = minted_nll(functional["root"] / "g0"), minted_nll(functional["root"] / "generator")
    assert after < before - 0.1, (before, after)


def test_minted_methods_in_the_harness(functional, tiny):
    from loramint.training.evaluate import ScoringConfig, evaluate
    from loramint.training.methods import UNRELATED, MethodConfig, short_description

    scoring = ScoringConfig(max_length=64, batch_size=16, n_generate=4, max_new_tokens=6, n_bootstrap=100)
    names = [
        "base",
        "minted",
        "minted+examples",
        "minted-user",
        "minted-unrelated",
        "minted-shuffled",
        "reconstructed",
        "topk",
        "minted+topk",
    ]
    config = MethodConfig(generator=functional["root"] / "generator", top_k=2)
    unseen = [t for t in functional["tasks"] if t.name in UNSEEN]
    with ExpertLibrary.open(functional["root"] / "lib") as library:
        result = evaluate(
            tiny,
            unseen,
            names,
            library=library,
            seen=functional["seen"],
            scoring=scoring,
            method_config=config,
            out=functional["root"] / "out",
        )
        seen = evaluate(
            tiny,
            functional["seen"],
            ["base", "reconstructed"],
            library=library,
            seen=functional["seen"],
            scoring=scoring,
            method_config=config,
            split="seen",
        )
    methods = result["methods"]
    assert set(methods) == set(names) and all(set(m["per_task"]) == set(UNSEEN) for m in methods.values())
    for name in UNSEEN:
        assert methods["minted+examples"]["per_task"][name]["info"]["n_shots"] == 5
        hybrid = methods["minted+topk"]["per_task"][name]["info"]
        assert hybrid["minted_weight"] == 0.5 and len(hybrid["experts"]) == 2
        assert hybrid["experts"] == methods["topk"]["per_task"][name]["info"]["experts"]  # same retrieval
        task = next(t for t in unseen if t.name == name)
        short = methods["minted-user"]["per_task"][name]["info"]["description"]
        assert short == short_description(task)
        assert methods["minted-unrelated"]["per_task"][name]["info"]["description"] in UNRELATED
        shuffled = methods["minted-shuffled"]["per_task"][name]["info"]["description"]
        assert sorted(shuffled.split()) == sorted(task.description.split())
    # every challenger is compared, paired, with every other method; the report carries the tables
    assert set(result["comparisons"]) == set(names) - {"base", "topk"}  # every minted*/reconstructed
    versus = result["comparisons"]["minted"]["base"]
    gain = methods["minted"]["vs_base"]
    assert (
        versus["mean"] == pytest.approx(gain["mean"])
        and versus["ci_low"] <= versus["mean"] <= versus["ci_high"]
    )
    assert result["short_description_gain_loss"]["definition"].startswith("1 - gain(minted-user)")
    table = (functional["root"] / "out" / "eval_unseen.md").read_text()
    assert "`minted+examples` against each method" in table
    # the functionally trained generator helps the seen tasks it learned from
    assert seen["methods"]["reconstructed"]["mean"] < seen["methods"]["base"]["mean"]


def test_cli_mint_writes_a_peft_folder(trained, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = [
        "mint",
        "Add up the numbers.",
        "--out",
        str(out),
        "--generator",
        trained["config"].out,
        "--rank",
        "1",
    ]
    assert main(args) == 0
    assert "minted tiny-llama rank 1 adapter" in capsys.readouterr().out
    written = LoraAdapter.load(out)
    assert written.config.r == 1 and written.config.base_model == "tiny-llama"
    fused = tmp_path / "fused"
    args = [
        "mint",
        "Add.",
        "--fuse+",
        "Write a poem.",
        "--fuse+",
        "Tell a story.",
        "--out",
        str(fused),
        "--generator",
        trained["config"].out,
    ]
    assert main(args) == 0
    assert (fused / "adapter_model.safetensors").is_file()
    assert main(["mint", "", "--out", str(tmp_path / "x"), "--generator", trained["config"].out]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_train_generator_writes_checkpoint_report_and_curve(trained, tmp_path, capsys):
    args = [
        "train-generator",
        "--train.library",
        str(trained["root"] / "lib"),
        "--train.out",
        str(tmp_path / "g"),
        "--train.steps",
        "20",
        "--train.val_every",
        "10",
        "--train.val_tasks",
        "2",
        "--train.top_k",
        "2",
        "--train.model.d_model",
        "16",
        "--train.model.hidden",
        "32",
        "--train.model.d_latent",
        "4",
        "--report",
        str(tmp_path / "report.json"),
        "--plot",
        str(tmp_path / "curve.png"),
    ]
    assert main(args) == 0
    assert "trained 20 steps on 12 experts" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["step"] for c in report["curve"]] == [0, 10, 20]
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert Minter.from_pretrained(tmp_path / "g").model.config.d_latent == 4


def test_collapse_is_measured_in_weight_space_and_refused():
    from loramint.gen.residual import delta_cosines, mean_off_diagonal
    from loramint.training.generator import collapsed

    a, b = (LoraAdapter.random("tiny-llama", r=2, seed=s) for s in (1, 2))
    # another factorisation of a's update is the same adapter: cosine 1 although the factors differ
    scaled = LoraAdapter(a.config, {m: (2 * x, y / 2) for m, (x, y) in a.weights.items()})
    cos = delta_cosines([a, scaled, b])
    assert float(cos[0, 1]) == pytest.approx(1.0, abs=1e-5)
    dense = lambda ad: torch.cat([ad.delta(m).flatten() for m in ad.modules])  # noqa: E731
    expected = torch.nn.functional.cosine_similarity(dense(a), dense(b), dim=0)
    assert float(cos[0, 2]) == pytest.approx(float(expected), abs=1e-5)
    assert mean_off_diagonal(delta_cosines([a, scaled])) == pytest.approx(1.0, abs=1e-5)
    assert collapsed({"val/minted_cos": 0.99, "val/expert_cos": 0.1}, 0.9)
    assert not collapsed({"val/minted_cos": 0.5, "val/expert_cos": 0.1}, 0.9)
    assert not collapsed({"val/minted_cos": 0.99, "val/expert_cos": 0.995}, 0.9)  # experts that alike
    assert not collapsed({"val/mse": 1.0}, 0.9)


RESIDUAL = replace(SMALL, residual_k=2)


@pytest.fixture(scope="module")
def residual(trained):
    """Residual generators on the clustered library: untrained (1 step at a negligible rate) and trained
    on the reconstruction objective (relative ΔW error of the composed adapter)."""
    root = trained["root"]
    config = replace(trained["config"], model=RESIDUAL, out=str(root / "residual"), steps=150)
    untrained = train_generator(replace(config, steps=1, lr=1e-9, out=str(root / "r0")), progress=False)
    return {"report": train_generator(config, progress=False), "untrained": untrained, "root": root}


def test_an_untrained_residual_generator_mints_the_retrieved_mixture(residual):
    from loramint.gen.residual import delta_cosines, mixture_weights

    minter = Minter.from_pretrained(residual["root"] / "r0")
    assert minter.max_rank == 6 and minter.bank.factors is not None
    text = "Add up the numbers and report the total."
    adapter = minter.mint(text)
    assert adapter.config.r == 6
    cond = minter.condition([text])
    top = (cond @ minter.bank.keys.T).topk(2, dim=-1)
    weights = mixture_weights(top.values[0])
    with ExpertLibrary.open(residual["root"] / "lib") as library:
        parts = [library.get(minter.bank.names[int(i)]).load_adapter() for i in top.indices[0]]
    for module in adapter.modules[:3]:
        mixture = sum(w * p.delta(module) for p, w in zip(parts, weights, strict=True))
        torch.testing.assert_close(
            adapter.delta(module), mixture, atol=0.05 * float(mixture.abs().max()), rtol=0
        )
    poem = minter.mint("Write a poem about the mountains.")
    assert float(delta_cosines([adapter, poem])[0, 1]) < 0.5  # different retrievals, different adapters


def test_a_residual_generator_learns_trains_and_round_trips(residual, tmp_path):
    report = residual["report"]
    curve = report["curve"]
    assert curve[0]["val/mse"] > 0 and report["best"] <= curve[0]["val/mse"]
    assert report["generator_bytes"] > 0
    minter = Minter.from_pretrained(residual["root"] / "residual")
    with ExpertLibrary.open(residual["root"] / "lib") as library:
        arith, write = library.get("arith_0").load_adapter(), library.get("write_0").load_adapter()
    adapter = minter.mint("Add up the numbers and report the total.")
    assert _delta_distance(adapter, arith) < 0.5 * _delta_distance(adapter, write)
    # truncation to the library's rank, fusion between the parts, PEFT round trip
    low = minter.mint("Add up the numbers and report the total.", rank=2)
    assert low.config.r == 2 and _delta_distance(low, arith) < 0.5 * _delta_distance(low, write)
    poem = minter.mint("Write a poem about the mountains.")
    fused = minter.fuse(["Add up the numbers and report the total.", "Write a poem about the mountains."])
    assert fused.config.r == 10  # both descriptions' 2 experts + one correction, rank 2 each
    assert _delta_distance(fused, adapter) < _delta_distance(poem, adapter)
    assert _delta_distance(fused, poem) < _delta_distance(adapter, poem)
    assert _delta_distance(LoraAdapter.load(adapter.save(tmp_path / "a")), adapter) < 1e-4
    with pytest.raises(GeneratorError, match=r"rank must be an integer in \[1, 6\]"):
        minter.mint("Add.", rank=7)


def test_a_residual_checkpoint_without_its_experts_is_refused(residual, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(residual["root"] / "r0", tmp_path / "g")
    tensors = {k: v for k, v in load_file(str(copy / "bank.safetensors")).items() if "factors" not in k}
    save_file(tensors, str(copy / "bank.safetensors"))
    with pytest.raises(GeneratorError, match="lacks the experts' factors"):
        Minter.from_pretrained(copy)


def train_pair(functional, tiny, name: str, model: GeneratorConfig, **settings) -> None:
    """Train a generator functionally on the tiny seen tasks into <root>/<name>, and its untrained twin (one
    step at a negligible learning rate) into <root>/<name>0."""
    root = functional["root"]
    config = GeneratorTrainConfig(
        library=str(root / "lib"),
        out=str(root / name),
        model=model,
        objective="functional",
        steps=40,
        lr=3e-3,
        top_k=2,
        val_tasks=0,
        functional_tasks=2,
        functional_batch=8,
        max_length=64,
        **settings,
    )
    untrained = replace(config, steps=1, lr=1e-9, mix_lr=1e-9, out=str(root / f"{name}0"))
    train_generator(untrained, functional["seen"], tiny, progress=False)
    train_generator(config, functional["seen"], tiny, progress=False)


def test_a_residual_generator_trains_functionally_below_the_retrieved_mixture(functional, tiny):
    """The functional objective improves on the top-k mixture it starts from (tiny-llama, synthetic tasks)."""
    root = functional["root"]
    train_pair(functional, tiny, "residual", RESIDUAL)

    def minted_nll(path) -> float:
        minter = Minter.from_pretrained(path)
        total = 0.0
        for task in functional["seen"]:  # reworded: a task's own description mints its expert exactly
            with apply_lora(tiny.model, minter.mint(f"{task.description} Answer briefly.")):
                total += answer_nll(tiny.model, tiny.tokenizer, task, eval_split(task)[0][:16], 64)
        return total / len(functional["seen"])

    before, after = minted_nll(root / "residual0"), minted_nll(root / "residual")
    assert after < before - 0.05, (before, after)


def test_a_step_with_a_non_finite_gradient_is_dropped():
    from types import SimpleNamespace

    from loramint.training.generator import GeneratorModule

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    module = SimpleNamespace(net=net, skipped=0, nonfinite_params=set())
    net(torch.ones(1, 2)).sum().backward()
    GeneratorModule.on_before_optimizer_step(module, None)  # finite: kept
    assert module.skipped == 0 and all(p.grad is not None for p in net.parameters())
    net[1].weight.grad[0, 0] = float("nan")
    GeneratorModule.on_before_optimizer_step(module, None)
    assert module.skipped == 1 and module.nonfinite_params == {"1.weight"}
    assert all(p.grad is None for p in net.parameters())  # AdamW skips parameters without a gradient


def _module_stub(net, global_step: int = 1):
    """What GeneratorModule's end-of-step and validation hooks read, around `net`."""
    from types import SimpleNamespace

    return SimpleNamespace(
        net=net,
        nonfinite_weights=None,
        global_step=global_step,
        trainer=SimpleNamespace(should_stop=False),
    )


def test_a_step_that_leaves_a_non_finite_weight_stops_training():

    from loramint.training.generator import GeneratorModule

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    module = _module_stub(net, global_step=7)
    GeneratorModule.on_train_batch_end(module, None, None, 0)
    assert module.nonfinite_weights is None and not module.trainer.should_stop
    with torch.no_grad():
        net[0].bias[1] = float("inf")
    GeneratorModule.on_train_batch_end(module, None, None, 0)
    assert module.nonfinite_weights == {"step": 7, "params": ["0.bias"]} and module.trainer.should_stop


def test_family_out_rows_retrieve_no_sibling_unless_too_few_experts_would_be_left():
    """`family_out_prob`: a family-out row retrieves no expert of its task's family (a held-out family's
    situation); an expert without a family loses only itself; with fewer than k others left, leave-one-out."""
    from types import SimpleNamespace

    from loramint.training.generator import GeneratorModule

    families = ["a", "a", "a", "b", "b", ""]
    keys = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0.98, 0, 0.1], [0.5, 1, 0], [0.4, 1, 0.1], [0.6, 0, 1]]),
        dim=-1,
    )
    stub = SimpleNamespace(
        keys=keys,
        train_idx=torch.arange(6),
        families=families,
        family_members={f: torch.tensor([x == f for x in families]) for f in {"a", "b"}},
    )

    def retrieved(own: int, k: int, family_out: bool) -> set[int]:
        idx, sims = GeneratorModule.retrieve(stub, keys[[own]], [own], k, [family_out])
        assert torch.isfinite(sims).all()
        return set(idx[0].tolist())

    assert retrieved(0, 2, False) == {1, 2}  # leave-one-out: its siblings are the nearest
    assert retrieved(0, 2, True) <= {3, 4, 5}  # family out: none of family a
    assert retrieved(0, 3, True) == {3, 4, 5}
    assert 0 not in retrieved(0, 4, True) and len(retrieved(0, 4, True)) == 4  # too few left: leave-one-out
    assert 5 not in retrieved(5, 3, True) and {0, 3} & retrieved(5, 3, True)  # no family: only itself out
    with pytest.raises(ValueError, match="family_out_prob"):
        GeneratorTrainConfig(family_out_prob=2.0)


def test_average_is_the_exact_weighted_mean_of_the_updates():
    from loramint.gen.ensemble import average

    parts = [
        LoraAdapter.random("tiny-llama", r=r, alpha=a, target_modules=("q_proj", "v_proj"), seed=s)
        for s, (r, a) in enumerate([(2, 4.0), (4, 4.0), (3, 9.0)])
    ]
    mean = average(parts)
    assert mean.config.r == 9 and mean.config.scaling(mean.modules[0]) == 1.0
    weighted = average(parts[:2], [0.25, 0.75])
    for m in parts[0].modules:
        torch.testing.assert_close(mean.delta(m), sum(p.delta(m) for p in parts) / 3, atol=1e-6, rtol=1e-5)
        expected = 0.25 * parts[0].delta(m) + 0.75 * parts[1].delta(m)
        torch.testing.assert_close(weighted.delta(m), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        average(parts[:2], [1.0])


def test_an_ensemble_checkpoint_mints_the_mean_of_its_members(residual, tmp_path):
    from loramint.gen.ensemble import EnsembleMinter, save_ensemble

    root = residual["root"]
    members = [root / "residual", root / "r0"]
    path = save_ensemble(tmp_path / "ens", members)
    assert sorted(p.name for p in path.iterdir()) == ["generator.json", "member-0", "member-1"]
    ensemble = Minter.from_pretrained(path)
    # one compose: the 2 retrieved experts once (mean coefficients) + both corrections, rank 2 each
    assert isinstance(ensemble, EnsembleMinter) and ensemble.fast and ensemble.max_rank == 8
    singles = [Minter.from_pretrained(m, encoder=ensemble.encoder) for m in members]
    text = "Add up the numbers and report the total."
    minted = ensemble.mint(text)
    for m in minted.modules:
        expected = (singles[0].mint(text).delta(m) + singles[1].mint(text).delta(m)) / 2
        torch.testing.assert_close(minted.delta(m), expected, atol=1e-5, rtol=1e-4)
    assert _delta_distance(LoraAdapter.load(minted.save(tmp_path / "a")), minted) < 1e-4  # stock PEFT folder
    low = ensemble.mint(text, rank=4)
    assert low.config.r == 4
    fused = ensemble.fuse([text, "Write a poem about the mountains."])
    assert fused.config.r == sum(
        s.fuse([text, "Write a poem about the mountains."]).config.r for s in singles
    )
    weighted = Minter.from_pretrained(save_ensemble(tmp_path / "w", members, weights=[1.0, 0.0]))
    assert _delta_distance(weighted.mint(text), singles[0].mint(text)) < 1e-4
    with pytest.raises(GeneratorError, match="rank must be an integer in"):
        ensemble.mint(text, rank=9)
    # a library expert's stored description mints that expert, for the ensemble and each member alike; any
    # other text in the same batch the members' mean
    with ExpertLibrary.open(root / "lib") as library:
        arith = library.get("arith_0").load_adapter()
    got = ensemble.mint_many([ARITH[0], text])
    for adapter in (got[0], singles[0].mint(ARITH[0]), singles[1].mint_many([text, ARITH[0]])[1]):
        for m in arith.modules:
            torch.testing.assert_close(adapter.delta(m), arith.delta(m), atol=1e-4, rtol=1e-3)
    assert _delta_distance(got[1], minted) < 1e-4
    drawn = ensemble.provenance([ARITH[0], text])
    assert drawn[0]["exact"] and [e["weight"] for e in drawn[0]["experts"]] == [1.0, 0.0]
    assert drawn[0]["experts"][0]["id"] == "arith_0" and not drawn[1]["exact"]
    assert ensemble.mint(ARITH[0], rank=1).config.r == 1 and singles[0].mint(ARITH[0], rank=1).config.r == 1
    # bfloat16 decoding: the same adapter within bfloat16's precision
    fast = Minter.from_pretrained(save_ensemble(tmp_path / "bf16", members, decode_dtype="bfloat16"))
    approx = fast.mint(text)
    assert approx.config.r == minted.config.r
    assert _delta_distance(approx, minted) < 0.02 * sum(float(minted.delta(m).norm()) for m in minted.modules)
    both = ["Add up the numbers and report the total.", "Write a poem about the mountains."]
    assert _delta_distance(fast.fuse(both), ensemble.fuse(both)) < 0.02 * _delta_distance(
        ensemble.fuse(both), minted
    )
    with pytest.raises(GeneratorError, match="decode_dtype must be"):
        save_ensemble(tmp_path / "bad", members, decode_dtype="int8")


def test_bad_ensembles_are_refused_and_nothing_is_replaced(residual, tmp_path):
    from loramint.gen.ensemble import save_ensemble

    root = residual["root"]
    good = save_ensemble(tmp_path / "ens", [root / "residual", root / "r0"])
    before = (good / "generator.json").read_text()
    with pytest.raises(GeneratorError, match="at least 2"):
        save_ensemble(tmp_path / "ens", [root / "residual"])
    with pytest.raises(GeneratorError, match="not a generator checkpoint"):
        save_ensemble(tmp_path / "ens", [root / "residual", tmp_path])
    with pytest.raises(GeneratorError, match="itself an ensemble"):
        save_ensemble(tmp_path / "ens", [root / "residual", good])
    with pytest.raises(GeneratorError, match="weights must be 2 non-negative"):
        save_ensemble(tmp_path / "ens", [root / "residual", root / "r0"], weights=[1.0, -1.0])
    assert (good / "generator.json").read_text() == before and not list(tmp_path.glob(".ens.*"))


def test_both_generators_implement_the_minting_protocol(residual, tmp_path):
    """`Minter` and `EnsembleMinter` offer every member of `gen.protocol.MintingModel`, with the protocol's
    parameters first (extras only with defaults), so serving, evaluation and the CLI can take either."""
    import inspect

    from loramint.gen.ensemble import EnsembleMinter, save_ensemble
    from loramint.gen.protocol import MintingModel

    root = residual["root"]
    single = Minter.from_pretrained(root / "residual")
    ensemble = Minter.from_pretrained(save_ensemble(tmp_path / "ens", [root / "residual", root / "r0"]))
    assert isinstance(single, Minter) and isinstance(ensemble, EnsembleMinter)
    members = [n for n in vars(MintingModel) if not n.startswith("_")]
    assert {"mint", "mint_many", "fuse", "provenance", "max_rank"} <= set(members)
    for generator in (single, ensemble):
        assert isinstance(generator, MintingModel)
        for name in members:
            wanted = getattr(MintingModel, name)
            if callable(wanted):
                got = inspect.signature(getattr(type(generator), name)).parameters
                need = list(inspect.signature(wanted).parameters)
                assert list(got)[: len(need)] == need, (type(generator), name)  # extras only after, defaulted
                assert all(p.default is not p.empty for p in list(got.values())[len(need) :])
    text = "Add up the numbers and report the total."
    assert ensemble.provenance([text])[0]["experts"] == single.provenance([text])[0]["experts"]


def test_refreshing_the_bank_lets_a_trained_generator_retrieve_new_experts(residual, tmp_path):
    """Experts added to the library after training join the generator's retrieval without training: the
    network and every kept expert stay as they were, an unfit expert stays out, the source stays intact."""
    import shutil

    from loramint.gen.ensemble import save_ensemble
    from loramint.training.generator import refresh_bank

    root = residual["root"]
    shutil.copytree(root / "lib", tmp_path / "lib")
    with ExpertLibrary.open(tmp_path / "lib") as library:
        new = LoraAdapter.random("tiny-llama", r=2, seed=91)
        library.add(new, id="mod_0", name="mod_0", description="Give the remainder of the division.")
        unfit = LoraAdapter.random("tiny-llama", r=2, seed=92)
        library.add(unfit, id="bad", name="bad", description="Spell it.", metrics={"retrievable": False})
    source = root / "residual"
    before = (source / "bank.safetensors").read_bytes()
    result = refresh_bank(source, tmp_path / "lib", tmp_path / "refreshed")
    assert result == {"before": 14, "after": 15, "added": ["mod_0"], "updated": [], "removed": []}
    assert (source / "bank.safetensors").read_bytes() == before  # written to `out` only
    old, minter = Minter.from_pretrained(source), Minter.from_pretrained(tmp_path / "refreshed")
    assert (tmp_path / "refreshed" / "curve.json").read_bytes() == (source / "curve.json").read_bytes()
    assert "bad" not in minter.bank.names and minter.meta["bank_source"]["experts"] == 15
    for name, tensor in old.model.state_dict().items():
        assert torch.equal(tensor, minter.model.state_dict()[name]), name
    assert minter.bank.names == [*old.bank.names, "mod_0"]  # the kept entries first, bit for bit
    for key in ("keys", "mu", "logvar"):
        assert torch.equal(getattr(minter.bank, key)[:14], getattr(old.bank, key)), key
    text = "Add up the numbers and report the total."  # draws on kept experts only: the very same adapter
    assert minter.mint(text).content_hash() == old.mint(text).content_hash()
    minted = minter.mint("Give the remainder of the division.")  # its own description: that expert
    for m in new.modules:
        torch.testing.assert_close(minted.delta(m), new.delta(m), atol=1e-3, rtol=1e-2)
    assert minter.provenance(["Give the remainder of the division."])[0]["experts"][0]["id"] == "mod_0"
    # the command line, in place; an ensemble is refused (its members are refreshed one by one)
    shutil.copytree(source, tmp_path / "inplace")
    assert main(["refresh-bank", str(tmp_path / "inplace"), str(tmp_path / "lib")]) == 0
    assert len(Minter.from_pretrained(tmp_path / "inplace").bank) == 15
    # an expert removed from the library leaves; one retrained under the same name gets a new entry
    with ExpertLibrary.open(tmp_path / "lib") as library:
        library.remove("write_6")
        library.remove("arith_1")
        retrained = LoraAdapter.random("tiny-llama", r=2, seed=93)
        library.add(retrained, id="arith_1", name="arith_1", description=ARITH[1])
    changed = refresh_bank(tmp_path / "inplace", tmp_path / "lib")
    assert changed == {
        "before": 15, "after": 14, "added": [], "updated": ["arith_1"], "removed": ["write_6"]
    }  # fmt: skip
    refreshed = Minter.from_pretrained(tmp_path / "inplace")
    assert "write_6" not in refreshed.bank.names
    served = refreshed.mint(ARITH[1])  # its own description: the retrained expert, not the old one
    for m in retrained.modules:
        torch.testing.assert_close(served.delta(m), retrained.delta(m), atol=1e-3, rtol=1e-2)
    assert refresh_bank(tmp_path / "inplace", tmp_path / "lib")["updated"] == []  # nothing left to do
    ensemble = save_ensemble(tmp_path / "ens", [source, root / "r0"])
    with pytest.raises(GeneratorError, match="is an ensemble"):
        refresh_bank(ensemble, tmp_path / "lib")
