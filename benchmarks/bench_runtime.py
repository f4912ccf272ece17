"""Runtime throughput on the real base model: one batch of 8 requests, greedy decoding with a KV cache.

    python benchmarks/bench_runtime.py              # SmolLM2-135M, 8 x 64 prompt tokens, 32 new tokens each
    python benchmarks/bench_runtime.py --quick      # fewer repeats

Configurations (same prompts, same manual greedy loop, tokens/s = generated tokens / wall time):
- `base`: the base model alone (runtime attached, no plan);
- `one_adapter`: every row the same rank-8 q/v adapter;
- `mixed8`: 8 rows, 8 different adapters, one batch (the BGMV idea);
- `route_token32`: 32 resident experts, each token of each layer routed to its top 2 by Arrow, one pass;
- `peft_switching`: stock PEFT with the 8 adapters loaded, one request at a time with `set_adapter`;
- `xlora_two_pass`: X-LoRA's scheme, two forward passes per token (a plain pass, then the routed one);
- `route_token1000`: 1,000 rank-8 experts resident, top-2 per token (memory and that it routes at all);
- `*_gathered`: the same plans forced onto the gathered path (runtime/lora.py) instead of the dense one.
Adapters are random rank-8 q/v LoRAs of the right shapes (throughput does not depend on their values).
Prints a Markdown table, writes results/bench_runtime.json with the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_result  # noqa: E402

from loramint.adapters import LoraAdapter  # noqa: E402
from loramint.models import load_base_model  # noqa: E402
from loramint.runtime.lora import Plan, arrow_router  # noqa: E402
from loramint.runtime.runtime import Runtime  # noqa: E402

TARGETS = ("q_proj", "v_proj")


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """[batch, length] token ids of distinct texts (equal lengths: no padding in the manual loop)."""
    rows = []
    for i in range(batch):
        text = f"Request {i}: " + " ".join(f"word{(i * 7 + j) % 101}" for j in range(4 * length))
        rows.append(tokenizer(text, add_special_tokens=False).input_ids[:length])
    return torch.tensor(rows)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, before=None) -> float:
    """Seconds to decode `new_tokens` tokens per row (prefill included); `before(step)` runs first each step."""
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(new_tokens - 1):
        if before is not None:
            before(step, nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    if nxt.is_cuda:  # the GPU runs ahead of Python: stop the clock when its work is done
        torch.cuda.synchronize()
    return time.perf_counter() - started


def timed(fn, repeats: int, name: str = "") -> float:
    """Median seconds of `repeats` calls after a warm-up; printed as it goes (a killed run still tells)."""
    started = time.perf_counter()
    fn()  # warm-up
    median = statistics.median(fn() for _ in range(repeats))
    print(f"{name}: {median:.3f} s per run ({time.perf_counter() - started:.1f} s in all)", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--many", type=int, default=1000, help="experts resident in the memory test")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", default="bench_runtime", help="results/<out>.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    base = load_base_model(args.base, device=device, dtype=dtype)
    peft_base = copy.deepcopy(base.model)
    adapters = [LoraAdapter.random(base.name, r=8, target_modules=TARGETS, seed=i) for i in range(32)]
    rt = Runtime(base, capacity=32, max_rank=8, target_modules=TARGETS, device=device)
    for i, a in enumerate(adapters):
        rt.add(f"e{i}", a)
    ids = prompts(base.tokenizer, args.batch, args.prompt_tokens).to(device)
    generated = args.batch * args.new_tokens
    model = base.model

    def with_plan(plan):
        def run() -> float:
            rt.holder.plan = plan
            try:
                return greedy(model, ids, args.new_tokens)
            finally:
                rt.holder.plan = None

        return run

    B = args.batch
    slots32 = rt.stack.slots([f"e{i}" for i in range(32)])
    plans = {
        "base": None,
        "one_adapter": Plan(slots32[:1], gates=torch.ones(B, 1, 1, device=device)),
        "mixed8": Plan(slots32[:8], gates=torch.eye(8, device=device)[torch.arange(B) % 8][:, None, :]),
        "route_token32": Plan(slots32, router=arrow_router(rt.stack, slots32, top_k=2)),
        # the same decisions on the gathered path (each row / token fetches its own experts' factors)
        "mixed8_gathered": Plan(
            slots32[:8], gates=torch.eye(8, device=device)[torch.arange(B) % 8][:, None, :], dense_max=0
        ),
        "route_token32_gathered": Plan(slots32, router=arrow_router(rt.stack, slots32, top_k=2), dense_max=0),
    }
    seconds = {name: timed(with_plan(plan), repeats, name) for name, plan in plans.items()}

    # X-LoRA-style: a plain pass over the same token with its own cache, then the routed pass
    def two_pass() -> float:
        plain_cache = {}

        def first(step, token):
            rt.holder.plan = None
            out = model(input_ids=token, past_key_values=plain_cache.get("c"), use_cache=True)
            plain_cache["c"] = out.past_key_values
            rt.holder.plan = plans["route_token32"]

        rt.holder.plan = plans["route_token32"]
        try:
            return greedy(model, ids, args.new_tokens, before=first)
        finally:
            rt.holder.plan = None

    seconds["xlora_two_pass"] = timed(two_pass, repeats, "xlora_two_pass")

    # stock PEFT, switching adapters per request
    from peft import PeftModel

    folders = []
    import tempfile

    tmp = tempfile.mkdtemp()
    for i in range(8):
        folders.append(adapters[i].save(Path(tmp) / f"a{i}"))
    peft_model = PeftModel.from_pretrained(peft_base, str(folders[0]), adapter_name="a0")
    for i in range(1, 8):
        peft_model.load_adapter(str(folders[i]), adapter_name=f"a{i}")

    def switching() -> float:
        total = 0.0
        for row in range(B):
            peft_model.set_adapter(f"a{row % 8}")
            total += greedy(peft_model, ids[row : row + 1], args.new_tokens)
        return total

    seconds["peft_switching"] = timed(switching, repeats, "peft_switching")

    # many experts resident
    many = Runtime(
        load_base_model(args.base, device=device, dtype=dtype),
        capacity=args.many,
        max_rank=8,
        target_modules=TARGETS,
        device=device,
    )
    started = time.perf_counter()
    for i in range(args.many):
        many.stack.add(f"m{i}", LoraAdapter.random(base.name, r=8, target_modules=TARGETS, seed=10_000 + i))
    load_s = time.perf_counter() - started
    print(f"{args.many} experts loaded in {load_s:.1f} s", flush=True)
    slots_many = many.stack.slots([f"m{i}" for i in range(args.many)])
    many_plan = Plan(slots_many, router=arrow_router(many.stack, slots_many, top_k=2))
    many.holder.plan = many_plan
    try:
        started = time.perf_counter()
        many.base.model(input_ids=ids[:1, :2])  # computes the 1,000 experts' Arrow prototypes once
        prototypes_s = time.perf_counter() - started
        seconds["route_token1000"] = timed(
            lambda: greedy(many.base.model, ids, args.new_tokens), repeats, "route_token1000"
        )
    finally:
        many.holder.plan = None

    tps = {k: round(generated / v, 1) for k, v in seconds.items()}
    rows = [{"config": k, "tokens_per_s": v, "vs_base": round(v / tps["base"], 3)} for k, v in tps.items()]
    result = {
        "base_model": base.name,
        "device": device,
        "dtype": args.dtype,
        "batch": B,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "adapter": "rank 8, q_proj + v_proj, all 30 layers",
        "tokens_per_s": tps,
        "mixed8_vs_base": round(tps["mixed8"] / tps["base"], 3),
        "mixed8_vs_peft_switching": round(tps["mixed8"] / tps["peft_switching"], 3),
        "route_token32_vs_base": round(tps["route_token32"] / tps["base"], 3),
        "resident_bytes_per_expert": rt.stack.nbytes_per_expert(),
        "many_experts": {
            "n": args.many,
            "resident_bytes": many.stack.nbytes_per_expert() * args.many,
            "load_s": round(load_s, 1),
            "arrow_prototypes_s": round(prototypes_s, 1),
            "tokens_per_s": tps["route_token1000"],
        },
        "targets": {"mixed8_vs_base": 0.85, "mixed8_vs_peft_switching": 3.0, "route_token32_vs_base": 0.7},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "machine": machine(),
    }
    print(markdown_table(rows))
    print(
        f"\nresident bytes per expert: {result['resident_bytes_per_expert']:,}; {args.many} experts: {result['many_experts']}"
    )
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
