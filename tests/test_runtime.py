"""runtime/stack.py + runtime/lora.py: stacked resident experts and the routed adapter path are exact — one
adapter equals PEFT's LoRA, mixtures equal the weighted sum of deltas, a mixed batch equals each row run alone,
rank padding adds nothing, Arrow routes by each expert's top singular direction — and residency is LRU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramint.adapters import LoraAdapter, apply_lora, apply_mixture
from loramint.errors import AdapterError, NotFoundError
from loramint.index import ExpertLibrary
from loramint.runtime.lora import (
    Plan,
    RoutedLinear,
    arrow_prototypes,
    arrow_router,
    attach,
    dense_gates,
    detach,
)
from loramint.runtime.stack import ExpertStack, linear_shapes

TARGETS = ("q_proj", "v_proj", "down_proj")
ATOL = 2e-5


def shapes_of(model, targets=TARGETS) -> dict[str, tuple[int, int]]:
    return linear_shapes(model, targets)


def adapter(seed: int, r: int = 4) -> LoraAdapter:
    return LoraAdapter.random("tiny-llama", r=r, target_modules=TARGETS, seed=seed)


@pytest.fixture(scope="module")
def model(tiny):
    """A copy of tiny-llama the runtime attaches to; `tiny.model` stays plain for the reference outputs."""
    import copy

    return copy.deepcopy(tiny.model)


@pytest.fixture
def routed(model):
    """The tiny model with a 6-slot stack attached (detached again after the test)."""
    stack = ExpertStack(shapes_of(model), capacity=6, max_rank=8)
    holder = attach(model, stack)
    yield stack, holder
    detach(model)


def ids(batch: int = 3, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def test_no_plan_is_the_base_model_and_detach_restores_it(model):
    x = ids()
    before = logits(model, x)
    stack = ExpertStack(shapes_of(model), capacity=2)
    attach(model, stack)
    stack.add("a", adapter(0))
    assert torch.equal(logits(model, x), before)
    with pytest.raises(ValueError, match="already routed"):
        attach(model, stack)
    detach(model)
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())
    assert torch.equal(logits(model, x), before)


def test_one_adapter_equals_lora_and_a_mixture_equals_the_weighted_sum(tiny, model, routed):
    stack, holder = routed
    a, b = adapter(1), adapter(2, r=2)  # different ranks: b is zero-padded to 8
    slots = torch.tensor([stack.add("a", a), stack.add("b", b)])
    x = ids()
    holder.plan = Plan(slots[:1], gates=torch.ones(3, 1, 1))
    ours = logits(model, x)
    holder.plan = None
    with apply_lora(tiny.model, a):
        expected = logits(tiny.model, x)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)
    holder.plan = Plan(slots, gates=torch.tensor([0.3, 0.7]).expand(3, 1, 2))
    ours = logits(model, x)
    holder.plan = None
    with apply_mixture(tiny.model, [(a, 0.3), (b, 0.7)]):
        expected = logits(tiny.model, x)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    rows=st.lists(st.lists(st.floats(0.0, 1.5), min_size=4, max_size=4), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    dense_max=st.sampled_from([0, 64]),
)
def test_mixed_batch_rows_equal_each_row_alone(tiny, model, ranks, rows, seed, dense_max):
    """Property: any batch whose rows carry different adapters/mixtures (random ranks) equals running each
    row by itself with its mixture merged into the weights, on the dense path and on the gathered one."""
    stack = ExpertStack(shapes_of(model), capacity=4, max_rank=8)
    holder = attach(model, stack)
    try:
        experts = [adapter(seed + i, r) for i, r in enumerate(ranks)]
        slots = torch.tensor([stack.add(f"e{i}", e) for i, e in enumerate(experts)])
        gates = torch.tensor(rows)[:, : len(experts)]  # [B, u]
        x = ids(batch=len(rows), seed=seed)
        holder.plan = Plan(slots, gates=gates[:, None, :], dense_max=dense_max)
        batched = logits(model, x)
        holder.plan = None
        for row in range(len(rows)):
            with apply_mixture(tiny.model, [(e, float(w)) for e, w in zip(experts, gates[row], strict=True)]):
                alone = logits(tiny.model, x[row : row + 1])
            torch.testing.assert_close(batched[row : row + 1], alone, atol=5e-5, rtol=1e-4)
    finally:
        detach(model)


@pytest.mark.parametrize("dense_max", [0, 64])
def test_per_token_routing_equals_the_explicit_per_token_sum(routed, dense_max):
    """Per-token top-2 routing equals sum_e g_te * ΔW_e x_t, dense and gathered (each token its own experts)."""
    stack, _ = routed
    experts = [adapter(10 + i, r=1 + 2 * i) for i in range(4)]
    slots = torch.tensor([stack.add(f"e{i}", e) for i, e in enumerate(experts)])
    module = next(iter(stack.shapes))
    layer = torch.nn.Linear(*reversed(stack.shapes[module]))
    holder = type("H", (), {"plan": None})()
    routed_layer = RoutedLinear(layer, module, stack, holder)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    router = arrow_router(stack, slots, top_k=2)
    holder.plan = Plan(slots, router=router, dense_max=dense_max)
    with torch.no_grad():
        out = routed_layer(x)
        gates = dense_gates(router(module, x), len(slots))  # [B, T, u]
        deltas = torch.stack([e.delta(module) for e in experts])  # [u, out, in]
        expected = layer(x) + torch.einsum("btu,uoi,bti->bto", gates, deltas, x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert torch.all((gates > 0).sum(-1) == 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5))
    assert len(set(router(module, x)[1].flatten().tolist())) > 2  # tokens really go to different experts


def test_plan_refuses_gates_of_the_wrong_shape(routed):
    stack, _ = routed
    slots = torch.tensor([stack.add("a", adapter(1)), stack.add("b", adapter(2))])
    with pytest.raises(ValueError, match=r"gates must be \[B, 1, 2\]"):
        Plan(slots, gates=torch.ones(3, 2))
    with pytest.raises(ValueError, match="either fixed gates or a per-token router"):
        Plan(slots)


def test_arrow_prototype_is_the_top_right_singular_vector(routed):
    stack, _ = routed
    experts = [adapter(20 + i, r=3) for i in range(3)]
    slots = torch.tensor([stack.add(f"e{i}", e) for i, e in enumerate(experts)])
    module = next(iter(stack.shapes))
    protos = arrow_prototypes(stack, module, slots)
    for e, proto in zip(experts, protos, strict=True):
        _, _, vh = torch.linalg.svd(e.delta(module).double())
        assert abs(float(vh[0] @ proto.double())) == pytest.approx(1.0, abs=1e-5)


def test_lru_residency_hits_misses_and_loading(model):
    stack = ExpertStack(shapes_of(model), capacity=2, max_rank=4)
    loads = []

    def load(eid: str) -> LoraAdapter:
        loads.append(eid)
        return adapter(int(eid[1:]))

    stack.slots(["e1", "e2"], load)
    assert (stack.misses, stack.hits, loads) == (2, 0, ["e1", "e2"])
    stack.slots(["e1"], load)  # e1 becomes the most recently used
    stack.slots(["e3"], load)  # evicts e2
    assert set(stack.ids) == {"e1", "e3"} and stack.evictions == 1 and stack.hits == 1
    with pytest.raises(NotFoundError, match="not resident"):
        stack.slots(["e2"])
    with pytest.raises(ValueError, match="exceed the resident capacity"):
        stack.slots(["e1", "e2", "e3"], load)
    # a reloaded expert is exactly what was loaded
    slot = int(stack.slots(["e2"], load)[0])
    module = next(iter(stack.shapes))
    expected = adapter(2)
    torch.testing.assert_close(
        stack.B[module][slot, :, :4] @ stack.A[module][slot, :4], expected.delta(module)
    )
    stack.remove("e2")
    assert "e2" not in stack and len(stack) == 1
    assert stack.nbytes_per_expert() == sum(4 * 4 * (o + i) for o, i in stack.shapes.values())


def test_adapters_that_do_not_fit_are_refused(model):
    stack = ExpertStack(shapes_of(model, ("q_proj",)), capacity=2, max_rank=2)
    with pytest.raises(AdapterError, match="does not serve"):
        stack.add("x", adapter(0))  # targets v_proj and down_proj too
    with pytest.raises(AdapterError, match="exceeds the runtime's max_rank"):
        stack.add("x", LoraAdapter.random("tiny-llama", r=4, target_modules=("q_proj",), seed=0))
    assert len(stack) == 0


# ---- the Runtime API ------------------------------------------------------------------------------------


@pytest.fixture
def runtime(tiny, model, tmp_path):
    from loramint.runtime.runtime import Runtime

    with ExpertLibrary.open(tmp_path / "lib") as library:
        library.add(adapter(31), id="adder", name="adder", description="Add the two numbers.")
        library.add(adapter(32), id="poet", name="poet", description="Write a short poem about the sea.")
        base = type(tiny)(tiny.name, tiny.hf_id, model, tiny.tokenizer)
        rt = Runtime(base, library=library, capacity=4, max_rank=8, target_modules=TARGETS, top_k=2)
        yield rt
        detach(model)


def test_runtime_rows_with_different_routes_equal_each_row_alone(tiny, runtime):
    x = ids(batch=4, seed=5)
    local = adapter(33)
    runtime.add("minted", local)
    routes = [None, "adder", {"adder": 0.25, "poet": 0.75}, "minted"]
    batched = runtime.logits(x, routes)
    mixtures = [
        [],
        [(runtime._load("adder"), 1.0)],
        [(runtime._load("adder"), 0.25), (runtime._load("poet"), 0.75)],
        [(local, 1.0)],
    ]
    for row, mixture in enumerate(mixtures):
        with apply_mixture(tiny.model, mixture):
            alone = logits(tiny.model, x[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, atol=5e-5, rtol=1e-4)
    # adder and poet came from the library (misses), the added one was resident (a hit)
    assert (runtime.stack.misses, runtime.stack.hits) == (2, 1) and runtime.holder.plan is None


def test_runtime_answer_nll_of_mixed_rows_equals_each_example_scored_alone(tiny, runtime):
    """What the service's check on solved examples computes: each encoded example's answer loss under its
    own route in one pass, equal to scoring it alone with the adapter applied."""
    from loramint.fallback import solved_task
    from loramint.training.data import answer_nll_per_example, encode_example

    task = solved_task("add", [("3 plus 4", "7"), ("10 plus 1", "eleven, I think"), ("1 plus 1", "2")])
    items = [encode_example(tiny.tokenizer, task, ex, 64) for ex in task.examples]
    routes = [None, "adder", {"adder": 0.5, "poet": 0.5}]
    got = runtime.answer_nll(items + items, routes + ["poet", None, "adder"])
    for row, route in enumerate(routes + ["poet", None, "adder"]):
        route = {} if route is None else {route: 1.0} if isinstance(route, str) else route
        mixture = [(runtime._load(e), w) for e, w in route.items()]
        with apply_mixture(tiny.model, mixture):
            (alone,) = answer_nll_per_example(
                tiny.model, tiny.tokenizer, task, [task.examples[row % 3]], max_length=64
            )
        assert got[row] == pytest.approx(alone, abs=1e-4)
    with pytest.raises(ValueError, match="3 examples but 2 routes"):
        runtime.answer_nll(items, routes[:2])


def test_runtime_auto_routes_by_retrieval_and_generates_a_mixed_batch(runtime):
    route = runtime.resolve("auto", "What is 2 plus 3? Add them.")
    assert list(route)[0] == "adder" and sum(route.values()) == pytest.approx(1.0)
    texts = runtime.generate(["add 2 and 3", "a poem", "hello"], ["auto", "poet", None], max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    alone = runtime.generate(["a poem"], "poet", max_new_tokens=4)
    assert alone[0] == texts[1]
    arrow = runtime.generate(["hello"], None, max_new_tokens=4, routing="arrow")
    assert len(arrow) == 1
    with pytest.raises(NotFoundError, match="no expert 'ghost'"):
        runtime.generate(["hi"], "ghost", max_new_tokens=2)
    with pytest.raises(ValueError, match="2 adapter routes"):
        runtime.generate(["a", "b", "c"], ["poet", None], max_new_tokens=2)


def test_stream_yields_each_rows_completion_piece_by_piece(runtime):
    """Streaming a mixed batch: the pieces of each row join to what generate() returns for it, rows
    interleave step by step, and an error in the worker reaches the consumer."""
    prompts = ["Add 2 and 3.", "A poem about the sea, please", "Hello"]
    routes = ["adder", {"adder": 0.5, "poet": 0.5}, None]
    expected = runtime.generate(prompts, routes, max_new_tokens=6)
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    order = []
    for row, piece in runtime.stream(prompts, routes, max_new_tokens=6):
        assert piece
        pieces[row].append(piece)
        order.append(row)
    assert ["".join(p).strip() for p in pieces.values()] == expected
    assert all(len(p) >= 2 for p in pieces.values()) and order != sorted(order)  # interleaved, step by step
    with pytest.raises(NotFoundError, match="no expert 'ghost'"):
        list(runtime.stream(["hi"], "ghost", max_new_tokens=2))
    assert runtime.holder.plan is None


def test_rows_have_their_own_token_limits_usage_and_cancel(runtime):
    """Per-row max_new_tokens: each row equals running it alone with its limit; usage counts its tokens;
    closing the stream early cancels the pass; remove() forgets an added adapter; a loader hook serves ids."""
    from loramint.runtime.runtime import Usage

    prompts, routes, limits = ["Add 2 and 3.", "A poem about the sea"], ["adder", "poet"], [2, 7]
    batched = runtime.generate(prompts, routes, max_new_tokens=limits)
    alone = [
        runtime.generate([p], [r], max_new_tokens=n)[0]
        for p, r, n in zip(prompts, routes, limits, strict=True)
    ]
    assert batched == alone
    usage: list[Usage] = []
    pieces = {0: "", 1: ""}
    for row, piece in runtime.stream(prompts, routes, max_new_tokens=limits, usage=usage):
        pieces[row] += piece
    assert [p.strip() for p in pieces.values()] == batched
    assert all(u.completion_tokens <= n for u, n in zip(usage, limits, strict=True))
    assert all(
        u.finish_reason == ("length" if u.completion_tokens == n else "stop")
        for u, n in zip(usage, limits, strict=True)
    )
    steps = []
    hook = runtime.base.model.register_forward_hook(lambda *_: steps.append(1))
    try:
        stream = runtime.stream(["Hello"] * 2, None, max_new_tokens=200)
        next(stream)
        stream.close()  # cancels the pass after its current step
        with runtime._lock:  # the pass has ended
            assert runtime.holder.plan is None and len(steps) < 100
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="one per prompt"):
        runtime.generate(prompts, routes, max_new_tokens=[3])
    runtime.add("mine", adapter(50))
    runtime.remove("mine")
    assert "mine" not in runtime.stack
    with pytest.raises(NotFoundError, match="mine"):
        runtime.generate(["x"], "mine", max_new_tokens=1)
    runtime.loader = lambda eid: adapter(51) if eid == "mine" else runtime.library.get(eid).load_adapter()
    assert len(runtime.generate(["x"], "mine", max_new_tokens=1)) == 1 and "mine" in runtime.stack


def test_learned_router_trains_balances_and_round_trips(tiny, model, tmp_path):
    """Only the gates learn; the answer loss falls; every expert gets tokens; the saved router routes alike."""
    from loramint.runtime.router import LearnedRouter
    from loramint.runtime.runtime import Runtime
    from loramint.tasks import synthetic_suite
    from loramint.training.router import RouterTrainConfig, train_router

    tasks = synthetic_suite(n_examples=32, seed=0)[:4]
    base = type(tiny)(tiny.name, tiny.hf_id, model, tiny.tokenizer)
    rt = Runtime(base, capacity=4, max_rank=8, target_modules=TARGETS)
    try:
        for i in range(4):
            rt.add(f"e{i}", adapter(40 + i))
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
        router, info = train_router(
            rt,
            tasks,
            [f"e{i}" for i in range(4)],
            RouterTrainConfig(steps=15, lr=5e-2),
            tmp_path / "router",
            progress=False,
        )
        assert info["steps"] == 15

        def routed_nll(r: LearnedRouter) -> float:
            from loramint.training.data import answer_nll, eval_split

            rt.holder.plan = Plan(rt.stack.slots(r.expert_ids), router=r)
            try:
                return sum(answer_nll(model, tiny.tokenizer, t, eval_split(t)[0][:16], 64) for t in tasks)
            finally:
                rt.holder.plan = None

        torch.manual_seed(0)
        untrained = LearnedRouter({m: s[1] for m, s in rt.stack.shapes.items()}, router.expert_ids, 2)
        assert routed_nll(router) < routed_nll(untrained)
        assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())  # base + experts frozen
        module = next(iter(rt.stack.shapes))
        x = torch.randn(2, 6, rt.stack.shapes[module][1])
        gates = dense_gates(router(module, x), len(router.expert_ids))
        torch.testing.assert_close(gates.sum(-1), torch.ones(2, 6))
        assert torch.all((gates > 0).sum(-1) == 2)
        router.record = True
        router(module, torch.randn(64, 8, rt.stack.shapes[module][1]))
        assert 0.9 < float(router.balance_loss()) < 4.0 and router.stats == []
        loaded = LearnedRouter.load(tmp_path / "router")
        torch.testing.assert_close(dense_gates(loaded(module, x), len(router.expert_ids)), gates)
        rt.router = loaded
        assert len(rt.generate(["hello"], max_new_tokens=3, routing="learned")) == 1
    finally:
        detach(model)


def test_per_token_routing_methods_in_the_harness(tiny, tmp_path):
    """arrow and route-token score through a runtime stack attached for the task only; the learned
    router, trained on the seen tasks, lowers their loss below the base model's."""
    from dataclasses import replace

    from conftest import TINY_TRAIN

    from loramint.runtime.runtime import Runtime
    from loramint.tasks import synthetic_suite
    from loramint.training.build import build_library
    from loramint.training.config import RouterTrainConfig
    from loramint.training.evaluate import ScoringConfig, evaluate
    from loramint.training.methods import MethodConfig
    from loramint.training.router import train_router

    torch.set_num_threads(1)
    tasks = synthetic_suite(n_examples=48, seed=0)
    seen = [t for t in tasks if t.name not in ("copy_repeat", "classify_parity")]
    unseen = [t for t in tasks if t not in seen]
    scoring = ScoringConfig(max_length=64, batch_size=16, n_generate=4, max_new_tokens=6, n_bootstrap=100)
    with ExpertLibrary.open(tmp_path / "lib") as library:
        build_library(library, seen, tiny, replace(TINY_TRAIN, steps=20, n_metric_eval=8))
        experts = library.list()
        import copy

        base = type(tiny)(tiny.name, tiny.hf_id, copy.deepcopy(tiny.model), tiny.tokenizer)
        rt = Runtime(base, library=library, capacity=4, max_rank=4, target_modules=TINY_TRAIN.target_modules)
        train_router(
            rt,
            seen,
            [e.id for e in experts],
            RouterTrainConfig(steps=30, lr=5e-2, max_length=64),
            tmp_path / "router",
            progress=False,
        )
        detach(base.model)
        config = MethodConfig(router=tmp_path / "router")
        plain = logits(tiny.model, ids())
        result = evaluate(
            tiny,
            unseen,
            ["base", "arrow", "route-token"],
            library=library,
            seen=seen,
            scoring=scoring,
            method_config=config,
        )
        on_seen = evaluate(
            tiny,
            seen,
            ["base", "route-token"],
            library=library,
            seen=seen,
            scoring=scoring,
            method_config=config,
            split="seen",
        )
    assert torch.equal(logits(tiny.model, ids()), plain), "the harness detaches the runtime after each task"
    assert not any(isinstance(m, RoutedLinear) for m in tiny.model.modules())
    arrow = result["methods"]["arrow"]
    assert (
        set(arrow["per_task"]) == {t.name for t in unseen}
        and arrow["mean"] != result["methods"]["base"]["mean"]
    )
    assert on_seen["methods"]["route-token"]["mean"] < on_seen["methods"]["base"]["mean"]


def test_a_failing_add_gives_its_slot_back(model, monkeypatch):
    """An adapter whose scaling raises (e.g. a bad alpha pattern) must not leak the slot it would have taken:
    after many such failures the stack still holds `capacity` experts."""
    stack = ExpertStack(shapes_of(model), capacity=3, max_rank=8)
    stack.add("kept", adapter(0))
    broken = adapter(1)

    def bad_scaling(module):
        raise AdapterError("alpha_pattern value is not a number")

    monkeypatch.setattr(broken.config, "scaling", bad_scaling)
    for i in range(10):
        with pytest.raises(AdapterError, match="alpha_pattern"):
            stack.add(f"broken-{i}", broken)
    with pytest.raises(AdapterError):
        stack.add("kept", broken)  # replacing a resident id: a failure keeps the resident expert
    assert stack.ids == ["kept"] and stack.evictions == 0
    for i in range(3):
        stack.add(f"good-{i}", adapter(2 + i))
    assert len(stack) == 3 and stack.evictions == 1  # three slots in all, none lost


def test_empty_capacity_costs_no_resident_memory():
    """A stack's slots take memory only once experts fill them: a server at rest with room for many
    experts is not charged for all of them (it used to zero the whole capacity up front: 3.5 GB)."""
    import os

    def rss_mb() -> float:
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    if not os.path.exists(f"/proc/{os.getpid()}/status"):
        pytest.skip("needs /proc to read the resident set size")
    shapes = {f"model.layers.{i}.self_attn.q_proj": (512, 512) for i in range(8)}
    before = rss_mb()
    stack = ExpertStack(shapes, capacity=512, max_rank=64)  # nominal 1 GiB of float32
    nominal = sum(a.nbytes + stack.B[m].nbytes for m, a in stack.A.items()) / 2**20
    assert nominal >= 1000 and rss_mb() - before < 100
