"""The `loramint` command: each subcommand is a plain typed function (jsonargparse turns it into a CLI)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loramint.errors import LoramintError
from loramint.paths import DEFAULT_GENERATOR, DEFAULT_LIBRARY
from loramint.service.config import ServiceConfig
from loramint.training.config import ExpertTrainConfig, GeneratorTrainConfig, RouterTrainConfig

# Piped output (CI logs, `| less`) gets wide rows instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=200)
USER_LIBRARY = Path("data/library")  # where train-experts and the library commands work by default


# ---- models -------------------------------------------------------------------------------------------------
def models_list() -> None:
    """List the registry's base models (any HF id or local path works too)."""
    from loramint.models import REGISTRY

    table = Table("name", "hf id (written into adapters)", "what")
    for spec in REGISTRY.values():
        table.add_row(spec.name, spec.hf_id, spec.summary)
    console.print(table)


def models_prepare(name: str = "smollm2-135m") -> None:
    """Download/convert/verify a base model into the cache, then load it once to check it.

    Args:
        name: registry name, HF id or local path.
    """
    import time

    from loramint.models import load_base_model, prepare

    started = time.perf_counter()
    path = prepare(name)
    base = load_base_model(name)
    n = sum(p.numel() for p in base.model.parameters())
    console.print(
        f"{base.name}: {n / 1e6:.1f}M parameters, ready in {time.perf_counter() - started:.1f}s ({path or 'built in code'})"
    )


# ---- tasks --------------------------------------------------------------------------------------------------
def tasks_import_bigbench(
    names: str | list[str], out: Path = Path("data/tasks/tasks.jsonl"), max_examples: int | None = None
) -> None:
    """Import BIG-bench tasks (fetches the bigbench==1.0.0 sdist once) into a task JSONL file.

    Args:
        names: comma-separated task selectors (a list in YAML): "natural_instructions" (all 61 subtasks), a subtask ("subtask004" or its full
            name), or a JSON task ("sports_understanding", "arithmetic/2_digit_multiplication").
        out: JSONL file to write.
        max_examples: keep at most this many examples per task.
    """
    from loramint.bigbench import import_tasks
    from loramint.tasks import save_tasks

    selectors = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else names
    tasks = import_tasks(selectors, max_examples=max_examples)
    save_tasks(tasks, out)
    table = Table("task", "family", "examples", "metric")
    for t in tasks:
        table.add_row(t.name, t.family, str(len(t.examples)), t.metric)
    console.print(table)
    console.print(f"wrote {len(tasks)} tasks to {out}")


def tasks_list_bigbench(contains: str = "") -> None:
    """List BIG-bench task names available for import.

    Args:
        contains: only names containing this text.
    """
    from loramint.bigbench import list_tasks

    for name in list_tasks():
        if contains in name:
            print(name)


def tasks_synthetic(out: Path = Path("data/tasks/tiny.jsonl"), n_examples: int = 64, seed: int = 0) -> None:
    """Write the built-in synthetic suite (6 tiny tasks in 3 families, no download) to a JSONL file.

    Args:
        out: JSONL file to write.
        n_examples: examples per task.
        seed: generator seed.
    """
    from loramint.tasks import save_tasks, synthetic_suite

    tasks = synthetic_suite(n_examples=n_examples, seed=seed)
    save_tasks(tasks, out)
    console.print(f"wrote {len(tasks)} synthetic tasks to {out}")


# ---- data (the task corpus) ---------------------------------------------------------------------------------
def data_sources() -> None:
    """List the corpus's sources: license, whether the repository ships it, tasks and examples."""
    from loramint.corpus import Corpus

    corpus = Corpus()
    available = set(corpus.available())
    table = Table("source", "license", "ships in corpus/", "tasks", "examples", "here")
    for s in corpus.sources.values():
        table.add_row(s.name, s.license, "yes" if s.shipped else "no: `loramint data build`", str(s.tasks),
                      str(s.examples), "yes" if s.name in available else "no")  # fmt: skip
    if "user" in available:
        user = corpus.load("user")
        table.add_row("user", "yours", "no", str(len(user)), str(sum(len(t.examples) for t in user)), "yes")
    console.print(table)


def data_families(source: str | None = None) -> None:
    """List the corpus's families with their task counts.

    Args:
        source: only this source's families.
    """
    from loramint.corpus import Corpus

    table = Table("family", "tasks")
    for family, n in sorted(Corpus().families([source] if source else None).items()):
        table.add_row(family, str(n))
    console.print(table)


def data_tasks(source: str | None = None, family: str | None = None, contains: str = "") -> None:
    """List corpus tasks: name, family, metric, examples per split and description.

    Args:
        source: only this source's tasks.
        family: only this family's tasks.
        contains: only names containing this text.
    """
    from loramint.corpus import Corpus

    tasks = Corpus().tasks([source] if source else None, [family] if family else None)
    table = Table("task", "family", "metric", "train/val/test", "description")
    for t in tasks:
        if contains in t.name:
            sizes = "/".join(str(t.splits.get(k, 0)) for k in ("train", "val", "test"))
            table.add_row(t.name, t.family, t.metric, sizes, t.description[:80])
    console.print(table)


def data_show(name: str, n: int = 3, split: str = "train") -> None:
    """Show one corpus task: its metadata and the first `n` examples of a split.

    Args:
        name: task name, e.g. proc.sort_words.
        n: examples to show.
        split: train, val or test.
    """
    from loramint.corpus import Corpus

    task = Corpus().task(name)
    console.print(f"[bold]{task.name}[/bold]  family {task.family}, source {task.source}, license {task.license}, "
                  f"metric {task.metric}, splits {task.splits}")  # fmt: skip
    console.print(f"description: {task.description}")
    for phrasing in task.descriptions:
        console.print(f"  also: {phrasing}")
    for ex in task.part(split)[:n]:
        answer = f"{ex.output}  (choices: {ex.choices})" if ex.is_multiple_choice else ex.output
        console.print(f"[dim]input:[/dim] {ex.input}\n[dim]answer:[/dim] {answer}\n")


def data_export(
    names: str | list[str],
    out: Path = Path("data/tasks/tasks.jsonl"),
    split: str | None = None,
    examples_only: bool = False,
) -> None:
    """Export corpus tasks: as a task JSONL (what `train-experts --tasks` reads) or one task's examples.

    Args:
        names: comma-separated task names (a list in YAML).
        out: file to write.
        split: only this split's examples (train, val or test); with `examples_only`.
        examples_only: write one task's examples, one JSON object a line (with a `split` field unless
            `split` is given), instead of whole tasks.
    """
    from loramint.corpus import Corpus, export_task
    from loramint.paths import atomic_write_bytes
    from loramint.tasks import save_tasks

    wanted = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else names
    tasks = Corpus().tasks(names=wanted)
    if examples_only:
        if len(tasks) != 1:
            raise LoramintError("examples_only exports one task; name exactly one")
        atomic_write_bytes(out, export_task(tasks[0], split).encode("utf-8"))
    else:
        save_tasks(tasks, out)
    console.print(f"wrote {len(tasks)} task(s) to {out}")


def data_add(file: Path) -> None:
    """Add your own tasks (a JSONL file, one task per line) to the corpus's `user` source.

    Each line: {"name", "description", "family", "examples": [{"input", "target"} or {"input", "choices",
    "answer"}], optional "metric", "descriptions", "license", "splits"}. Tasks without splits are split by
    the corpus rule. Nothing is stored when any line is invalid.

    Args:
        file: the JSONL file.
    """
    from loramint.corpus import add_user_tasks
    from loramint.tasks import load_tasks

    added = add_user_tasks(load_tasks(file))
    for t in added:
        console.print(f"added {t.name} ({t.family}, {len(t.examples)} examples, splits {t.splits})")


def data_build(source: str, input: Path | None = None) -> None:
    """Build a corpus source from its inputs and record it in corpus/manifest.json.

    openai-evals: fetches the pinned `evals` wheel from PyPI (or `--input` a copy). procedural: generated in
    code. bbh: `--input` a checkout of suzgunmirac/BIG-Bench-Hard; built into the user cache and checked
    against the manifest.

    Args:
        source: openai-evals, procedural or bbh.
        input: the source's input (a wheel or a folder).
    """
    from loramint.corpus import build_source

    entry = build_source(source, input)
    console.print(f"{entry.name}: {entry.tasks} tasks, {entry.examples} examples, sha256 {entry.sha256[:16]}")


def suite_prepare(suite_file: Path, force_split: bool = False) -> None:
    """Import a suite's tasks (if missing) and fix its seen/unseen split file (written once, then enforced).

    Args:
        suite_file: suite YAML, e.g. configs/suites/corpus.yaml.
        force_split: rewrite the split file even if it disagrees (only for a new study: experts and the
            generator trained on the old split become invalid).
    """
    from loramint.training.suites import SuiteConfig, prepare_suite

    suite = prepare_suite(SuiteConfig.from_yaml(suite_file), force_split=force_split)
    console.print(
        f"suite {suite.name}: {len(suite.seen)} seen, {len(suite.unseen)} unseen tasks ({suite.tasks_file})"
    )
    console.print("unseen: " + ", ".join(suite.unseen))


# ---- library ------------------------------------------------------------------------------------------------
def _open(library: Path):
    from loramint.index import ExpertLibrary

    return ExpertLibrary.open(library)


def library_add(
    adapter: Path,
    description: str,
    name: str | None = None,
    family: str = "",
    id: str | None = None,
    library: Path = USER_LIBRARY,
) -> None:
    """Validate a PEFT LoRA folder and add it to the library as an expert.

    Args:
        adapter: PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        description: what the expert does (embedded for retrieval).
        name: human-readable name (default: the folder's name).
        family: task family, for filtering.
        id: expert id (default: derived from the name).
        library: library folder.
    """
    with _open(library) as lib:
        expert = lib.add(adapter, id=id, name=name or adapter.name, description=description, family=family)
    console.print(f"added {expert.id} ({expert.base_model}, rank {expert.rank}) to {library}")


def library_list(
    library: Path = USER_LIBRARY, family: str | None = None, limit: int = 50, offset: int = 0
) -> None:
    """List experts.

    Args:
        library: library folder.
        family: only this family.
        limit: at most this many rows.
        offset: skip this many rows.
    """
    with _open(library) as lib:
        experts = lib.list(family=family, offset=offset, limit=limit)
        total = len(lib)
    table = Table("id", "family", "base model", "rank", "description")
    for e in experts:
        table.add_row(e.id, e.family, e.base_model, str(e.rank), e.description[:80])
    console.print(table)
    console.print(f"{len(experts)} of {total} experts")


def library_search(query: str, k: int = 5, library: Path = USER_LIBRARY, family: str | None = None) -> None:
    """Find the experts whose descriptions are closest to `query` (cosine of sentence embeddings).

    Args:
        query: a task description, e.g. "classify the sentiment of a review".
        k: number of results.
        library: library folder.
        family: only this family.
    """
    with _open(library) as lib:
        hits = lib.search(query, k=k, family=family)
    table = Table("score", "id", "family", "description")
    for expert, score in hits:
        table.add_row(f"{score:.3f}", expert.id, expert.family, expert.description[:90])
    console.print(table)


def library_summary(library: Path = USER_LIBRARY, out: Path | None = None) -> None:
    """What a library holds: experts, families, how many converged and beat the base model, build rate.

    Args:
        library: library folder.
        out: also write it as JSON here (e.g. benchmarks/results/library.json).
    """

    from loramint.paths import atomic_write_bytes
    from loramint.training.build import library_summary as summarize

    with _open(library.expanduser()) as lib:
        summary = summarize(lib)
    if out is not None:
        atomic_write_bytes(out, (json.dumps(summary, indent=2) + "\n").encode())
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "definitions"}))


def library_remove(id: str, library: Path = USER_LIBRARY) -> None:
    """Remove an expert (its row, its vector and its adapter folder).

    Args:
        id: expert id.
        library: library folder.
    """
    with _open(library) as lib:
        lib.remove(id)
    console.print(f"removed {id}")


# ---- training -----------------------------------------------------------------------------------------------
def train_experts(
    tasks: Path = Path("data/tasks/tasks.jsonl"),
    library: Path = USER_LIBRARY,
    base_model: str = "smollm2-135m",
    train: ExpertTrainConfig | None = None,
    only: list[str] | None = None,
    suite: Path | None = None,
    report: Path | None = None,
    cards: bool = False,
    shard: str | None = None,
) -> None:
    """Train one LoRA expert per task and add each to the library (skips experts already built identically).

    Args:
        tasks: task JSONL file (e.g. from `loramint tasks import-bigbench`).
        library: library folder.
        base_model: registry name, HF id or local path.
        train: training hyper-parameters of every expert (`--train.steps 30`, or a `train:` mapping in YAML;
            defaults: the fast CPU path, see `ExpertTrainConfig`).
        only: train only these task names.
        suite: a suite YAML (configs/suites/): train its SEEN tasks only, from its tasks file (overrides
            `tasks`; combined with `only`).
        report: write the build's JSON report here (n_experts, wall_s, per_expert_s, per-expert metrics,
            machine), e.g. benchmarks/results/experts_build.json.
        cards: give every expert a quality card (base vs expert on the task's test split, in the task's
            metric and NLL); experts that do not beat the base model are kept out of retrieval.
        shard: "i/n": train only every n-th task of the build order, from the i-th (0-based), so that n
            processes (e.g. one CPU thread each: OMP_NUM_THREADS=1) build one library together.
    """
    from loramint.models import load_base_model
    from loramint.tasks import load_tasks
    from loramint.training.build import build_library, interleave_families, prompt_chars, write_report

    report_path = report

    if suite is not None:
        from loramint.training.suites import load_suite

        fixed = load_suite(suite)
        tasks, only = fixed.tasks_file, [n for n in fixed.seen if not only or n in only]
    # cheapest first within each family (fewest prompt characters), families round-robin
    chosen = sorted((t for t in load_tasks(tasks) if only is None or t.name in only), key=prompt_chars)
    task_list = interleave_families(chosen)
    if shard is not None:
        index, count = parse_shard(shard)
        task_list = task_list[index::count]
    library = library.expanduser()
    config = train or ExpertTrainConfig()
    base = load_base_model(base_model)
    with _open(library) as lib:
        scoring = None
        if cards:
            from loramint.paths import cache_dir
            from loramint.training.evaluate import ScoringConfig

            scoring = ScoringConfig(n_generate=150, batch_size=16, cache_dir=cache_dir("scores", "cards"))
        build = build_library(lib, task_list, base, config, cards=scoring)
        table = Table(
            "expert", "answer NLL before", "after", "steps", "task metric base -> expert", "train s"
        )
        for eid in build.trained + build.skipped:
            m = lib.get(eid).metrics
            q = m.get("quality")
            card = (
                f"{q['metric']} {q['base']:.3f} -> {q['expert']:.3f}{'' if q['beats_base'] else ' (unfit)'}"
                if q
                else ""
            )
            table.add_row(eid, f"{m['answer_nll_before']:.3f}", f"{m['answer_nll_after']:.3f}",
                          str(m.get("steps_run", "")), card, str(m["train_seconds"]))  # fmt: skip
        if report_path is not None:
            write_report(report_path, build, lib, base, config)
    console.print(table)
    console.print(
        f"trained {len(build.trained)}, skipped {len(build.skipped)} (unchanged) in {build.wall_s:.0f}s"
        + (f"; report: {report_path}" if report_path is not None else "")
    )


def evaluate(
    suite: Path | None = None,
    tasks: Path | None = None,
    seen: list[str] | None = None,
    unseen: list[str] | None = None,
    splits: list[str] | None = None,
    library: Path = USER_LIBRARY,
    base_model: str = "smollm2-135m",
    methods: list[str] | None = None,
    out: Path = Path("benchmarks/results"),
    n_generate: int = 32,
    max_examples: int | None = None,
    max_new_tokens: int = 32,
    max_length: int = 512,
    batch_size: int = 8,
    n_bootstrap: int = 1000,
    seed: int = 0,
    cache_dir: Path | None = None,
    split_layer: int | None = None,
    top_k: int = 3,
    topk_weights: str = "similarity",
    tau: float = 0.1,
    train_config: Path | None = None,
    multitask_steps: int | None = None,
    multitask_dir: Path = Path("data/eval/multitask"),
    oracle_library: Path = Path("data/eval/oracle-library"),
    generator: Path | None = None,
    n_shots: int = 5,
    router: Path | None = None,
    top_k_tokens: int = 2,
    min_test: int = 0,
    max_per_family: int | None = None,
    user_phrasings: Path | None = None,
    ood: Path | None = None,
    report: str | None = None,
    headline: str = "answer_nll",
    shard: str | None = None,
) -> None:
    """Score the baselines on held-out examples of unseen (or seen) tasks; write <out>/eval_<split>.json/.md/.png.

    Args:
        suite: suite YAML (configs/suites/) naming the tasks file and the seen/unseen split; or give tasks + names.
        tasks: task JSONL file (when no suite is given).
        seen: task names with experts in the library (default: every task not in `unseen`).
        unseen: held-out task names (default: every task not in `seen`).
        splits: task sets to score, each to its own files: unseen and/or seen (default: unseen).
        library: expert library of the seen tasks.
        base_model: registry name, HF id or local path.
        methods: method names (default: base, base+description, top1, topk, uniform, multitask, oracle).
        out: output folder.
        n_generate: free-text tasks: greedy answers generated for this many evaluation examples (0: none).
        max_examples: score only this many evaluation examples per task (default: all, up to 200).
        max_new_tokens: longest generated answer.
        max_length: tokens per scored sequence (prompt cut from the left).
        batch_size: sequences per forward pass.
        n_bootstrap: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        cache_dir: folder keeping each task's per-example scores, so a rerun scores only what changed.
        split_layer: methods that change only the layers from this one on (LoRAs on the top layers, e.g.
            22 for experts on SmolLM2's top 8 of 30) reuse the lower layers' states of each task's answer
            likelihood pass instead of recomputing them (same scores; tasks are scored one at a time, every
            method on each).
        top_k: experts mixed by `topk`.
        topk_weights: `similarity` (cosines normalised to sum 1) or `softmax` (softmax(cos / tau)).
        tau: softmax temperature.
        train_config: experts YAML (configs/experts/) whose training settings the oracle and multi-task LoRAs
            use (default: the config the library's experts recorded).
        multitask_steps: steps of the multi-task LoRA (default: n_seen * the experts' steps, the library's budget).
        multitask_dir: PEFT folder caching the multi-task LoRA.
        oracle_library: expert library caching the oracle LoRAs.
        generator: generator checkpoint for the methods minted, minted+examples, minted-user and
            reconstructed.
        n_shots: training examples a user shows (minted+examples conditions on them).
        router: learned per-token router (`loramint train-router`) for route-token.
        top_k_tokens: experts per token for arrow.
        min_test: score only the tasks with at least this many evaluation examples (a task with 10 gives a
            confidence interval as wide as the effects it should show).
        max_per_family: score at most this many tasks of each family (the first ones in the suite's order,
            after min_test), so that no family dominates the mean over tasks (default: all).
        user_phrasings: JSON {task name: what a user would type} for minted-user.
        ood: result of `benchmarks/ood.py` (out-of-domain requests with the fallback) whose summary goes into
            the report as `ood` (n, worse_than_base, better_than_base, fell_back, and the file).
        report: name of the report files, eval_<report>.json/.md/.png (default: the split; one split only).
        headline: answer_nll, or task_metric: the result led by each task's own metric (accuracy, exact match
            or ROUGE-L), with `recovered` (fraction of the oracle's gain) and the held-out families counted.
        shard: "i/n": score only every n-th task, from the i-th, into the score cache and write no report,
            so that n processes share the work (one thread each); shard 0 alone trains and scores the
            multi-task LoRA. A run without `shard` afterwards scores what is missing (the multi-task LoRA on
            the other shards' tasks) and writes the report.
    """
    from loramint.models import load_base_model
    from loramint.training import evaluate as harness
    from loramint.training.build import expert_id
    from loramint.training.methods import MethodConfig, train_config_from_yaml

    by_name, names = harness.select_tasks(suite, tasks, seen, unseen)
    splits = splits or ["unseen"]
    if bad := [s for s in splits if s not in names]:
        raise LoramintError(f"splits must be 'seen' and/or 'unseen', got {bad}")
    scoring = harness.ScoringConfig(
        max_length=max_length,
        batch_size=batch_size,
        n_generate=n_generate,
        max_examples=max_examples,
        max_new_tokens=max_new_tokens,
        n_bootstrap=n_bootstrap,
        seed=seed,
        split_layer=split_layer,
        cache_dir=cache_dir,
    )
    options = MethodConfig(
        top_k=top_k,
        topk_weights=topk_weights,
        tau=tau,
        train=train_config_from_yaml(train_config) if train_config else None,
        multitask_steps=multitask_steps,
        multitask_dir=multitask_dir,
        oracle_library=oracle_library,
        generator=generator,
        n_shots=n_shots,
        router=router,
        top_k_tokens=top_k_tokens,
        user_phrasings=user_phrasings,
    )
    attach = {}
    if ood is not None and not shard:  # read for the report, which shards do not write
        try:
            found = json.loads(Path(ood).read_text())
            keys = ("n", "worse_than_base", "better_than_base", "fell_back", "minted_worse_than_base")
            attach["ood"] = {k: found[k] for k in keys} | {"file": str(ood)}
        except KeyError as exc:
            raise LoramintError(f"ood: {ood} is not a result of benchmarks/ood.py (no {exc})") from exc
        except (OSError, ValueError) as exc:
            raise LoramintError(f"ood: cannot read {ood}: {exc}") from exc
    if report is not None and len(splits) > 1:
        raise LoramintError("report names the files of one split: give one split with it")
    if headline not in (harness.METRIC, "task_metric"):
        raise LoramintError(f"headline must be {harness.METRIC!r} or 'task_metric', got {headline!r}")
    if max_per_family is not None and max_per_family < 1:
        raise LoramintError(f"max_per_family must be >= 1 (or left out for every task), got {max_per_family}")
    methods = list(methods or harness.ALL_METHODS)
    index, count = parse_shard(shard) if shard is not None else (0, 1)
    if index and "multitask" in methods:  # one multi-task LoRA, trained by shard 0
        methods.remove("multitask")
    base = load_base_model(base_model)
    with _open(library) as lib:
        # the library's tasks: what retrieval draws on and the multi-task LoRA trains on
        seen_tasks = [by_name[n] for n in names["seen"] if lib is None or expert_id(by_name[n]) in lib]
        for split in splits:
            # the methods still see the whole seen split
            scored = harness.pick_scored([by_name[n] for n in names[split]], min_test, max_per_family)
            result = harness.evaluate(
                base,
                scored[index::count],
                methods,
                library=lib,
                seen=seen_tasks,
                scoring=scoring,
                method_config=options,
                out=None if shard else out,
                split=split,
                extra_config={
                    "suite": suite and str(suite),
                    "tasks_file": tasks and str(tasks),
                    "min_test": min_test,
                    "max_per_family": max_per_family,
                },
                attach=attach,
                report=report,
                headline=headline,
            )
            if not shard:
                console.print(harness.markdown(result))
    if shard:
        console.print(f"shard {shard}: scores cached in {cache_dir}; run without --shard for the report")
    else:
        names_ = [report] if report else splits
        console.print(f"wrote {', '.join(f'eval_{s}.json' for s in names_)} (+ .md, .png) to {out}")


def eval_assemble(
    results: list[Path] | None = None,
    methods: list[str] | None = None,
    out: Path = Path("benchmarks/results"),
    cache_dir: Path | None = None,
) -> None:
    """Put the methods of several `loramint eval` runs into one table (eval_<split>.json/.md/.png) from
    their cached per-example scores: paired intervals and the oracle fraction as if one run had scored them.

    Args:
        results: eval_<split>.json files of runs of the same tasks and scoring settings.
        methods: methods to keep, in this order (default: all of them); each comes from the first run
            that has it; base is always first.
        out: output folder.
        cache_dir: the score cache (default: the one each run recorded).
    """
    from loramint.training import evaluate as harness
    from loramint.training.assemble import assemble

    result = assemble(results or [], methods, out, cache_dir)
    console.print(harness.markdown(result))
    console.print(f"wrote eval_{result['split']}.json (+ .md, .png) to {out}")


def train_generator(
    train: GeneratorTrainConfig | None = None,
    suite: Path | None = None,
    base_model: str = "smollm2-135m",
    report: Path | None = None,
    plot: Path | None = None,
) -> None:
    """Train the generator on the library's experts and write its checkpoint (safetensors + JSON).

    Args:
        train: the training settings (`--train.steps 2000`, or a `train:` mapping in YAML; see
            configs/generator/).
        suite: suite YAML whose SEEN tasks the generator learns from (their experts, phrasings and examples);
            needed by the functional objective, example conditioning and validation NLL.
        base_model: registry name, HF id or local path (the functional objective and validation NLL).
        report: write the training report (steps, validation curve, sizes, wall time, machine) as JSON here.
        plot: write the learning curve (validation metrics per step) as a PNG here.
    """

    from loramint.tasks import load_tasks
    from loramint.training.generator import plot_curve
    from loramint.training.generator import train_generator as run_training

    config = train or GeneratorTrainConfig()
    tasks = []
    if suite is not None:
        from loramint.training.suites import load_suite

        fixed = load_suite(suite)
        tasks = [t for t in load_tasks(fixed.tasks_file) if t.name in set(fixed.seen)]
    base = None
    if config.needs_base:
        from loramint.models import load_base_model

        base = load_base_model(base_model)
    result = run_training(config, tasks, base)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2))
    if plot is not None and result["curve"]:
        plot_curve(result["curve"], plot)
    best = (
        f"best {result['monitor']} {result['best']:.4f} at step {result['best_step']}"
        if result["best"]
        else ""
    )
    console.print(
        f"trained {result['steps']} steps on {len(result['train'])} experts in {result['wall_s']:.0f}s; {best}; "
        f"checkpoint: {config.out}"
    )


def refresh_bank(generator: Path, library: Path, out: Path | None = None) -> None:
    """Let a trained generator retrieve from the library as it is now: its bank (the experts it retrieves and
    mixes) brought up to the library's retrievable experts (new, retrained or re-described ones get a new
    entry, the others stay as they were), the network unchanged (no training).

    Args:
        generator: a generator checkpoint folder (`loramint train-generator`); an ensemble's members one by one.
        library: the expert library to take the experts from (the one it was trained on, grown since).
        out: write the refreshed checkpoint here (default: replace `generator` in place, once complete).
    """
    from loramint.training.generator import refresh_bank as run

    result = run(generator, library, out)
    console.print(
        f"bank: {result['before']} -> {result['after']} experts ({len(result['added'])} added, "
        f"{len(result['updated'])} updated, {len(result['removed'])} removed): {out or generator}"
    )


def mint(
    description: str,
    out: Path = Path("minted-adapter"),
    generator: Path = Path(DEFAULT_GENERATOR),
    examples: list[str] | None = None,
    rank: int | None = None,
    fuse: list[str] | None = None,
) -> None:
    """Mint a PEFT adapter from a task description and write it to `out` (`-o` works too).

    Args:
        description: what the task asks for.
        out: the adapter folder to write (adapter_config.json + adapter_model.safetensors).
        generator: a checkpoint from `loramint train-generator`.
        examples: a few example texts of the task (input and answer) to condition on.
        rank: keep only the strongest `rank` components of each module.
        fuse: more task descriptions: one adapter for all of them (their latents mixed equally), e.g.
            `--fuse+ "Summarise the text." --fuse+ "Translate it."` or `--fuse '["A", "B"]'`.
    """
    import time

    from loramint.gen.minter import Minter

    minter = Minter.from_pretrained(generator)
    started = time.perf_counter()
    if fuse:
        adapter = minter.fuse([description, *fuse], rank=rank)
    else:
        adapter = minter.mint(description, examples=examples, rank=rank)
    adapter.save(out)
    ms = (time.perf_counter() - started) * 1000
    console.print(
        f"minted {adapter.config.base_model} rank {adapter.config.r} adapter in {ms:.0f} ms -> {out}"
    )
    for text, drawn in zip(
        [description, *(fuse or [])], minter.provenance([description, *(fuse or [])]), strict=True
    ):
        experts = ", ".join(f"{e['id']} ({e['similarity']:.2f})" for e in drawn["experts"])
        console.print(f"{text[:60]!r} draws on {experts}; confidence {drawn['confidence']:.2f}")


def ensemble_generator(
    out: Path,
    members: list[Path],
    weights: list[float] | None = None,
    decode_dtype: str = "float32",
) -> None:
    """Combine generator checkpoints trained alike (e.g. seeds) into one that mints the mean of their
    adapters (README "Generator"); the members are copied into `out`.

    Args:
        out: the ensemble checkpoint folder to write (use it wherever a generator goes: --generator).
        members: two or more generator checkpoints over the same library.
        weights: one weight per member (default: equal).
        decode_dtype: float32, or bfloat16 (the members decode under bfloat16 autocast: ~4x faster on a
            CPU with native bfloat16, corrections within ~0.2% of float32's).
    """
    from loramint.gen.ensemble import save_ensemble

    path = save_ensemble(out, members, weights, decode_dtype)
    console.print(f"ensemble of {len(members)} generators -> {path}")


def train_router(
    suite: Path,
    library: Path = USER_LIBRARY,
    out: Path = Path("data/router"),
    base_model: str = "smollm2-135m",
    train: RouterTrainConfig | None = None,
) -> None:
    """Train the runtime's learned per-token router over the library's experts of a suite's seen tasks.

    Args:
        suite: suite YAML (configs/suites/): its seen tasks' training examples and experts.
        library: the expert library.
        out: folder for router.safetensors + router.json.
        base_model: registry name, HF id or local path.
        train: steps, batch size, lr, top_k, balance weight (`--train.steps 300`).
    """
    from loramint.runtime.runtime import Runtime
    from loramint.tasks import load_tasks
    from loramint.training.router import train_router as run_training
    from loramint.training.suites import load_suite

    fixed = load_suite(suite)
    tasks = [t for t in load_tasks(fixed.tasks_file) if t.name in set(fixed.seen)]
    with _open(library) as lib:
        experts = [e for e in lib.list() if e.name in set(fixed.seen)]
        if not experts:
            raise LoramintError(
                f"{library} holds no expert of the suite's seen tasks: run train-experts first"
            )
        targets = sorted({t for e in experts for t in e.target_modules})
        rank = max(e.rank for e in experts)
        rt = Runtime(base_model, library=lib, capacity=len(experts), max_rank=rank, target_modules=targets)
        _, info = run_training(rt, tasks, [e.id for e in experts], train, out)
    console.print(
        f"trained a router over {len(experts)} experts in {info['wall_s']:.0f}s ({info['steps']} steps) -> {out}"
    )


def parse_shard(shard: str) -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n."""
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise LoramintError(f"shard must be 'i/n' with 0 <= i < n, got {shard!r}")
    return int(index), int(count)


def steady_allocator() -> None:
    """Keep a long-running server's memory flat under glibc: requests allocate and free ~10 MB tensors
    (adapters, zips), and glibc's adaptive mmap threshold then moves such blocks onto heaps they fragment, so
    RSS creeps up for hours. A fixed 1 MiB threshold returns every large block to the OS when freed; two
    arenas bound the per-thread heaps. A no-op off glibc or when MALLOC_* environment variables are set."""
    import ctypes
    import ctypes.util

    if any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_arena_max, 2)


def serve(service: ServiceConfig | None = None, log_level: str = "info") -> None:
    """Run the HTTP service (FastAPI + uvicorn): mint, retrieve, manage experts, OpenAI-compatible completions.

    Args:
        service: the service's settings (`--service.port 9000`, or a `service:` mapping in YAML; see
            configs/service/default.yaml). Environment variables LORAMINT_<FIELD> override them, e.g.
            LORAMINT_API_KEYS=key1,key2.
        log_level: uvicorn's log level.
    """
    import torch
    import uvicorn

    from loramint.service import create_app
    from loramint.service.config import READY_DESCRIPTION
    from loramint.service.schemas import MintRequest

    config = (service or ServiceConfig()).with_env()
    steady_allocator()
    torch.set_num_threads(config.thread_count())
    try:
        config.check_auth()
    except ValueError as exc:
        raise LoramintError(str(exc)) from exc
    key_command = os.environ.get("LORAMINT_KEY_COMMAND")  # how the printed curl examples get a key

    def ready(service) -> None:
        minted_id = None
        if service.minter is not None:  # the printed mint's own id, so that the printed chat works as shown
            (info,) = service.mint_batch([MintRequest(description=READY_DESCRIPTION)])
            if isinstance(info, Exception):
                print(f"loramint: the example mint failed: {info}", file=sys.stderr, flush=True)
            else:
                minted_id = info.id
        print(config.ready_message(minted_id, key_command), file=sys.stderr, flush=True)

    app = create_app(config, on_ready=ready)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level)


# ---- default artifacts -------------------------------------------------------------------------------------
def pack_defaults(
    library: Path = Path(DEFAULT_LIBRARY),
    generator: Path | None = Path(DEFAULT_GENERATOR),
    out: Path = Path("artifacts"),
    data: Path = Path("data"),
    max_file_mb: float = 40.0,
    force: bool = False,
) -> None:
    """Pack the default library and generator into small checksummed files for git (see `loramint setup`).

    Writes <out>/library-<name>/ (library.json: every expert's metadata; the factors in fp16 safetensors
    shards), <out>/generator-<name>/ (model.safetensors in fp16, the other files as they are, large ones
    sharded) and <out>/MANIFEST.json (sha256 and size of every file).

    Args:
        library: the expert library to pack.
        generator: the generator checkpoint to pack (`--generator null`: the library alone).
        out: the artifacts folder (replaced as a whole, only with --force when it is not empty).
        data: the data root `setup` restores under: each bundle is recorded by its path relative to it.
        max_file_mb: largest file written, in MB (10^6 bytes); bigger tensors are split into shards.
        force: replace a non-empty `out`.
    """
    from loramint.artifacts import pack_defaults as pack

    summary = pack(
        library, generator, out, data, max_bytes=int(max_file_mb * 1e6), force=force, log=console.print
    )
    table = Table("file", "MB", "sha256")
    for name, entry in summary["files"].items():
        table.add_row(name, f"{entry['bytes'] / 1e6:.2f}", entry["sha256"][:16])
    console.print(table)
    errors = f"fp16: max relative ΔW error {summary['library']['fp16_max_relative_delta_error']:.1e}"
    if "generator" in summary:
        errors += f", generator weights {summary['generator']['fp16_max_relative_error']:.1e}"
    console.print(
        f"packed {summary['library']['experts']} experts{' and a generator' if generator else ''} into "
        f"{out}: {len(summary['files'])} files, {summary['total_bytes'] / 1e6:.1f} MB in "
        f"{summary['seconds']:.1f}s ({errors})"
    )


def setup(artifacts: Path = Path("artifacts"), data: Path = Path("data"), force: bool = False) -> None:
    """Restore the default library and generator from the committed artifacts (what a fresh clone needs).

    Verifies every file against <artifacts>/MANIFEST.json first (nothing is written if one fails), then
    rebuilds the library through ExpertLibrary (embeddings recomputed) and writes the generator checkpoint,
    each in a temp folder renamed into place. Targets already set up from the same artifacts are skipped.

    Args:
        artifacts: the artifacts folder (from `loramint pack-defaults`).
        data: the data root; e.g. data/library-corpus and data/generator/corpus are written.
        force: replace targets that exist but were not set up from these artifacts (their contents are lost).
    """
    from loramint.artifacts import setup as run_setup

    summary = run_setup(artifacts, data, force=force, log=console.print, progress=True)
    console.print(f"setup done in {summary['seconds']:.1f}s")


COMMANDS = {
    "models": {"list": models_list, "prepare": models_prepare},
    "tasks": {
        "import-bigbench": tasks_import_bigbench,
        "list-bigbench": tasks_list_bigbench,
        "synthetic": tasks_synthetic,
    },
    "data": {
        "sources": data_sources,
        "families": data_families,
        "tasks": data_tasks,
        "show": data_show,
        "export": data_export,
        "add": data_add,
        "build": data_build,
    },
    "suite": {"prepare": suite_prepare},
    "library": {
        "add": library_add,
        "list": library_list,
        "search": library_search,
        "summary": library_summary,
        "remove": library_remove,
    },
    "train-experts": train_experts,
    "eval": evaluate,
    "eval-assemble": eval_assemble,
    "train-generator": train_generator,
    "refresh-bank": refresh_bank,
    "mint": mint,
    "ensemble-generator": ensemble_generator,
    "train-router": train_router,
    "serve": serve,
    "pack-defaults": pack_defaults,
    "setup": setup,
}


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mint"]:  # the one short flag users expect: `loramint mint "..." -o out_dir`
        argv = ["--out" if a == "-o" else a for a in argv]
    if argv[:1] in (["setup"], ["pack-defaults"]):  # a bare `--force` means `--force true`
        argv = [
            x
            for i, a in enumerate(argv)
            for x in (
                [a, "true"]
                if a == "--force" and (i + 1 == len(argv) or argv[i + 1].lower() not in ("true", "false"))
                else [a]
            )
        ]
    try:
        CLI(COMMANDS, args=argv, as_positional=True)
    except LoramintError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
