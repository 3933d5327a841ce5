#!/usr/bin/env bash
# The GPU session's one command: validate and time the CUDA kernels in under ~7 minutes.
#
#   bash scripts/device_check.sh            # on the device machine (the device tool sets $OUT)
#   OUT=/tmp/out bash scripts/device_check.sh
#
# Steps (each under its own time limit; a failing step is reported and the next one still runs):
#   1. environment: GPU, driver, torch, NVRTC                                       (~10 s)
#   2. smoke: one small product per format against float64                         (~15 s)
#   3. pytest -m gpu: the kernels' correctness grid, every config variant, spmm/SparseLinear
#      dispatch, torch.compile, CUDA graphs; CUDA-graph decoding of a sparse model  (~1-2 min)
#   4. compute-sanitizer memcheck and racecheck on small shapes                    (~2 min)
#   5. flashllm bench kernels --quick: CSV + PNG + table                            (~2 min)
# Writes under $OUT (./out when unset): device_check.log, pytest_gpu.log, sanitizer_*.log,
# kernels.csv, kernels_speedup.png, bench.log. The last lines printed are the summary.
# DEVICE_CHECK_TUNE=1 adds a short launch-config tuning run (tune.log, tuned.json).
# DEVICE_CHECK_E2E=1 adds a short end-to-end decode run, Llama-2-7B dense vs 50%/80% (e2e.csv, ~2 min).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export FLASHLLM_CUDA_KERNELS=1
export FLASHLLM_CACHE_DIR="${FLASHLLM_CACHE_DIR:-/tmp/flashllm-cubin}"
export PYTHONUNBUFFERED=1
declare -A STATUS
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -n 3
timeout 60 "$PY" - <<'EOF'
import torch, flashllm
from flashllm.kernels import launch
print("torch", torch.__version__, "cuda", torch.version.cuda, "flashllm", flashllm.__version__)
p = torch.cuda.get_device_properties(0)
smem = launch._state().driver.device_attribute(0, launch.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
print(f"{p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {smem} B smem/block opt-in, "
      f"{p.total_memory / 2**30:.0f} GiB")
nv = launch.nvrtc()
print("NVRTC", nv.version, "from", nv.path, "target", nv.target((p.major, p.minor)))
EOF
STATUS[env]=$?
if [ "${STATUS[env]}" != 0 ]; then
  echo "no usable CUDA GPU / torch / NVRTC here: stopping (nothing below can run)"; exit 2
fi

step "2. smoke: one product per format"
timeout 120 "$PY" - <<'EOF'
import time, torch
from dataclasses import replace
from flashllm.formats import BitmapWeight, TiledCSLWeight
from flashllm.kernels import bitmap_cuda, tiled_csl_cuda, launch
torch.manual_seed(0)
ok = True
for cls, mod in ((BitmapWeight, bitmap_cuda), (TiledCSLWeight, tiled_csl_cuda)):
    for split in (1, 3):
        w = torch.randn(1000, 1500, device="cuda", dtype=torch.float16)
        w[torch.rand_like(w, dtype=torch.float32) < 0.8] = 0
        x = torch.randn(17, 1500, device="cuda", dtype=torch.float16)
        cfg = replace(mod.configs.default_config(mod.FORMAT, 17, 0.8), split_k=split)
        t = time.time()
        out = torch.full((17, 1000), float("nan"), device="cuda", dtype=torch.float16)
        y = mod.linear(x, cls.from_dense(w), None, cfg, out=out)
        torch.cuda.synchronize()
        ref = x.double() @ w.double().T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        err_torch = ((torch.nn.functional.linear(x, w).double() - ref).norm() / ref.norm()).item()
        good = bool(torch.isfinite(y).all()) and err <= 2 * err_torch + 1e-6
        ok &= good
        print(f"{mod.FORMAT:9s} split={split}: rel err {err:.2e} (torch fp16 {err_torch:.2e}) "
              f"{'OK' if good else 'WRONG'}  first call {time.time() - t:.2f}s")
for key, k in launch._state().kernels.items():
    print(f"  {k.name} {dict(key[2])}: {k.registers} regs, {k.local_bytes} B local, {k.occupancy} blocks/SM")
raise SystemExit(0 if ok else 1)
EOF
STATUS[smoke]=$?

step "3. GPU tests"
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout 120)
timeout 300 "$PY" -m pytest tests/test_kernels_cuda.py tests/test_decode.py -m gpu -q -rfEs -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" \
  --maxfail 20 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 40
STATUS[pytest]=${PIPESTATUS[0]}

step "4. compute-sanitizer (small shapes)"
SAN=/tmp/flashllm_sanitize.py
cat > "$SAN" <<'EOF'
import torch
from dataclasses import replace
from flashllm.formats import BitmapWeight, TiledCSLWeight
from flashllm.kernels import bitmap_cuda, tiled_csl_cuda, configs
torch.manual_seed(0)
for cls, mod in ((BitmapWeight, bitmap_cuda), (TiledCSLWeight, tiled_csl_cuda)):
    for m, k, n, s, split in ((70, 130, 3, 0.8, 1), (130, 200, 17, 0.0, 2), (200, 70, 9, 0.95, 1)):
        w = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w[torch.rand(m, k, device="cuda") < s] = 0
        x = torch.randn(n, k, device="cuda", dtype=torch.float16)
        cfg = replace(configs.default_config(mod.FORMAT, n, max(s, 0.5)), split_k=split)
        if mod is tiled_csl_cuda and s == 0.0:
            cfg = replace(cfg, words_per_stage=256)  # the piecewise reload path
        y = mod.linear(x, cls.from_dense(w), torch.randn(m, device="cuda", dtype=torch.float16), cfg)
        torch.cuda.synchronize()
print("sanitizer workload done")
EOF
export FLASHLLM_LINEINFO=1
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" "$SAN" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    STATUS[$tool]=$?
    tail -n 6 "$OUT/sanitizer_$tool.log"
  done
else
  echo "compute-sanitizer not found"; STATUS[memcheck]=127; STATUS[racecheck]=127
fi
unset FLASHLLM_LINEINFO

step "5. benchmark (--quick)"
timeout 300 "$PY" -m flashllm.bench.kernels --quick --out "$OUT" --warmup 10 --rep 60 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^  " | tail -n 90
STATUS[bench]=${PIPESTATUS[0]}

if [ "${DEVICE_CHECK_TUNE:-0}" = "1" ]; then
  step "6. tuning (DEVICE_CHECK_TUNE=1)"
  timeout 240 "$PY" -m flashllm.bench.kernels --tune --shapes opt-66b.out,llama-2-7b.up --n 1,16 \
    --sparsity 0.5,0.8 --tune-reps 10 --write-configs "$OUT/tuned.json" 2>&1 | tee "$OUT/tune.log" | tail -n 30
  STATUS[tune]=${PIPESTATUS[0]}
fi

if [ "${DEVICE_CHECK_E2E:-0}" = "1" ]; then
  step "7. end to end (DEVICE_CHECK_E2E=1)"
  timeout 240 "$PY" -m flashllm.cli bench e2e --models llama-2-7b --sparsities 0.5,0.8 --batch 1,16 \
    --new-tokens 64 --predict --csv "$OUT/e2e.csv" --plot "$OUT/e2e.png" 2>&1 | tee "$OUT/e2e.log" | tail -n 20
  STATUS[e2e]=${PIPESTATUS[0]}
fi

step "summary ($(( $(date +%s) - T0 ))s)"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 1
for k in env smoke pytest memcheck racecheck bench tune e2e; do
  [ -n "${STATUS[$k]+x}" ] && printf '  %-10s %s\n' "$k" "$([ "${STATUS[$k]}" = 0 ] && echo ok || echo "FAILED (exit ${STATUS[$k]})")"
done
grep -A 200 "^geomean speedup" "$OUT/bench.log" | head -n 60
echo "files: $(ls "$OUT" | tr '\n' ' ')"
fail=0
for k in env smoke pytest bench; do [ "${STATUS[$k]:-1}" = 0 ] || fail=1; done
exit $fail
