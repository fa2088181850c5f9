#!/usr/bin/env bash
# The GPU benchmark on a bare GPU box that has python3 with torch (CUDA) but not this project's
# environment: the golden parity tests on CUDA, then bench_gpu.py --engine (the model's step
# loop in-process: the server's packages are not needed). Run from the repository root:
#
#   COSYVOICE_GOLDEN=/path/to/golden bash bench/gpu_device.sh OUTDIR [bench_gpu.py options]
#
# The golden folder needs cosyvoice2/ only (its model dir also seeds make_full_model.py).
# OUTDIR receives gpu.md (the docs/benchmarks.md section), gpu.log and split.log.
set -euo pipefail
out=${1:?usage: gpu_device.sh OUTDIR [bench_gpu.py options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COSYVOICE_GOLDEN=$(realpath "${COSYVOICE_GOLDEN:-.golden}")
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Preflight, in seconds, so a bare box's gap is one line in gpu.md, not a traceback minutes in:
# the golden dir that seeds the full-size model, the packages the model needs, and pytest's
# for the parity tests (without those the bench runs and says parity was skipped).
if [ ! -f "$COSYVOICE_GOLDEN/cosyvoice2/model/cosyvoice2.yaml" ]; then
  echo "not run: no $COSYVOICE_GOLDEN/cosyvoice2/model (copy the golden cosyvoice2/ folder there)" | tee "$out/gpu.md"
  exit 1
fi
missing() { python3 -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"; }
lacking=$(missing numpy yaml tokenizers safetensors torchaudio regex onnxruntime)
if [ -n "$lacking" ]; then
  echo "not run: python3 lacks $lacking" | tee "$out/gpu.md"
  exit 1
fi
extra=()
lacking=$(missing pytest pytest_timeout httpx)
if [ -n "$lacking" ]; then
  echo "parity skipped: python3 lacks $lacking" | tee "$out/preflight.txt"
  extra=(--skip-parity)
fi
# bench_gpu.py keeps to its --budget-s (450 s) and kills a dtype's process 60 s past it; this
# timeout is the last resort, within a 600 s call: gpu.md holds what was measured by then.
timeout -k 5 570 python3 bench/bench_gpu.py --engine --body-out "$out/gpu.md" ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee "$out/gpu.log"
# Then, with the time left in the call (it takes ~70 s: its own model load and warm-up), where
# one stream's and 16 streams' first audio goes, stage by stage: appended to gpu.md.
left=$((560 - SECONDS))
if [ "$left" -ge 90 ] && timeout -k 5 "$left" python3 bench/ttfa_split.py --dtype bfloat16 \
    --rounds 2 > "$out/split.log" 2>&1; then
  {
    printf '\nWhere first audio goes (`bench/ttfa_split.py --dtype bfloat16 --rounds 2`):\n\n```\n'
    cat "$out/split.log"
    printf '```\n'
  } >> "$out/gpu.md"
else
  echo "ttfa_split.py: not run or failed (${left} s were left); see split.log" | tee -a "$out/gpu.log"
fi
