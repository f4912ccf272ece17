"""Mint latency and throughput: description -> PEFT files on disk, for a trained generator checkpoint.

    python benchmarks/bench_mint.py                                   # the shipped generator, 200 mints
    python benchmarks/bench_mint.py --generator path/to/ckpt --n 50   # any checkpoint

One mint = embed the description (sentence-transformers, its text cache OFF: every description is new) +
retrieve the K nearest experts from the bank + decode the whole adapter in one pass + de-normalise + write
adapter_model.safetensors and adapter_config.json (atomic, fsynced). Each stage is timed separately; the
p50/p99 of the total is the headline (target p50 <= 50 ms on CPU for SmolLM2 rank 8). Batched minting
(`Minter.mint_many`, one decode for B descriptions, files written for each) gives throughput. Runs on the
GPU too when one is present (`--device cuda`). Prints a Markdown table, writes results/bench_mint.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_result  # noqa: E402

from loramint.encoders import Encoder  # noqa: E402
from loramint.encoders.text import EncoderConfig  # noqa: E402
from loramint.gen.minter import Minter  # noqa: E402
from loramint.paths import DEFAULT_GENERATOR  # noqa: E402

TARGET_P50_MS = 50.0
SUBJECTS = ["recipes", "contracts", "poems", "tweets", "emails", "reviews", "proofs", "jokes", "news", "code"]
ACTIONS = ["Summarise", "Classify", "Translate", "Answer questions about", "Rewrite", "Find errors in"]


def descriptions(n: int, seed: int) -> list[str]:
    """n distinct user-style descriptions (no two alike, so no cache helps)."""
    rng = np.random.default_rng(seed)
    return [
        f"{ACTIONS[rng.integers(len(ACTIONS))]} {SUBJECTS[rng.integers(len(SUBJECTS))]} "
        f"written by people in group {i}, keeping the answer short."
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_single(minter: Minter, texts: list[str], out: Path, device: str) -> dict[str, list[float]]:
    """Per-stage milliseconds of one mint at a time."""
    stages: dict[str, list[float]] = {
        k: [] for k in ("embed", "retrieve", "decode", "adapter", "write", "total")
    }
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        cond = minter.condition([text])
        sync(device)
        t1 = time.perf_counter()
        retrieved = minter.retrieve(cond)[0]  # a residual generator's K experts (else none)
        sync(device)
        t2 = time.perf_counter()
        tokens = minter.decode(cond)  # the semantic prior + one decoder pass (each member's, for an ensemble)
        sync(device)
        t3 = time.perf_counter()
        adapter = minter.adapter(minter.row(tokens, 0), retrieved)
        t4 = time.perf_counter()
        adapter.save(out / f"a{i % 4}")
        t5 = time.perf_counter()
        for key, ms in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True):
            stages[key].append(ms * 1000)
    return stages


def bench_batched(minter: Minter, texts: list[str], batch: int, out: Path, device: str, rounds: int) -> dict:
    """Adapters per second with `mint_many` over `batch` descriptions, each written to disk."""
    times = []
    for r in range(rounds):
        chunk = texts[r * batch : (r + 1) * batch]
        t0 = time.perf_counter()
        adapters = minter.mint_many(chunk)
        sync(device)
        for j, adapter in enumerate(adapters):
            adapter.save(out / f"b{j}")
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {
        "batch": batch,
        "ms_per_batch_p50": round(per_batch * 1000, 2),
        "adapters_per_s": round(batch / per_batch, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generator", type=Path, default=Path(DEFAULT_GENERATOR))
    parser.add_argument("--n", type=int, default=200, help="timed single mints")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_mint", help="results/<out>.json")
    parser.add_argument(
        "--encoder", default=None, help="encoder name or folder (default: the one the checkpoint records)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    probe = Minter.from_pretrained(
        args.generator, device=args.device, encoder=_uncached(args.generator, args.device, args.encoder)
    )
    texts = descriptions(args.warmup + args.n + max(args.batches) * args.rounds * 2, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bench_single(probe, texts[: args.warmup], out, args.device)
        stages = bench_single(probe, texts[args.warmup : args.warmup + args.n], out, args.device)
        rest = texts[args.warmup + args.n :]
        batched = [bench_batched(probe, rest, b, out, args.device, args.rounds) for b in args.batches]
    rows = [
        {
            "stage": k,
            "p50_ms": round(percentile(v, 50), 2),
            "p99_ms": round(percentile(v, 99), 2),
            "mean_ms": round(statistics.fmean(v), 2),
        }
        for k, v in stages.items()
    ]
    total = stages["total"]
    layout = probe.layout
    result = {
        "generator": str(args.generator),
        "base_model": layout.base_model,
        "rank": layout.rank,  # the library's experts' rank
        "minted_rank": probe.max_rank,  # a residual generator mints (K + 1) x rank, stacked exactly
        "modules": f"{list(layout.module_types)} x {len(layout.layers)} layers",
        "bank_size": len(probe.bank),
        "members": len(getattr(probe, "members", [probe])),
        "decode_dtype": getattr(probe, "decode_dtype", "float32"),
        "generator_params": sum(
            p.numel() for m in getattr(probe, "members", [probe]) for p in m.model.parameters()
        ),
        "device": args.device,
        "encoder": probe.encoder.name,
        "threads": torch.get_num_threads(),
        "n": args.n,
        "p50_ms": round(percentile(total, 50), 2),
        "p99_ms": round(percentile(total, 99), 2),
        "target_p50_ms": TARGET_P50_MS,
        "meets_target": percentile(total, 50) <= TARGET_P50_MS,
        "stages": rows,
        "batched": batched,
        "machine": machine(),
    }
    print(markdown_table(rows))
    print()
    print(markdown_table(batched))
    print(
        f"\np50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms (target p50 <= {TARGET_P50_MS} ms) on {args.device}"
    )
    print(f"wrote {write_result(args.out, result)}")


def _uncached(generator: Path, device: str, name: str | None = None) -> Encoder:
    """The checkpoint's encoder (or `name`) with its text cache off, so each timed mint embeds its
    description."""
    import json

    name = name or json.loads((generator / "generator.json").read_text())["encoder"]
    return Encoder(EncoderConfig(name=name, cache_size=0, device=device))


if __name__ == "__main__":
    main()
