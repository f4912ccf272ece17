"""The `loramint` CLI end to end on tiny-llama and the synthetic suite; every YAML preset parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramint.adapters import LoraAdapter
from loramint.cli import main
from loramint.tasks import load_tasks

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
COMMAND_OF_FOLDER = {
    "experts": "train-experts",
    "eval": "eval",
    "generator": "train-generator",
    "service": "serve",
}  # configs/<folder>/*.yaml -> CLI command


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_every_config_preset_parses(path, capsys):
    """Presets never rot: each YAML is parsed by what consumes it."""
    if path.parent.name == "suites":
        from loramint.training.suites import SuiteConfig

        assert SuiteConfig.from_yaml(path).name == path.stem
        return
    assert path.parent.name in COMMAND_OF_FOLDER, f"no parser known for configs/{path.parent.name}/"
    with pytest.raises(SystemExit) as exit_info:
        main([COMMAND_OF_FOLDER[path.parent.name], "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    assert "base_model" in capsys.readouterr().out


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-llama" in out


def test_library_round_trip_and_resume(tmp_path, capsys):
    tasks, library = tmp_path / "tasks.jsonl", tmp_path / "lib"
    assert main(["tasks", "synthetic", "--out", str(tasks), "--n_examples", "40"]) == 0
    args = [
        "train-experts",
        "--config",
        "configs/experts/tiny.yaml",
        "--tasks",
        str(tasks),
        "--library",
        str(library),
        "--train.steps",
        "3",
        "--suite",
        "null",  # the preset names the tiny suite (seen tasks only); train all 6 tasks of our own file
        "--report",
        str(tmp_path / "build.json"),
    ]
    assert main(args) == 0
    assert "trained 6, skipped 0" in capsys.readouterr().out
    report = json.loads((tmp_path / "build.json").read_text())
    assert (
        report["n_experts"] == report["n_trained"] == 6
        and report["wall_s"] > 0
        and report["per_expert_s"] > 0
    )
    # the YAML's `train:` mapping reached the trainer, with the command-line override on top
    assert (
        report["config"]["steps"] == 3 and report["config"]["rank"] == 4 and report["config"]["lr"] == 0.003
    )
    assert set(report["experts"]) == {f"expert-{t.name}" for t in load_tasks(tasks)}
    assert report["machine"]["cores"] >= 1
    assert main(args) == 0
    assert "trained 0, skipped 6" in capsys.readouterr().out, "an unchanged rerun must skip every expert"
    assert main([*args, "--shard", "1/4"]) == 0  # every 4th task from the 2nd: 2 of the 6
    assert "trained 0, skipped 2" in capsys.readouterr().out
    assert main([*args, "--shard", "4/4"]) == 2
    assert "shard must be 'i/n'" in capsys.readouterr().out

    assert main(["library", "search", "Add two numbers together", "--library", str(library), "--k", "2"]) == 0
    hits = [line for line in capsys.readouterr().out.splitlines() if "expert-" in line]
    assert "expert-arith_add" in hits[0]

    folder = LoraAdapter.random("tiny-llama", r=2).save(tmp_path / "upload")
    assert (
        main(
            [
                "library",
                "add",
                str(folder),
                "my own expert",
                "--name",
                "mine",
                "--id",
                "mine",
                "--library",
                str(library),
            ]
        )
        == 0
    )
    assert main(["library", "list", "--library", str(library)]) == 0
    assert "7 of 7 experts" in capsys.readouterr().out
    assert main(["library", "remove", "mine", "--library", str(library)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["library", "remove", "no-such-expert"], "no-such-expert"),
        (["library", "remove", "../etc"], "invalid"),
        (["library", "add", "/nonexistent", "an expert"], "not an adapter folder"),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([*argv, "--library", str(tmp_path / "lib")]) == 2
    assert message in capsys.readouterr().out
