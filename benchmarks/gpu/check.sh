#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, with the wheels of fetch_wheels.sh carried:
#   device run, carry [".whl"], command: bash benchmarks/gpu/check.sh
# (PART=tests or PART=bench runs one half, if the whole would pass a call's 10 minutes).
# It installs the carried wheels beside the image's torch, transformers and accelerate, then
#   1. the GPU tests: every stage on CUDA in fp32 and bf16, a real NCCL group's collectives,
#      bf16 log-probs against fp32 (tests/test_gpu.py, tests/test_precision.py);
#   2. `tether bench steps --device cuda`, in fp32 and in bf16: tokens/s, FLOP/s and memory
#      of each stage's step;
# and leaves its logs and figures in $OUT (the device tool brings that folder back).
# vLLM is not checked: no wheel of it is in this workplace's package mirror, and its wheels
# are larger than what a call can carry.
set -uo pipefail
OUT=${OUT:-/tmp/tether-gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tether-site .whl/*.whl || { echo "error: installing .whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/tether-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, transformers, accelerate, tether; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"
status=0
PART=${PART:-all}  # tests, bench or all: split the check if one call would pass 10 minutes
if [ "$PART" != bench ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_precision.py \
    > "$OUT/pytest.log" 2>&1 || status=1
  tail -25 "$OUT/pytest.log"
fi
[ "$PART" = tests ] && exit $status
for precision in fp32 bf16; do
  name=bench_steps_cuda_$precision
  if "$PY" -m tether bench steps --device cuda --precision $precision --json \
    > "$OUT/$name.json" 2> "$OUT/$name.err"; then
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); \
[print(sys.argv[2], r['stage'], round(r['tokens_per_s']), 'tokens/s', round(r['step_s'], 3), \
's', f\"{r['peak_fraction']:.0%} of peak\") for r in d['stages']]" "$OUT/$name.json" $precision
  else
    status=1
    tail -5 "$OUT/$name.err"
  fi
done
exit $status
