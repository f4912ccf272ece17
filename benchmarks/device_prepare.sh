#!/usr/bin/env bash
# Prepare .dev/ (git-ignored) for a GPU run through the workplace's `device` tool (README "GPU"):
# the wheels that machine lacks (faiss-cpu, platformdirs; it reaches no registry) and shadows of the
# default base model, encoder and generator (benchmarks/shadow.py: same files and tensor shapes, random
# values; the real weights are larger than the 64 MiB a call may carry). Then run benchmarks/device_run.sh
# there with `.dev` carried. Needs `make setup && .venv/bin/loramint setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev && mkdir -p .dev/whl .dev/shadow
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .dev/whl \
  "faiss-cpu==$($PY -c 'import faiss; print(faiss.__version__)')" \
  "platformdirs==$($PY -c 'import platformdirs; print(platformdirs.__version__)')"
$PY benchmarks/shadow.py pack "$($PY -c 'from loramint.models import prepare; print(prepare("smollm2-135m"))')" .dev/shadow/smollm2
$PY benchmarks/shadow.py pack "$($PY -c 'from loramint.encoders.text import resolve_encoder as r; print(r("all-MiniLM-L6-v2"))')" .dev/shadow/minilm
$PY benchmarks/shadow.py pack data/generator/ni-family .dev/shadow/generator
cp benchmarks/device_run.sh .dev/
du -sh .dev
