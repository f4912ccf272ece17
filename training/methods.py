"""Evaluation methods: for one task, what the base model runs with — nothing, a prompt change, one adapter,
or a weighted mixture of adapters (applied with `loramint.adapters.apply_mixture`).

`METHODS` maps a method name to a factory `(MethodContext) -> (Task -> Intervention)`; add one with
`@register("name")`. Only `base+description` lets the task description into the prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from loramint.adapters import LoraAdapter
from loramint.index.library import Expert, ExpertLibrary
from loramint.models import BaseModel
from loramint.paths import atomic_write_bytes, json_digest
from loramint.runtime.runtime import similarity_weights
from loramint.tasks import Task
from loramint.training.build import build_library, config_hash, expert_id
from loramint.training.data import ENCODING_VERSION, eval_split
from loramint.training.experts import ExpertTrainConfig, train_lora

log = logging.getLogger(__name__)

Mixture = list[tuple[LoraAdapter, float]]
TRAIN_RECORD = "loramint_train.json"
"""Written next to the cached multi-task adapter: what it was trained on, so a rerun can reuse it."""


@dataclass
class MethodConfig:
    """Settings of the methods that retrieve or train adapters."""

    top_k: int = 3
    """Experts mixed by `topk`."""
    topk_weights: str = "similarity"
    """`similarity`: w_i = max(cos_i, 0) / sum_j max(cos_j, 0) (the issue's "similarity weights");
    `softmax`: w = softmax(cos / tau) (the generator's semantic prior)."""
    tau: float = 0.1
    """Temperature of `softmax` weights."""
    train: ExpertTrainConfig | None = None
    """Training config of `oracle` and `multitask` (rank, steps, ...). None: the one the library's seen
    experts recorded, so the oracle is trained exactly like a library expert."""
    multitask_steps: int | None = None
    """Optimizer steps of the multi-task LoRA (at most, with early stopping). None: the same budget as the
    library, i.e. the steps its seen experts took together (`library_budget`: the same examples seen in
    total at the same batch size)."""
    multitask_dir: Path = Path("data/eval/multitask")
    """PEFT folder caching the multi-task LoRA (reused while its tasks, base model and config are unchanged)."""
    oracle_library: Path = Path("data/eval/oracle-library")
    """Expert library caching oracle LoRAs (kept apart from the main library, which must not hold unseen tasks)."""
    generator: Path | None = None
    """Generator checkpoint (`loramint train-generator`) for the `minted*` and `reconstructed` methods."""
    user_phrasings: Path | None = None
    """JSON {task name: what a user would type} for `minted-user` (every scored task must be in it); None:
    the task's shortest one-sentence phrasing."""
    n_shots: int = 5
    """Training examples a user is assumed to show: `minted+examples` conditions on them (never on evaluation
    examples)."""
    n_demos: int = 3
    """Solved training examples `few-shot` puts before each input."""
    router: Path | None = None
    """Learned per-token router (`loramint train-router`) for `route-token`."""
    top_k_tokens: int = 2
    """Experts per token for `arrow`."""

    def __post_init__(self) -> None:
        self.multitask_dir = Path(self.multitask_dir).expanduser()
        self.oracle_library = Path(self.oracle_library).expanduser()
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.topk_weights not in ("similarity", "softmax"):
            raise ValueError(f"topk_weights must be 'similarity' or 'softmax', got {self.topk_weights!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.multitask_steps is not None and self.multitask_steps < 1:
            raise ValueError(f"multitask_steps must be >= 1 or null, got {self.multitask_steps}")
        if self.generator is not None:
            self.generator = Path(self.generator)
        if self.user_phrasings is not None:
            self.user_phrasings = Path(self.user_phrasings)
        if self.router is not None:
            self.router = Path(self.router)
        if self.n_shots < 1 or self.n_demos < 1:
            raise ValueError(f"n_shots and n_demos must be >= 1, got {self.n_shots}, {self.n_demos}")


@dataclass
class Intervention:
    """What a method changes for one task."""

    instruction: str = ""
    """Text put before the example in the user message (only `base+description` sets it)."""
    mixture: Mixture = field(default_factory=list)
    """(adapter, weight) pairs; the model runs with W + sum_k weight_k * ΔW_k. Empty: the base weights."""
    info: dict[str, Any] = field(default_factory=dict)
    """What was chosen (expert ids, similarities, weights, cache hits), recorded in the results."""
    routing: TokenRouting | None = None
    """Per-token routing through the runtime instead of a merged mixture (arrow, route-token)."""

    def shown(self, task: Task) -> Task:
        """The task as the model sees it: the instruction, if any, goes in front of the task's own prefix."""
        if not self.instruction:
            return task
        return replace(task, prefix=f"{self.instruction}\n\n{task.prefix}")


Method = Callable[[Task], Intervention]


@dataclass
class TokenRouting:
    """Experts resident in a runtime stack attached to the scored model, routed per token (`kind`: "arrow"
    or "learned" with `router`); `key` identifies it in the score cache (expert contents + router)."""

    experts: list[tuple[str, LoraAdapter]]
    kind: str
    key: str
    router: Any = None
    top_k: int = 2

    @contextmanager
    def apply(self, model) -> Iterator[None]:
        from loramint.runtime.lora import Plan, arrow_router, attach, detach
        from loramint.runtime.stack import ExpertStack

        adapters = [a for _, a in self.experts]
        modules = sorted({m for a in adapters for m in a.weights})
        shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in modules}
        rank = max(a.config.r for a in adapters)
        stack = ExpertStack(shapes, len(adapters), rank, next(model.parameters()).device)
        slots = torch.tensor([stack.add(eid, a) for eid, a in self.experts])
        holder = attach(model, stack)
        if self.kind == "learned":  # the router's gates are over its own expert order
            holder.plan = Plan(stack.slots(self.router.expert_ids), router=self.router)
        else:
            holder.plan = Plan(slots, router=arrow_router(stack, slots, self.top_k))
        try:
            yield
        finally:
            holder.plan = None
            detach(model)


def _train_config(settings: dict[str, Any]) -> ExpertTrainConfig:
    known = {f.name for f in fields(ExpertTrainConfig)}
    return ExpertTrainConfig(**{k: v for k, v in settings.items() if k in known})


def train_config_from_yaml(path: str | Path) -> ExpertTrainConfig:
    """The training settings in an experts YAML (configs/experts/); its other keys (tasks, library) are ignored."""
    settings = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(settings, dict) or not isinstance(settings.get("train", {}), dict):
        raise ValueError(
            f"{path}: expected a mapping of `loramint train-experts` arguments with a `train:` mapping"
        )
    return _train_config(settings.get("train", {}))


# ---- context shared by the methods of one run ----------------------------------------------------------------


@dataclass
class MethodContext:
    """What methods draw on: the base model, the expert library, the seen tasks and the settings."""

    base: BaseModel
    library: ExpertLibrary | None
    seen: list[Task]
    """Tasks that have experts; retrieval and `uniform` use only their experts, `multitask` trains on them."""
    config: MethodConfig = field(default_factory=MethodConfig)
    _adapters: dict[str, LoraAdapter] = field(default_factory=dict, repr=False)
    _oracles: ExpertLibrary | None = field(default=None, repr=False)
    _train_config: ExpertTrainConfig | None = field(default=None, repr=False)
    _minter: Any = field(default=None, repr=False)
    _routing: dict[str, TokenRouting] = field(default_factory=dict, repr=False)

    def seen_experts(self) -> list[Expert]:
        """Library experts whose name is a seen task, in insertion order."""
        if self.library is None:
            raise ValueError("this method needs an expert library: pass library=...")
        names = {t.name for t in self.seen}
        experts = [e for e in self.library.list() if e.name in names]
        if not experts:
            raise ValueError(
                f"library {self.library.root} holds no expert for any of the {len(names)} seen tasks: build it "
                "with `loramint train-experts` on the seen tasks"
            )
        return experts

    def retrieve(self, text: str, k: int) -> list[tuple[Expert, float]]:
        """The k seen experts whose descriptions are closest to `text`, as (expert, cosine), best first."""
        names = {e.name for e in self.seen_experts()}
        hits = self.library.search(text, k=len(self.library))  # type: ignore[union-attr]
        return [(e, s) for e, s in hits if e.name in names][:k]

    def adapter(self, expert: Expert) -> LoraAdapter:
        key = str(expert.path)  # not the id: the oracle library reuses the main library's ids
        if key not in self._adapters:
            self._adapters[key] = LoraAdapter.load(expert.path, self.base.name)
        return self._adapters[key]

    def train_config(self) -> ExpertTrainConfig:
        """The oracle's and multi-task LoRA's config: given, else the library experts' own, else the default."""
        if self._train_config is None:
            self._train_config = self._resolve_train_config()
        return self._train_config

    def _resolve_train_config(self) -> ExpertTrainConfig:
        config = self.config.train
        if config is None and self.library is not None:
            recorded = [e.metrics["config"] for e in self.seen_experts() if "config" in e.metrics]
            if recorded:
                if any(r != recorded[0] for r in recorded):
                    log.warning("seen experts were trained with different configs; using the first one's")
                config = _train_config(recorded[0])
        config = config or ExpertTrainConfig()
        if config.seed != 0:
            # train_lora draws each task's evaluation split with config.seed; the harness scores split seed 0
            raise ValueError(
                f"training seed is {config.seed}, but train_lora holds out evaluation examples by that seed and "
                "the harness scores the seed-0 split: LoRAs would train on evaluation examples. Use seed 0"
            )
        return config

    def oracle_library(self) -> ExpertLibrary:
        if self._oracles is None:
            encoder = self.library.encoder if self.library is not None else None
            self._oracles = ExpertLibrary.open(self.config.oracle_library, encoder=encoder)
        return self._oracles

    def close(self) -> None:
        """Close the oracle library if this context opened it (the main library belongs to the caller)."""
        if self._oracles is not None:
            self._oracles.close()
            self._oracles = None

    def token_routing(self, kind: str) -> TokenRouting:
        """Every seen expert in a runtime stack, routed per token by Arrow or by the learned router."""
        if self._routing.get(kind) is None:
            experts = [(e.id, self.adapter(e)) for e in self.seen_experts()]
            router = None
            parts = [kind, *(f"{eid}:{a.content_hash()}" for eid, a in experts)]
            if kind == "learned":
                if self.config.router is None:
                    raise ValueError(
                        "route-token needs a trained router: pass router=... (loramint train-router)"
                    )
                from loramint.runtime.router import LearnedRouter

                router = LearnedRouter.load(self.config.router)
                missing = sorted(set(router.expert_ids) - {eid for eid, _ in experts})
                if missing:
                    raise ValueError(
                        f"the router routes experts that are not seen experts here: {missing[:3]}"
                    )
                parts.append(
                    hashlib.sha256((self.config.router / "router.safetensors").read_bytes()).hexdigest()
                )
            key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
            self._routing[kind] = TokenRouting(experts, kind, key, router, self.config.top_k_tokens)
        return self._routing[kind]

    def minter(self):
        """The generator of `config.generator`, loaded once (with the library's encoder when there is one)."""
        if self._minter is None:
            if self.config.generator is None:
                raise ValueError("the minted methods need a generator checkpoint: pass generator=...")
            from loramint.gen.minter import Minter

            encoder = self.library.encoder if self.library is not None else None
            self._minter = Minter.from_pretrained(self.config.generator, encoder=encoder)
        return self._minter

    def mixture(self, experts: Sequence[Expert], weights: Sequence[float], **info: Any) -> Intervention:
        mixture = [(self.adapter(e), float(w)) for e, w in zip(experts, weights, strict=True)]
        info = {"experts": [e.id for e in experts], "weights": [round(float(w), 6) for w in weights], **info}
        return Intervention(mixture=mixture, info=info)


# ---- the methods -------------------------------------------------------------------------------------------

METHODS: dict[str, Callable[[MethodContext], Method]] = {}
"""name -> factory; the factory runs once per evaluation run, its method once per task."""


def register(name: str) -> Callable[[Callable[[MethodContext], Method]], Callable[[MethodContext], Method]]:
    def add(factory: Callable[[MethodContext], Method]) -> Callable[[MethodContext], Method]:
        METHODS[name] = factory
        return factory

    return add


def build_methods(names: Sequence[str], context: MethodContext) -> dict[str, Method]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    return {name: METHODS[name](context) for name in names}


@register("base")
def base_method(ctx: MethodContext) -> Method:
    return lambda task: Intervention()


@register("base+description")
def description_method(ctx: MethodContext) -> Method:
    return lambda task: Intervention(instruction=task.description)


@register("few-shot")
def few_shot_method(ctx: MethodContext) -> Method:
    """The base model shown `n_demos` solved training examples before each input (in-context learning)."""

    def method(task: Task) -> Intervention:
        demos = shots(task, ctx.config.n_demos)
        text = "\n\n".join(f"{task.prompt(ex)}\n{ex.output}" for ex in demos)
        return Intervention(instruction=text, info={"n_demos": len(demos)})

    return method


@register("top1")
def top1_method(ctx: MethodContext) -> Method:
    def method(task: Task) -> Intervention:
        (expert, cos), *_ = ctx.retrieve(task.description, k=1)
        return ctx.mixture([expert], [1.0], similarities=[round(cos, 6)])

    return method


def topk_weights(similarities: Sequence[float], rule: str = "similarity", tau: float = 0.1) -> list[float]:
    """Mixture weights (summing to 1) from cosine similarities; see MethodConfig.topk_weights."""
    if rule != "softmax":
        return similarity_weights(similarities)
    top = max(similarities)
    scores = [math.exp((s - top) / tau) for s in similarities]
    return [s / sum(scores) for s in scores]


@register("topk")
def topk_method(ctx: MethodContext) -> Method:
    def method(task: Task) -> Intervention:
        hits = ctx.retrieve(task.description, k=ctx.config.top_k)
        cos = [s for _, s in hits]
        weights = topk_weights(cos, ctx.config.topk_weights, ctx.config.tau)
        return ctx.mixture([e for e, _ in hits], weights, similarities=[round(s, 6) for s in cos])

    return method


@register("uniform")
def uniform_method(ctx: MethodContext) -> Method:
    def method(task: Task) -> Intervention:
        experts = ctx.seen_experts()
        return ctx.mixture(experts, [1.0 / len(experts)] * len(experts))

    return method


def _tasks_key(tasks: Sequence[Task], base: BaseModel, config: ExpertTrainConfig) -> str:
    body = {
        "base": base.name,
        "config": asdict(config),
        "tasks": [t.to_dict() for t in tasks],
        "encoding": ENCODING_VERSION,
    }
    return json_digest(body)


def multitask_adapter(ctx: MethodContext) -> tuple[LoraAdapter, dict[str, Any]]:
    """One LoRA trained on all seen tasks' training splits; cached in `multitask_dir` under a content key."""
    base_config = ctx.train_config()
    steps = ctx.config.multitask_steps or library_budget(ctx, base_config)
    config = replace(base_config, steps=steps)
    per_task = min(base_config.train_examples or MULTITASK_EXAMPLES, MULTITASK_EXAMPLES)
    # its own before/after answer NLL (the training record) on about one task's worth of examples in all
    n_metric = max(1, base_config.n_metric_eval // len(ctx.seen)) if ctx.seen else base_config.n_metric_eval
    config = replace(config, train_examples=per_task * len(ctx.seen), n_metric_eval=n_metric)
    if base_config.val_every:  # early stopping on a validation set of about one task's size from all tasks
        n_val = max(1, base_config.n_val // len(ctx.seen)) if len(ctx.seen) > 1 else base_config.n_val
        config = replace(config, n_val=n_val)
    seen = sorted(ctx.seen, key=lambda t: t.name)
    key = _tasks_key(seen, ctx.base, config)
    folder, record = ctx.config.multitask_dir, ctx.config.multitask_dir / TRAIN_RECORD
    info = {"tasks": [t.name for t in seen], "steps": steps, "key": key, "path": str(folder)}
    if record.is_file() and json.loads(record.read_text()).get("key") == key:
        return LoraAdapter.load(folder, ctx.base.name), {**info, "cached": True}
    log.info("training the multi-task LoRA on %d seen tasks for %d steps", len(seen), steps)
    adapter, metrics = train_lora(ctx.base, seen, config, examples_per_task=per_task)
    record.unlink(missing_ok=True)  # a crash while saving must not leave an old record over new weights
    adapter.save(folder)
    body = {"key": key, "base_model": ctx.base.name, "tasks": info["tasks"], "metrics": metrics}
    atomic_write_bytes(record, (json.dumps(body, indent=2) + "\n").encode())
    return adapter, {**info, "cached": False}


MULTITASK_EXAMPLES = 16
"""Training examples per task in the multi-task LoRA's pool (at most; an expert draws up to 300): every
task is represented, and the pool's cached lower-layer states (~2.3 KB per token) stay in memory. Measured
on one core: the lower layers' states of 200 library tasks x 64 examples take about 100 minutes, x 16 about
25; the corpus eval's 1,000 steps of 8 make 2.5 passes over 200 x 16."""


def library_budget(ctx: MethodContext, config: ExpertTrainConfig) -> int:
    """The multi-task LoRA's steps: as many as the library's seen experts took together (each expert's
    recorded `steps_run` where early stopping ended it sooner; `config.steps` otherwise)."""
    ran = {e.name: e.metrics.get("steps_run") for e in ctx.library.list()} if ctx.library is not None else {}
    return sum(ran.get(t.name) or config.steps for t in ctx.seen)


@register("multitask")
def multitask_method(ctx: MethodContext) -> Method:
    trained: list[tuple[LoraAdapter, dict[str, Any]]] = []  # trained (or loaded) on first use, then reused

    def method(task: Task) -> Intervention:
        if not trained:
            trained.append(multitask_adapter(ctx))
        adapter, info = trained[0]
        return Intervention(mixture=[(adapter, 1.0)], info=info)

    return method


@register("oracle")
def oracle_method(ctx: MethodContext) -> Method:
    """A LoRA trained on the task itself with the library experts' config: the upper bound.

    A task the library holds an expert for (a seen task) has that expert as its oracle, unless an explicit
    `train` config asks for another run. Other tasks are trained once into the oracle library and reused
    while the task, base model and config are unchanged (build_library's config hash).
    """

    def method(task: Task) -> Intervention:
        config, eid = ctx.train_config(), expert_id(task)
        lib, source = ctx.library, "library"
        own = lib is not None and eid in lib
        if not own or (ctx.config.train is not None and not _trained_as(lib, task, ctx.base, config)):
            lib = ctx.oracle_library()
            source = "oracle_library" if _trained_as(lib, task, ctx.base, config) else "trained"
            build_library(lib, [task], ctx.base, config)  # skips an expert already built identically
        expert = lib.get(eid)  # type: ignore[union-attr]
        return Intervention(mixture=[(ctx.adapter(expert), 1.0)], info={"experts": [eid], "source": source})

    return method


def _trained_as(lib: ExpertLibrary, task: Task, base: BaseModel, config: ExpertTrainConfig) -> bool:
    """Whether `lib` holds the task's expert trained on exactly this task, base model and config."""
    eid = expert_id(task)
    return eid in lib and lib.get(eid).metrics.get("config_hash") == config_hash(task, base, config)


# ---- minted by the generator ---------------------------------------------------------------------------------


def short_description(task: Task) -> str:
    """What a user would type: the shortest of the task's one-sentence phrasings (for natural-instructions
    tasks the SNI "Prompt" line), else the description's first sentence."""
    from loramint.gen.phrasings import sentences

    short = [d for d in task.descriptions if len(sentences(d)) == 1 and len(d) < len(task.description)]
    return min(short, key=len) if short else sentences(task.description)[0]


def shots(task: Task, n: int) -> list:
    """The first n training examples (never evaluation ones): what a user could show."""
    return eval_split(task)[0][:n]


def _minted(adapter: LoraAdapter, **info: Any) -> Intervention:
    return Intervention(mixture=[(adapter, 1.0)], info=info)


@register("reconstructed")  # on seen tasks (their experts are in the generator's bank): what it reproduces
@register("minted")
def minted_method(ctx: MethodContext) -> Method:
    return lambda task: _minted(ctx.minter().mint(task.description), description="full")


@register("minted-user")
def minted_user_method(ctx: MethodContext) -> Method:
    """Minted from what a user would type: the task's phrasing in `user_phrasings`, else its shortest
    one-sentence phrasing."""
    phrasings = None
    if ctx.config.user_phrasings is not None:
        phrasings = json.loads(Path(ctx.config.user_phrasings).read_text(encoding="utf-8"))

    def method(task: Task) -> Intervention:
        if phrasings is None:
            text = short_description(task)
        elif task.name in phrasings:
            text = phrasings[task.name]
        else:
            raise ValueError(f"{ctx.config.user_phrasings} has no user phrasing for task {task.name!r}")
        return _minted(ctx.minter().mint(text), description=text)

    return method


UNRELATED = (
    "Write a haiku about the sea.",
    "Translate the sentence into French.",
    "Summarise the news article in one sentence.",
    "Answer like a pirate.",
    "Classify the sentiment of a movie review as positive or negative.",
    "Write a limerick about a cat.",
)
"""Descriptions of tasks unlike any in the corpus: `minted-unrelated` mints from one of them (by hash)."""


@register("minted-unrelated")
def minted_unrelated_method(ctx: MethodContext) -> Method:
    """Control: the adapter minted for an unrelated task. What it recovers is not about the task."""

    def method(task: Task) -> Intervention:
        text = UNRELATED[int(hashlib.sha256(task.name.encode()).hexdigest(), 16) % len(UNRELATED)]
        return _minted(ctx.minter().mint(text), description=text)

    return method


def shuffled_words(text: str, seed: str) -> str:
    """`text`'s words in a seeded random order; a text written without spaces (Chinese, Japanese) has its
    characters shuffled instead, since there one whitespace-separated word would leave it unchanged."""
    original = text.split()
    sep = " " if len(original) > 1 else ""
    original = original if sep else list(text.strip())
    words, rng = list(original), random.Random(seed)
    for _ in range(10):  # a short text can come back in its own order
        rng.shuffle(words)
        if words != original or len(set(words)) < 2:
            break
    return sep.join(words)


@register("minted-shuffled")
def minted_shuffled_method(ctx: MethodContext) -> Method:
    """Control: the task's own description with its words in a seeded random order (same words, no sense)."""

    def method(task: Task) -> Intervention:
        text = shuffled_words(task.description, f"shuffle:{task.name}")
        return _minted(ctx.minter().mint(text), description=text)

    return method


@register("minted+examples")
def minted_examples_method(ctx: MethodContext) -> Method:
    from loramint.training.generator import example_text

    def method(task: Task) -> Intervention:
        texts = [example_text(task, ex) for ex in shots(task, ctx.config.n_shots)]
        return _minted(ctx.minter().mint(task.description, examples=texts), n_shots=len(texts))

    return method


@register("minted+topk")
def minted_topk_method(ctx: MethodContext) -> Method:
    """Half the minted adapter, half the top-k mixture (its weights halved): does retrieval fix what the
    generator misses (a near-duplicate sibling) and vice versa? Zero-shot, description only, like both."""
    topk = topk_method(ctx)

    def method(task: Task) -> Intervention:
        retrieved = topk(task)
        minted = ctx.minter().mint(task.description)
        mixture = [(minted, 0.5)] + [(a, 0.5 * w) for a, w in retrieved.mixture]
        return Intervention(mixture=mixture, info={**retrieved.info, "minted_weight": 0.5})

    return method


# ---- routed per token by the runtime -------------------------------------------------------------------------


@register("arrow")
def arrow_method(ctx: MethodContext) -> Method:
    """Every seen expert resident; each token of each layer routed to its top-k by Arrow (no training)."""

    def method(task: Task) -> Intervention:
        routing = ctx.token_routing("arrow")
        return Intervention(routing=routing, info={"experts": len(routing.experts), "top_k": routing.top_k})

    return method


@register("route-token")
def route_token_method(ctx: MethodContext) -> Method:
    """Every seen expert resident; tokens routed by the learned router trained on the seen tasks."""

    def method(task: Task) -> Intervention:
        routing = ctx.token_routing("learned")
        return Intervention(
            routing=routing,
            info={"experts": len(routing.router.expert_ids), "router": str(ctx.config.router)},
        )

    return method
