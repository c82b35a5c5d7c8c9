#!/usr/bin/env bash
# One GPU session (the device tool's machine) in one command: the kernels' GPU correctness
# checks, the block search, every timing and a Llama-shaped model's matmul estimate, written
# to OUT_DIR (kernels.json / .txt / .png) as they are measured.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [extra bench_kernels.py options]
#
# That machine has torch, triton, onnx and onnxruntime but no onnx-graphsurgeon and no network:
# carry the wheel in .whl/ (excluded from git), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl onnx-graphsurgeon==0.6.1
# Budgets: ~60 s of checks, --sweep-budget of search plus ~60 s of expansion timings, then
# --budget of timings; the defaults below fit one ~10-minute command.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [bench_kernels.py options]}
shift
cd "$(dirname "$0")/.."
site=$(mktemp -d)
# the package as an install lays it out: passes/ and kernels/ inside spa_compiler/
mkdir -p "$site/spa_compiler"
cp -r spa_compiler/. "$site/spa_compiler/"
cp -r passes "$site/spa_compiler/passes"
cp -r kernels "$site/spa_compiler/kernels"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 models/make_llama.py "$site/llama1.onnx" --layers 1 --dtype float16
python3 benchmarks/bench_kernels.py --out "$out" --model "$site/llama1.onnx" \
    --sweep-budget 150 --budget 200 "$@"
