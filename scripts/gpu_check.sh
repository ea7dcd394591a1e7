#!/usr/bin/env bash
# One prepared run for a lent GPU machine: CUDA tests, then both benchmarks (and the
# scaling benchmark) with NCCL/DDP on one GPU; results land in $OUT (./gpu-results when
# OUT is unset). Hard caps add up to 9.75 minutes, about 6 expected on an H100/H200: run it
# with timeout_s=600 and give the machine back unless a rerun follows at once.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#
# The GPU image has torch but not webdataset/omegaconf/braceexpand. Fetch them once here
# as wheels (ignored by git), carry `.whl`, and this script installs them first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0
# (all three are pure-Python wheels; wandb is not needed: the runs use wandb.mode=disabled)
#
# Files in $OUT (8 at most come back): env.txt, cuda_tests.txt, cuda_tests.xml,
# bench_loader.json, bench_train.json, bench_scaling.json, bench.log, summary.json.
# The last line on stdout is summary.json: one JSON object with the CUDA tests passed,
# failed and skipped (any skip or failure fails the script: a skipped CUDA test proves
# nothing), the sync-debug test's outcome, bf16 vs fp32 on 3D, data-wait, and `ok`.
# Without CUDA it exits non-zero with `"ok": false` and the reasons in `problems`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PIPELINE_CACHE=/tmp/pipeline-cache
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
WORKERS=$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))
# Plumbing check on a CPU box: GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
QUICK="${GPU_CHECK_QUICK:+--quick}"
status=0

{
    date -Is
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c 'import torch, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda,
        "nccl", torch.cuda.nccl.version(), "gpu", torch.cuda.get_device_name(0), "numpy", numpy.__version__)'
    "$PY" -c 'import webdataset, omegaconf; print("webdataset", webdataset.__version__, "omegaconf", omegaconf.__version__)'
    echo "cpus $(nproc), loader workers $WORKERS"
} >"$OUT/env.txt" 2>&1 || status=1

# 1. CUDA tests (autocast, the BCELoss rule, channels_last, a real `pipeline train` on cuda)
#    Counted from the JUnit XML below: pytest exits 0 when every test skips.
timeout 120 "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml" \
    >"$OUT/cuda_tests.txt" 2>&1 || status=1

# 2. Loader: same readers as on CPU, N = the loader workers used for training below.
timeout 140 "$PY" scripts/bench_loader.py --dims both --workers "$WORKERS" --seconds 0.3 \
    --rounds 3 --md /tmp/gpu-check-BENCHMARKS.md $QUICK >"$OUT/bench_loader.out" \
    2>>"$OUT/bench.log" || status=1
tail -n 1 "$OUT/bench_loader.out" >"$OUT/bench_loader.json"
grep -v '^{' "$OUT/bench_loader.out" >>"$OUT/bench.log"; rm -f "$OUT/bench_loader.out"

# 3. Training, under torchrun --nproc_per_node=1 (NCCL + DDP-wrapped models): the real
#    loader with $WORKERS workers vs compute-only, fp32/bf16/fp16, channels_last, compile.
timeout 280 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    scripts/bench_train.py --device "$DEVICE" --ddp --dims both --window 20 --rounds 2 \
    --compile-timeout 150 --override "data.num_workers=$WORKERS" $QUICK \
    >"$OUT/bench_train.json" 2>>"$OUT/bench.log" || status=1

# 4. Data-parallel scaling, if the script exists (one GPU: one process, NCCL).
if [ -f scripts/bench_scaling.py ]; then
    timeout 45 "$PY" scripts/bench_scaling.py --device "$DEVICE" --nproc 1 --steps 60 --no-md \
        >"$OUT/bench_scaling.json" 2>>"$OUT/bench.log" || status=1
fi

"$PY" scripts/gpu_summary.py "$OUT" "$status"
exit $?
