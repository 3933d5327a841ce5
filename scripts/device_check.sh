#!/usr/bin/env bash
# The GPU session's one command: validate and time the CUDA kernels in under ~7 minutes.
#
#   bash scripts/device_check.sh            # on the device machine (the device tool sets $OUT)
#   OUT=/tmp/out bash scripts/device_check.sh
#   DEVICE_CHECK_PRESET=diagnose bash scripts/device_check.sh   # what binds the kernels (below)
#
# Steps (each under its own time limit; a failing step is reported and the next one still runs):
#   1. environment: GPU, driver, torch, NVRTC                                       (~5 s)
#   2. smoke: one small product per format against float64                         (~10 s)
#      2b. the same for each option not yet validated on a GPU, one at a time
#      (`python -m flashllm.kernels.configs pending`: wgmma since the seventeenth session, pdl
#      since the nineteenth); one that fails or hangs is left out of steps 3-7, the others run
#      there                                                                       (~10 s each)
#   3. pytest -m gpu: the kernels' correctness grid, every config variant, spmm/SparseLinear
#      dispatch, torch.compile, CUDA graphs; CUDA-graph decoding of a sparse model  (~1 min)
#   4. DEVICE_CHECK_TUNE=1: tune the launch configs on the --quick shapes (tuned.json, tune.log);
#      the steps below then run with them (FLASHLLM_KERNEL_CONFIGS)                (~2 min)
#   5. flashllm bench kernels --quick (BENCH_SELECT replaces --quick): CSV + PNG + table (~1 min)
#      DEVICE_CHECK_SWEEP=1 times every issue shape, N 1/8/16/32 (SWEEP_N), sparsity 0.5-0.9
#      (SWEEP_SPARSITY), optionally a SWEEP_SAMPLE of those points, into sweep/; its methods
#      (SWEEP_FORMATS) are both formats and the pending options that passed step 2b  (~1 min),
#      then compared with the last committed sweep (SWEEP_BASELINE; scripts/compare_sweeps.py)
#      DEVICE_CHECK_BF16=1 repeats it in bf16 against cuBLAS (kernels_bf16.csv)     (~30 s)
#      DEVICE_CHECK_PROBE=1: where the kernels' time goes, each timed with parts of its work left
#      out (python -m flashllm.bench.probes; PROBE_SELECT replaces its default layers, N and
#      sparsities, PROBE_FORMATS its methods, e.g. bitmap,bitmap:fit:stages6; probes.csv), with
#      the SM clock during each timing                                              (~1 min)
#      5d. the prefill path: the reference decode against the expansion kernels
#      (cuda/*_expand.cu, checked bit for bit and timed; flashllm bench formats)      (~20 s)
#      DEVICE_CHECK_CROSSOVER=1: fused kernels against expansion + cuBLAS at N 32-512
#      (CROSSOVER_N), where FLASHLLM_KERNEL_MAX_N should sit (crossover/)          (~1 min)
#      5f. host time per eager call of a small layer: F.linear, SparseLinear (launch plan kept
#      on the weight), the launch planned every call (scripts/host_overhead.py)      (~10 s)
#      5e. DEVICE_CHECK_FLUSH=1: every issue layer (FLUSH_SHAPES) at N = 16, 50 and 90%, cuBLAS and
#      both formats, timed after do_bench's L2 flush (zeroing 256 MiB: dirty lines) and after a
#      read flush (clean lines), each with cuBLAS's fit of intercept + bytes / bandwidth
#      (flush_write/, flush_read/)                                                  (~40 s)
#   6. DEVICE_CHECK_NCU=1: Nsight Compute sections and warp-stall reasons, one launch per kernel
#      option at NCU_ROWS activation rows (16; ncu.log)                              (~30 s)
#   7. compute-sanitizer memcheck and racecheck on small shapes                    (~1 min)
#   8. DEVICE_CHECK_E2E=1: Llama-2-7B decode, dense vs 50%/80% (e2e.csv, e2e.png)   (~1 min)
#      E2E_OPTIONS=fixup (any FLASHLLM_KERNEL_OPTIONS value) runs it again with those kernel
#      options forced (Llama-2-7B, the same sparsities, batches, format and tokens), into the same
#      CSV: an end-to-end A/B                                                     (~1 min)
#      E2E_EXPAND=1 runs it again with FLASHLLM_EXPAND=0 (prefill by the reference decode
#      instead of the expansion kernels: their effect on the time to first token), into
#      e2e_no_expand.csv                                                          (~1 min)
#      E2E_MODELS, E2E_SPARSITIES and E2E_NEW_TOKENS (64) replace its models, sparsities and
#      tokens per sequence, E2E_FORMAT (bitmap) its format (tiled_csl, or auto: each layer by
#      its sparsity); E2E_BIG=1 adds OPT-66B and OPT-175B at 80% on one GPU (--big,
#      E2E_BIG_BATCH, e2e_big.csv)
#      E2E_COMPILE=1 runs every e2e decode step through torch.compile (--compile: the small
#      kernels outside the linear layers fused, dense and sparse alike; compiles per model and
#      batch, give E2E_LIMIT room); E2E_COMPILE=both times each model and batch without and
#      with it (an A/B in one run); E2E_BATCH replaces the batch sizes (1,16)
#      E2E_PROFILE=1 profiles one prefill per model at the first batch size (torch.profiler:
#      wall time, the sparse kernels' device time, the rest, idle device time; prefill_profile/),
#      where the time to first token goes                                         (~10 s a model)
# Writes device_check.log under $OUT (./out when unset) and everything else into $OUT/results.tgz
# (the device tool returns at most 8 files). The last lines printed are the summary.
# Step limits in seconds: PYTEST_LIMIT (300), TUNE_LIMIT (240), BENCH_LIMIT (300), NCU_LIMIT (150),
# SANITIZER_LIMIT (150 per tool), E2E_LIMIT (240), SWEEP_LIMIT (240), PROBE_LIMIT (150), FLUSH_LIMIT (60 per
# flush).
# DEVICE_CHECK_DEADLINE=N cuts them so that the whole run ends within N seconds (a step left with
# under 15 s is skipped): set it a little under the device call's timeout.
# NCU_CLOCK_CONTROL=none runs Nsight Compute at the GPU's own clocks (by default it locks them to
# base, so its durations are not the benchmark's). SANITIZER_TOOLS="memcheck"
# skips racecheck, SANITIZER_TOOLS=none both. BENCH_BASELINES (default: all) limits the benchmark's
# baselines; BENCH_FORMATS its flashllm methods (default: bitmap,tiled_csl, plus the pending options
# that passed step 2b, under the same launch; bitmap:fragment,bitmap:scatter,tiled_csl:warps4,... force
# an option for an A/B against the configured kernel).
# DEVICE_CHECK_TESTS=0 skips step 3 (a profiling-only run).
set -uo pipefail

# DEVICE_CHECK_PRESET=diagnose: the one call that says what binds the kernels and whether the
# kernel options help (~8-9 minutes on an H200 with prebuilt cubins, cut at 560 s by its default
# DEVICE_CHECK_DEADLINE: give the device call a 600 s timeout): the tests, a benchmark of the
# options against the defaults on two layers (N 1/16, 50/80/90%, cuBLAS only), the probes, the
# expansion kernels against the reference decode, Nsight Compute at the GPU's own clock with the
# warp-stall reasons, the L2 flush's share of every time (write against read flush), and the
# sanitizers; no tuning (a second call:
# DEVICE_CHECK_TUNE=1 ..., with DEVICE_CHECK_CROSSOVER=1 or DEVICE_CHECK_E2E=1 E2E_EXPAND=1). A
# pending option that fails its smoke test (step 2b) is left out of every later step, the others
# stay. Variables set in the environment still win.
# DEVICE_CHECK_PRESET=e2e: issue 5's matrix in one call (~9 minutes, cut at 560 s: give the call a
# 600 s timeout): Llama-2-7B, Llama-2-13B and OPT-30B, dense against 50/70/80%, batch 1/8/16/32,
# 256 new tokens (graphs, not compiled: E2E_COMPILE=both doubles the runs and adds a compile each),
# then OPT-66B and OPT-175B at 80% on one GPU (--big, batch 1/8, 32 new tokens; OPT-175B needs an
# H200); no GPU tests, no sanitizers. Rows are printed and written to the CSV as they come, so a
# run cut short still reports the models it reached.
# DEVICE_CHECK_PRESET=validate: kernels changed without a GPU, checked and timed in one call (~5-6
# minutes with prebuilt cubins: 309 s on an H200 in the thirteenth session, ~350 s in the
# sixteenth, whose racecheck alone took 90 s; cut at 560 s): the GPU tests and both sanitizers, the
# expansion kernels timed (5d), the host time per eager call with real launches (5f), and the
# all-layer sweep (N 1/8/16/32, 50-90%, bitmap and Tiled-CSL against cuBLAS) compared with the last
# committed one; the pending options that pass step 2b join both benchmarks under the configured
# launch.
# DEVICE_CHECK_PRESET=tune: one call that tunes the shape classes configs.TUNED has no entry for
# (one layer each, Llama-2-7B's first: attention 4096 x 4096, down_proj 4096 x 11008; then OPT-30B
# qkv and out, OPT-66B fc2, Llama-3-70B gate_up, OPT-66B fc1) at N 16/1/8/32 and 50/80%, its
# winners written as they come (tuned.json, cut off by the deadline where the time runs out), then
# the all-layer sweep with them; the smoke tests run, the GPU tests do not (~9 minutes).
if [ "${DEVICE_CHECK_PRESET:-}" = "diagnose" ]; then
  : "${BENCH_SELECT:=--shapes llama-2-7b.up,opt-66b.qkv --n 1,16 --sparsity 0.5,0.8,0.9}"
  : "${BENCH_BASELINES:=cublas}"
  : "${BENCH_FORMATS:=bitmap,tiled_csl,bitmap:persistent,bitmap:ring,bitmap:ring:persistent,bitmap:rezero,tiled_csl:rezero,bitmap:split1,bitmap:fit,bitmap:pf4,bitmap:fit:stages6,bitmap:fit:stages6:ring,bitmap:fit:stages6:ring:persistent,bitmap:bulk,bitmap:fit:stages6:bulk,bitmap:fit:stages6:ring:bulk,bitmap:persistent:fixup,bitmap:fit:stages6:ring:bulk:persistent:fixup,bitmap:tps2,bitmap:fit:tps2,bitmap:fixup,tiled_csl:split1,tiled_csl:dense2,tiled_csl:pf4,tiled_csl:fixup,tiled_csl:cores,tiled_csl:cores:stages4,tiled_csl:cores:pf4,tiled_csl:cores_warp,tiled_csl:cores_warp:stages6,tiled_csl:wgmma,bitmap:wgmma,bitmap:pdl,tiled_csl:pdl}"
  : "${DEVICE_CHECK_PROBE:=1}" "${PROBE_FORMATS:=bitmap,tiled_csl,bitmap:persistent,bitmap:ring,bitmap:fit:stages6,bitmap:fit:stages6:ring,bitmap:bulk,bitmap:fit:tps2,bitmap:split1}"
  : "${PROBE_SELECT:=--shapes llama-2-7b.up,opt-66b.qkv --n 1,16 --sparsity 0.5,0.9}"
  : "${DEVICE_CHECK_FLUSH:=1}"
  : "${DEVICE_CHECK_NCU:=1}" "${NCU_CLOCK_CONTROL:=none}"
  : "${PYTEST_LIMIT:=200}" "${BENCH_LIMIT:=100}" "${PROBE_LIMIT:=90}" "${NCU_LIMIT:=90}" "${SANITIZER_LIMIT:=60}"
  : "${FORMATS_LIMIT:=45}" "${DEVICE_CHECK_DEADLINE:=560}"
elif [ "${DEVICE_CHECK_PRESET:-}" = "tune" ]; then
  : "${DEVICE_CHECK_TESTS:=0}" "${DEVICE_CHECK_TUNE:=1}" "${TUNE_LIMIT:=420}" "${DEVICE_CHECK_DEADLINE:=560}"
  : "${TUNE_SHAPES:=llama-2-7b.attn,llama-2-7b.down,opt-30b.qkv,opt-30b.out,opt-66b.fc2,llama-3-70b.gate_up,opt-66b.fc1}"
  : "${TUNE_N:=16,1,8,32}" "${TUNE_SPARSITY:=0.5,0.8}"
  : "${BENCH_SELECT:=--shapes llama-2-7b.attn --n 16 --sparsity 0.5}" "${BENCH_BASELINES:=cublas}"
  : "${BENCH_FORMATS:=bitmap,tiled_csl}" "${BENCH_LIMIT:=20}"
  : "${DEVICE_CHECK_SWEEP:=1}" "${SWEEP_LIMIT:=70}" "${SANITIZER_TOOLS:=none}" "${FORMATS_LIMIT:=15}"
elif [ "${DEVICE_CHECK_PRESET:-}" = "e2e" ]; then
  : "${DEVICE_CHECK_TESTS:=0}" "${BENCH_SELECT:=--shapes llama-2-7b.attn --n 16 --sparsity 0.5}" "${BENCH_BASELINES:=cublas}"
  : "${BENCH_FORMATS:=bitmap,tiled_csl}" "${BENCH_LIMIT:=20}" "${SANITIZER_TOOLS:=none}" "${FORMATS_LIMIT:=15}"
  : "${DEVICE_CHECK_E2E:=1}" "${E2E_MODELS:=llama-2-7b,llama-2-13b,opt-30b}" "${E2E_SPARSITIES:=0.5,0.7,0.8}"
  : "${E2E_BATCH:=1,8,16,32}" "${E2E_NEW_TOKENS:=256}" "${E2E_LIMIT:=360}" "${E2E_BIG:=1}" "${E2E_BIG_LIMIT:=150}"
  : "${DEVICE_CHECK_DEADLINE:=560}"
elif [ "${DEVICE_CHECK_PRESET:-}" = "validate" ]; then
  : "${BENCH_SELECT:=--shapes llama-2-7b.up,opt-66b.qkv --n 1,16 --sparsity 0.5,0.8,0.9}" "${BENCH_BASELINES:=cublas}"
  : "${BENCH_LIMIT:=60}" "${DEVICE_CHECK_SWEEP:=1}" "${SWEEP_LIMIT:=200}"
  : "${PYTEST_LIMIT:=240}" "${SANITIZER_LIMIT:=120}" "${FORMATS_LIMIT:=30}" "${DEVICE_CHECK_DEADLINE:=560}"
elif [ -n "${DEVICE_CHECK_PRESET:-}" ]; then
  echo "unknown DEVICE_CHECK_PRESET=${DEVICE_CHECK_PRESET} (known: diagnose, tune, e2e, validate)"; exit 2
fi

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset FLASHLLM_CUDA_KERNELS  # the kernels are on by default: test that
export FLASHLLM_CACHE_DIR="${FLASHLLM_CACHE_DIR:-/tmp/flashllm-cubin}"
export PYTHONUNBUFFERED=1
declare -A STATUS
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
# DEVICE_CHECK_DEADLINE (seconds from the start): each step's limit is cut to what is left before
# it, less 20 s for the summary and the archive, and a step with under 15 s left is skipped (exit
# 125), so the files come back even when the device call's own timeout is near.
limited() {
  local limit=$1 left
  shift
  if [ -n "${DEVICE_CHECK_DEADLINE:-}" ]; then
    left=$(( DEVICE_CHECK_DEADLINE - ($(date +%s) - T0) - 20 ))
    if (( left < 15 )); then echo "skipped: DEVICE_CHECK_DEADLINE=${DEVICE_CHECK_DEADLINE}s is near"; return 125; fi
    (( limit > left )) && limit=$left
  fi
  timeout "$limit" "$@"
}

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -n 3
# Whether the SM clock is pinned (application or locked clocks) or free to boost, and its limits:
# a kernel's time means little without it (BENCHMARKS.md, fifth session).
nvidia-smi -q -d CLOCK,PERFORMANCE > "$OUT/clocks.txt" 2>&1
grep -iE "^ *(SM|Graphics) *:|Applications Clocks|Default Applications|Max Clocks|Clocks Event Reasons|Active|Locked|Idle|Power Cap|HW Slowdown|Sync Boost|SW Thermal" \
  "$OUT/clocks.txt" | head -n 30
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
SMOKE_PY=/tmp/flashllm_smoke.py
cat > "$SMOKE_PY" <<'EOF'
import os, time, torch
from dataclasses import replace
from flashllm.bench.kernels import parse_format
from flashllm.formats import get_format
from flashllm.kernels import configs, cuda_module, launch
torch.manual_seed(0)
ok = True
# The defaults, or (step 2b) one pending option's (or format's) benchmark names, e.g.
# "bitmap:pf4,tiled_csl:pf4" or "tiled_csl16".
cases = [(get_format(fmt), cuda_module(fmt), options) for fmt, options in
         map(parse_format, os.environ.get("SMOKE_FORMATS", "bitmap,tiled_csl").split(","))]
for cls, mod, options in cases:
    n = 1 if options.get("cores") else 17  # the CUDA-core path multiplies one activation row
    for split in (1, 3, 3):  # split-K twice: what a launch leaves behind (fixup: its workspace) must not change the next
        w = torch.randn(1000, 1500, device="cuda", dtype=torch.float16)
        w[torch.rand_like(w, dtype=torch.float32) < 0.8] = 0
        x = torch.randn(n, 1500, device="cuda", dtype=torch.float16)
        cfg = configs.with_options(replace(configs.default_config(mod.FORMAT, n, 0.8), split_k=split), options, mod.FORMAT)
        t = time.time()
        out = torch.full((n, 1000), float("nan"), device="cuda", dtype=torch.float16)
        y = mod.linear(x, cls.from_dense(w), None, cfg, out=out)
        torch.cuda.synchronize()
        ref = x.double() @ w.double().T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        err_torch = ((torch.nn.functional.linear(x, w).double() - ref).norm() / ref.norm()).item()
        good = bool(torch.isfinite(y).all()) and err <= 2 * err_torch + 1e-6
        ok &= good
        print(f"{mod.FORMAT:9s} {options or ''} N={n} split={split}: rel err {err:.2e} (torch fp16 {err_torch:.2e}) "
              f"{'OK' if good else 'WRONG'}  first call {time.time() - t:.2f}s")
for key, k in launch._state().kernels.items():
    print(f"  {k.name} {dict(key[2])}: {k.registers} regs, {k.local_bytes} B local, {k.occupancy} blocks/SM")
raise SystemExit(0 if ok else 1)
EOF
timeout 120 "$PY" "$SMOKE_PY"
STATUS[smoke]=$?

step "2b. smoke: the options not yet validated on a GPU, one by one"
# configs.pending_options: "<option> <benchmark names>" per line (fit bitmap:fit, ...). An option
# that fails or hangs here would cost the later steps their time or their CUDA context: the steps
# below leave it out (FLASHLLM_SKIP_OPTIONS, pytest -m "not unvalidated_<option>") and keep the
# others. PENDING: the benchmark names of the options that passed.
PENDING=""; FAILED=""; MARKS="gpu"
STATUS[smoke_unvalidated]=0
while read -r option formats; do
  [ -z "$option" ] && continue
  echo "-- $option ($formats)"
  if SMOKE_FORMATS="$formats" timeout 60 "$PY" "$SMOKE_PY" < /dev/null; then
    PENDING="${PENDING:+$PENDING,}$formats"
  else
    FAILED="${FAILED:+$FAILED,}$option"; MARKS="$MARKS and not unvalidated_$option"; STATUS[smoke_unvalidated]=1
  fi
done <<< "$("$PY" -m flashllm.kernels.configs pending)"
echo "pending options that passed: ${PENDING:-none}; failed: ${FAILED:-none}"
export FLASHLLM_SKIP_OPTIONS="$FAILED"
# Drop the entries of a --formats list that use a failed option.
keep_formats() {
  "$PY" -c "import os, sys
from flashllm.bench.kernels import parse_format
from flashllm.kernels import configs
skip = set(filter(None, os.environ.get('FLASHLLM_SKIP_OPTIONS', '').split(',')))
def uses_skipped(name):  # a failed option, or a pending format that failed
    fmt, options = parse_format(name)
    return fmt in skip or bool(set(configs.unvalidated_options(configs.example_config(fmt, options))) & skip)
print(','.join(n for n in sys.argv[1].split(',') if n and not uses_skipped(n)))" "$1"
}
[ -n "${BENCH_FORMATS:-}" ] && BENCH_FORMATS=$(keep_formats "$BENCH_FORMATS")
[ -n "${PROBE_FORMATS:-}" ] && PROBE_FORMATS=$(keep_formats "$PROBE_FORMATS")
[ -n "${SWEEP_FORMATS:-}" ] && SWEEP_FORMATS=$(keep_formats "$SWEEP_FORMATS")

if [ "${DEVICE_CHECK_TESTS:-1}" = "1" ]; then
  step "3. GPU tests"
  PYTEST_TIMEOUT=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout 120)
  limited "${PYTEST_LIMIT:-300}" "$PY" -m pytest tests/test_kernels_cuda.py tests/test_decode.py tests/test_bench_kernels.py \
    -m "$MARKS" -q -rfEs \
    -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" --maxfail 20 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 40
  STATUS[pytest]=${PIPESTATUS[0]}
fi

if [ "${DEVICE_CHECK_TUNE:-0}" = "1" ]; then
  step "4. tuning (DEVICE_CHECK_TUNE=1)"
  # TUNE_FORMATS: the formats tuned (a pending format that passed step 2b joins them; tiled_csl16:
  # TUNE_FORMATS=tiled_csl16 tunes it alone)
  limited "${TUNE_LIMIT:-240}" "$PY" -m flashllm.bench.kernels --tune \
    --formats "${TUNE_FORMATS:-bitmap,tiled_csl${PENDING:+,$PENDING}}" \
    --shapes "${TUNE_SHAPES:-opt-66b.qkv,opt-66b.out,llama-3-70b.down,llama-2-7b.up}" \
    --n "${TUNE_N:-1,16,64}" --sparsity "${TUNE_SPARSITY:-0.5,0.8}" --warmup 5 --rep 20 \
    --write-configs "$OUT/tuned.json" ${FAILED:+--skip-options "$FAILED"} 2>&1 | tee "$OUT/tune.log" | grep -v "^#\|^  " | tail -n 60
  STATUS[tune]=${PIPESTATUS[0]}
  [ -f "$OUT/tuned.json" ] && export FLASHLLM_KERNEL_CONFIGS="$OUT/tuned.json"
fi

BENCH_SELECT="${BENCH_SELECT:---quick}"
step "5. benchmark ($BENCH_SELECT${FLASHLLM_KERNEL_CONFIGS:+, tuned configs})"
BENCH_FORMATS_DEFAULT="bitmap,tiled_csl"
[ -n "$PENDING" ] && BENCH_FORMATS_DEFAULT="$BENCH_FORMATS_DEFAULT,$PENDING"
# shellcheck disable=SC2086
limited "${BENCH_LIMIT:-300}" "$PY" -m flashllm.bench.kernels $BENCH_SELECT --baselines "${BENCH_BASELINES:-cublas,csr,2:4}" \
  --formats "${BENCH_FORMATS:-$BENCH_FORMATS_DEFAULT}" --out "$OUT" --warmup 10 --rep 60 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -n 90
STATUS[bench]=${PIPESTATUS[0]}

if [ "${DEVICE_CHECK_SWEEP:-0}" = "1" ]; then
  step "5a. sweep over every issue shape (DEVICE_CHECK_SWEEP=1)"
  # shellcheck disable=SC2086
  limited "${SWEEP_LIMIT:-240}" "$PY" -m flashllm.bench.kernels --shapes all --n "${SWEEP_N:-1,8,16,32}" \
    --sparsity "${SWEEP_SPARSITY:-0.5,0.7,0.8,0.9}" ${SWEEP_SAMPLE:+--sample $SWEEP_SAMPLE} --baselines cublas \
    --formats "${SWEEP_FORMATS:-bitmap,tiled_csl${PENDING:+,$PENDING}}" --out "$OUT/sweep" --warmup 10 --rep 40 \
    > "$OUT/sweep.log" 2>&1
  STATUS[sweep]=$?
  tail -n 3 "$OUT/sweep.log"
  # Against the last committed sweep (SWEEP_BASELINE): what a kernel change did, point by point,
  # net of the two runs' cuBLAS drift.
  baseline="${SWEEP_BASELINE:-bench-results/h200-2026-11-27d/call1_sweep.csv}"
  if [ -f "$baseline" ] && [ -f "$OUT/sweep/kernels.csv" ]; then
    echo "against $baseline:"
    "$PY" scripts/compare_sweeps.py "$baseline" "$OUT/sweep/kernels.csv" 2>&1 | tee "$OUT/sweep_vs_baseline.txt"
  fi
fi

if [ "${DEVICE_CHECK_BF16:-0}" = "1" ]; then
  step "5b. benchmark, bf16 (DEVICE_CHECK_BF16=1)"
  limited "${BENCH_LIMIT:-300}" "$PY" -m flashllm.bench.kernels --quick --dtype bf16 --baselines cublas --out "$OUT" \
    --csv "$OUT/kernels_bf16.csv" --no-plot --warmup 10 --rep 60 2>&1 \
    | tee "$OUT/bench_bf16.log" | grep -v "^  " | tail -n 40
  STATUS[bench_bf16]=${PIPESTATUS[0]}
fi

if [ "${DEVICE_CHECK_PROBE:-0}" = "1" ]; then
  step "5c. probes: where the time goes (DEVICE_CHECK_PROBE=1)"
  PROBE_FORMATS_DEFAULT="bitmap,tiled_csl"
  [ -n "$PENDING" ] && PROBE_FORMATS_DEFAULT="$PROBE_FORMATS_DEFAULT,$PENDING"
  # shellcheck disable=SC2086
  limited "${PROBE_LIMIT:-150}" "$PY" -m flashllm.bench.probes ${PROBE_SELECT:-} --formats "${PROBE_FORMATS:-$PROBE_FORMATS_DEFAULT}" \
    --csv "$OUT/probes.csv" 2>&1 | tee "$OUT/probes.log" | tail -n 60
  STATUS[probes]=${PIPESTATUS[0]}
fi

step "5d. the prefill path: reference decode vs the expansion kernels"
EXPAND_FORMATS=$(keep_formats "bitmap,tiled_csl,tiled_csl16")  # (a pending format that failed step 2b left out)
limited "${FORMATS_LIMIT:-60}" "$PY" -m flashllm.cli bench formats --shapes "${FORMATS_SHAPES:-4096x4096,11008x4096}" \
  --sparsities 0.5,0.8 --reps 5 --formats "$EXPAND_FORMATS" 2>&1 | tee "$OUT/formats.log" | tail -n 16
STATUS[formats]=${PIPESTATUS[0]}
if [ "${DEVICE_CHECK_CROSSOVER:-0}" = "1" ]; then
  limited "${CROSSOVER_LIMIT:-150}" "$PY" -m flashllm.bench.kernels --shapes "${CROSSOVER_SHAPES:-llama-2-7b.up,opt-66b.qkv}" \
    --n "${CROSSOVER_N:-32,64,128,256,512}" --sparsity 0.5,0.8 --baselines cublas --formats bitmap,tiled_csl --expand \
    --out "$OUT/crossover" --warmup 10 --rep 40 2>&1 | tee "$OUT/crossover.log" | grep -v "^  " | tail -n 40
  STATUS[crossover]=${PIPESTATUS[0]}
fi

step "5f. host time per eager call: dense, sparse with kept launch plans, planned every call"
limited "${HOST_LIMIT:-60}" "$PY" scripts/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log" | tail -n 8
STATUS[host]=${PIPESTATUS[0]}

if [ "${DEVICE_CHECK_FLUSH:-0}" = "1" ]; then
  step "5e. L2 flush: do_bench's (write) against a read flush (DEVICE_CHECK_FLUSH=1)"
  for flush in write read; do
    limited "${FLUSH_LIMIT:-60}" "$PY" -m flashllm.bench.kernels --shapes "${FLUSH_SHAPES:-all}" --n 16 --sparsity 0.5,0.9 \
      --baselines cublas --formats bitmap,tiled_csl --flush "$flush" --out "$OUT/flush_$flush" --warmup 10 --rep 40 \
      > "$OUT/flush_$flush.log" 2>&1
    STATUS[flush_$flush]=$?
    grep -E "^# |^cublas at|^  (bitmap|tiled_csl) +s=0\.[59]0 +[0-9]" "$OUT/flush_$flush.log" | head -n 8
  done
fi

if [ "${DEVICE_CHECK_NCU:-0}" = "1" ]; then
  step "6. Nsight Compute (DEVICE_CHECK_NCU=1)"
  NCU_PY=/tmp/flashllm_ncu.py
  cat > "$NCU_PY" <<'EOF'
# Llama-2-7B up_proj, N = 16 (NCU_ROWS), tuned configs with each kernel option forced: bitmap's fragment decode
# at 50% (full and fitted value buffers, stream-K blocks, the run-bound ring) and 80% and its scatter decode at 90%,
# Tiled-CSL with 4 and 8 warps at 80% (and at N = 1 its configured launch against both CUDA-core
# paths), and bitmap's stream probe at 80%; with each warp-stall reason's share. One warm-up
# pass (compiles), then one profiled pass between cudaProfilerStart/Stop (ncu --profile-from-start off).
import os
import torch
from dataclasses import asdict, replace
from flashllm.bench.probes import ProbeConfig
from flashllm.formats import BitmapWeight, TiledCSL16Weight, TiledCSLWeight
from flashllm.kernels import bitmap_cuda, configs, tiled_csl16_cuda, tiled_csl_cuda
torch.manual_seed(0)
ROWS = int(os.environ.get("NCU_ROWS", "16"))
x = torch.randn(max(ROWS, 1), 4096, device="cuda", dtype=torch.float16)
arch = configs.arch_key(torch.cuda.get_device_capability())
work = []
for cls, mod, s, options in [(BitmapWeight, bitmap_cuda, 0.5, {"decode": "fragment"}),
                             (BitmapWeight, bitmap_cuda, 0.8, {"decode": "fragment"}),
                             (BitmapWeight, bitmap_cuda, 0.9, {"decode": "scatter"}),
                             (BitmapWeight, bitmap_cuda, 0.5, {"decode": "fragment", "value_cap": configs.FIT}),
                             (TiledCSLWeight, tiled_csl_cuda, 0.8, {"warps": 4}),
                             (TiledCSLWeight, tiled_csl_cuda, 0.8, {"warps": 8}),
                             (TiledCSLWeight, tiled_csl_cuda, 0.9, {"warps": 4, "dense_tiles": 1}),
                             # Tiled-CSL's 16-row tiles, a warp each, no block barrier per tile
                             (TiledCSL16Weight, tiled_csl16_cuda, 0.8, {}),
                             (TiledCSL16Weight, tiled_csl16_cuda, 0.9, {}),
                             (TiledCSL16Weight, tiled_csl16_cuda, 0.8, {"warps": 8}),
                             # one activation row: the CUDA-core path against the configured launch
                             (TiledCSLWeight, tiled_csl_cuda, 0.8, {"rows": 1}),
                             (TiledCSLWeight, tiled_csl_cuda, 0.8, {"rows": 1, "cores": 1}),
                             (TiledCSLWeight, tiled_csl_cuda, 0.8, {"rows": 1, "cores": 2}),
                             (BitmapWeight, bitmap_cuda, 0.5, {"decode": "fragment", "persistent": True}),
                             (BitmapWeight, bitmap_cuda, 0.5, {"decode": "fragment", "offset_ring": True}),
                             (BitmapWeight, bitmap_cuda, 0.5, {"decode": "fragment", "persistent": True, "fixup": True}),
                             # the stream alone (probe level 1: copies, waits, barriers), 3 and 6 stages,
                             # with the ring, bulk copies or two tiles per stage: what its warps wait for,
                             # without the decode's stalls
                             (BitmapWeight, bitmap_cuda, 0.8, {"decode": "fragment", "probe": 1}),
                             (BitmapWeight, bitmap_cuda, 0.8, {"value_cap": configs.FIT, "stages": 6, "probe": 1}),
                             (BitmapWeight, bitmap_cuda, 0.8, {"value_cap": configs.FIT, "stages": 6,
                                                               "offset_ring": True, "probe": 1}),
                             (BitmapWeight, bitmap_cuda, 0.8, {"value_cap": configs.FIT, "stages": 6,
                                                               "bulk_copy": True, "probe": 1}),
                             (BitmapWeight, bitmap_cuda, 0.8, {"value_cap": configs.FIT, "tiles_per_stage": 2,
                                                               "probe": 1})]:
    probe = options.pop("probe", 0)
    rows = options.pop("rows", ROWS)
    cfg = configs.with_options(configs.get_config(arch, mod.FORMAT, 11008, 4096, rows, s), options, mod.FORMAT)
    if probe:
        cfg = ProbeConfig(**asdict(cfg), probe=probe)
    skip = set(os.environ.get("FLASHLLM_SKIP_OPTIONS", "").split(","))
    if set(configs.unvalidated_options(cfg)) & skip or mod.FORMAT in skip:
        continue  # failed its smoke test (step 2b)
    w = torch.randn(11008, 4096, device="cuda", dtype=torch.float16)
    w[torch.rand_like(w, dtype=torch.float32) < s] = 0
    work.append((mod, cls.from_dense(w), cfg, rows))
    print(mod.FORMAT, s, rows, cfg)
for profiled in (False, True):
    if profiled:
        torch.cuda.profiler.start()
    for mod, weight, cfg, rows in work:
        mod.linear(x[:rows], weight, None, cfg)
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
EOF
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [ -n "$NCU" ]; then
    # shellcheck disable=SC2086
    limited "${NCU_LIMIT:-150}" "$NCU" --profile-from-start off --kernel-name regex:"flashllm_(bitmap|tiled)" \
      ${NCU_CLOCK_CONTROL:+--clock-control $NCU_CLOCK_CONTROL} \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
      --metrics "regex:smsp__warp_issue_stalled_.*_per_warp_active\.pct" \
      "$PY" "$NCU_PY" > "$OUT/ncu.log" 2>&1
    STATUS[ncu]=$?
    grep -E "^  flashllm|Duration|SM Frequency|Throughput|Occupancy|Block Limit|Registers Per|Issued Ipc|No Eligible|Warp Cycles Per Issued|Grid Size|Waves|issue_stalled" \
      "$OUT/ncu.log" | head -n 220
  else
    echo "ncu not found"; STATUS[ncu]=127
  fi
fi

step "7. compute-sanitizer (small shapes)"
SAN=/tmp/flashllm_sanitize.py
cat > "$SAN" <<'EOF'
import torch
from dataclasses import replace
from flashllm.formats import BitmapWeight, TiledCSL16Weight, TiledCSLWeight
from flashllm.kernels import bitmap_cuda, tiled_csl16_cuda, tiled_csl_cuda, configs
torch.manual_seed(0)
import os
skip = set(os.environ.get("FLASHLLM_SKIP_OPTIONS", "").split(","))
cases = ([(BitmapWeight, bitmap_cuda, {"decode": d}) for d in configs.DECODES]
         + [(BitmapWeight, bitmap_cuda, {"decode": d, "value_cap": configs.FIT}) for d in configs.DECODES]
         + [(TiledCSLWeight, tiled_csl_cuda, {"warps": w}) for w in configs.CSL_WARPS]
         + [(TiledCSLWeight, tiled_csl_cuda, {"dense_tiles": 1})]
         + [(BitmapWeight, bitmap_cuda, {"prefetch": 2}), (TiledCSLWeight, tiled_csl_cuda, {"prefetch": 2})]
         + [(BitmapWeight, bitmap_cuda, {"fixup": True}), (TiledCSLWeight, tiled_csl_cuda, {"fixup": True})]
         + [(BitmapWeight, bitmap_cuda, {"rezero": True}), (TiledCSLWeight, tiled_csl_cuda, {"rezero": True})]
         + [(BitmapWeight, bitmap_cuda, {"persistent": True}), (BitmapWeight, bitmap_cuda, {"offset_ring": True}),
            (BitmapWeight, bitmap_cuda, {"offset_ring": True, "persistent": True, "stages": 6})]
         + [(BitmapWeight, bitmap_cuda, {"persistent": True, "fixup": True})]
         + [(BitmapWeight, bitmap_cuda, {"tiles_per_stage": 2}), (BitmapWeight, bitmap_cuda, {"tiles_per_stage": 2, "decode": "scatter"})]
         + [(BitmapWeight, bitmap_cuda, {"bulk_copy": True}), (BitmapWeight, bitmap_cuda, {"bulk_copy": True, "strips": 2}),
            (BitmapWeight, bitmap_cuda, {"bulk_copy": True, "offset_ring": True, "persistent": True, "stages": 6})]
         + [(TiledCSLWeight, tiled_csl_cuda, {"cores": c}) for c in (1, 2)]
         + [(TiledCSLWeight, tiled_csl_cuda, {"cores": 1, "fixup": True})]
         + [(BitmapWeight, bitmap_cuda, {"wgmma": True}), (TiledCSLWeight, tiled_csl_cuda, {"wgmma": True})]
         + [(BitmapWeight, bitmap_cuda, {"pdl": True}), (TiledCSLWeight, tiled_csl_cuda, {"pdl": True})]
         + [(TiledCSL16Weight, tiled_csl16_cuda, {}), (TiledCSL16Weight, tiled_csl16_cuda, {"warps": 8})])
for cls, mod, options in cases:
    if set(configs.unvalidated_options(replace(configs.LaunchConfig(nrows=8), **options))) & skip or mod.FORMAT in skip:
        continue  # failed its smoke test (step 2b)
    # (the 700-column case: more tiles than the pipeline and the prefetch distance together)
    for m, k, n, s, split in ((70, 130, 3, 0.8, 1), (130, 200, 17, 0.0, 2), (200, 70, 9, 0.95, 1), (70, 700, 5, 0.5, 1)):
        w = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w[torch.rand(m, k, device="cuda") < s] = 0
        n = 1 if options.get("cores") else n  # the CUDA-core path multiplies one row
        x = torch.randn(n, k, device="cuda", dtype=torch.float16)
        cfg = configs.with_options(replace(configs.default_config(mod.FORMAT, n, max(s, 0.5)), split_k=split),
                                   options, mod.FORMAT)
        if mod is tiled_csl_cuda and s == 0.0:
            cfg = replace(cfg, words_per_stage=256)  # the piecewise reload path
        if mod is tiled_csl16_cuda and s == 0.0:
            cfg = replace(cfg, words_per_stage=64)  # over-full tiles: the rest scattered from global memory
        y = mod.linear(x, cls.from_dense(w), torch.randn(m, device="cuda", dtype=torch.float16), cfg)
        torch.cuda.synchronize()
for m, k, s in ((70, 130, 0.8), (130, 200, 0.0), (65, 1000, 0.5)):  # the prefill path's expansions
    w = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w[torch.rand(m, k, device="cuda") < s] = 0
    bitmap_cuda.expand(BitmapWeight.from_dense(w))
    tiled_csl_cuda.expand(TiledCSLWeight.from_dense(w))
    if "tiled_csl16" not in skip:
        tiled_csl16_cuda.expand(TiledCSL16Weight.from_dense(w))
    torch.cuda.synchronize()
print("sanitizer workload done")
EOF
export FLASHLLM_LINEINFO=1
if command -v compute-sanitizer >/dev/null; then
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    [ "$tool" = none ] && continue
    limited "${SANITIZER_LIMIT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" "$SAN" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    STATUS[$tool]=$?
    tail -n 6 "$OUT/sanitizer_$tool.log"
  done
else
  echo "compute-sanitizer not found"; STATUS[memcheck]=127; STATUS[racecheck]=127
fi
unset FLASHLLM_LINEINFO

if [ "${DEVICE_CHECK_E2E:-0}" = "1" ]; then
  step "8. end to end (DEVICE_CHECK_E2E=1${E2E_COMPILE:+, E2E_COMPILE=$E2E_COMPILE})"
  E2E_FLAGS=()
  [ "${E2E_COMPILE:-0}" = "1" ] && E2E_FLAGS=(--compile)
  [ "${E2E_COMPILE:-0}" = "both" ] && E2E_FLAGS=(--compile both)
  PROFILE_FLAGS=()
  [ "${E2E_PROFILE:-0}" = "1" ] && PROFILE_FLAGS=(--profile-prefill "$OUT/prefill_profile")
  limited "${E2E_LIMIT:-240}" "$PY" -m flashllm.cli bench e2e --models "${E2E_MODELS:-llama-2-7b}" \
    --sparsities "${E2E_SPARSITIES:-0.5,0.8}" --batch "${E2E_BATCH:-1,16}" --format "${E2E_FORMAT:-bitmap}" \
    --new-tokens "${E2E_NEW_TOKENS:-64}" --predict "${E2E_FLAGS[@]}" "${PROFILE_FLAGS[@]}" --csv "$OUT/e2e.csv" \
    --plot "$OUT/e2e.png" 2>&1 | tee "$OUT/e2e.log" | tail -n 40
  STATUS[e2e]=${PIPESTATUS[0]}
  if [ "${E2E_BIG:-0}" = "1" ]; then  # OPT-66B and OPT-175B at 80% on one GPU, built layer by layer
    limited "${E2E_BIG_LIMIT:-240}" "$PY" -m flashllm.cli bench e2e --big --batch "${E2E_BIG_BATCH:-1,8}" --new-tokens 32 \
      "${E2E_FLAGS[@]}" --csv "$OUT/e2e_big.csv" --plot "$OUT/e2e_big.png" 2>&1 | tee "$OUT/e2e_big.log" | tail -n 20
    STATUS[e2e_big]=${PIPESTATUS[0]}
  fi
  if [ -n "${E2E_OPTIONS:-}" ]; then
    limited "${E2E_LIMIT:-240}" "$PY" -m flashllm.cli bench e2e --models llama-2-7b --sparsities "${E2E_SPARSITIES:-0.5,0.8}" \
      --batch "${E2E_BATCH:-1,16}" --format "${E2E_FORMAT:-bitmap}" --new-tokens "${E2E_NEW_TOKENS:-64}" --predict "${E2E_FLAGS[@]}" \
      --kernel-options "$E2E_OPTIONS" --csv "$OUT/e2e.csv" --plot "$OUT/e2e_options.png" \
      2>&1 | tee "$OUT/e2e_options.log" | tail -n 20
    STATUS[e2e_options]=${PIPESTATUS[0]}
  fi
  if [ "${E2E_EXPAND:-0}" = "1" ]; then
    FLASHLLM_EXPAND=0 limited "${E2E_LIMIT:-240}" "$PY" -m flashllm.cli bench e2e --models llama-2-7b --sparsities 0.5,0.8 \
      --batch "${E2E_BATCH:-1,16}" --new-tokens 64 --predict "${E2E_FLAGS[@]}" --csv "$OUT/e2e_no_expand.csv" --plot "$OUT/e2e_no_expand.png" \
      2>&1 | tee "$OUT/e2e_no_expand.log" | tail -n 20
    STATUS[e2e_expand]=${PIPESTATUS[0]}
  fi
fi

step "summary ($(( $(date +%s) - T0 ))s)"
[ -f "$OUT/pytest_gpu.log" ] && grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 1
for k in env smoke smoke_unvalidated pytest tune bench sweep bench_bf16 probes formats host crossover flush_write flush_read ncu \
         memcheck racecheck \
         e2e e2e_big e2e_options e2e_expand; do
  case "${STATUS[$k]-unset}" in
    unset) ;;
    0) printf '  %-18s ok\n' "$k" ;;
    125) printf '  %-18s skipped (deadline)\n' "$k" ;;
    *) printf '  %-18s FAILED (exit %s)\n' "$k" "${STATUS[$k]}" ;;
  esac
done
# flashllm's geomeans and the option A/B (the CSV has cuSPARSE and 2:4 too)
grep -A 300 "^geomean speedup" "$OUT/bench.log" | grep -v "^  csr \|^  2:4 " | head -n 130
[ -f "$OUT/sweep.log" ] && { echo "sweep:"; grep -A 300 "^geomean speedup" "$OUT/sweep.log" | grep -B 300 "^CSV" | head -n 60; }
[ -f "$OUT/probes.log" ] && grep -A 40 "^share of the full kernel" "$OUT/probes.log" | grep -v "^CSV"
(cd "$OUT" && tar czf /tmp/flashllm_results.tgz --exclude device_check.log . && \
  find . -mindepth 1 ! -name device_check.log -delete && mv /tmp/flashllm_results.tgz results.tgz)
echo "files: $(ls "$OUT" | tr '\n' ' ')(results.tgz: $(tar tzf "$OUT/results.tgz" | tr '\n' ' '))"
fail=0
# The steps every run needs; the tests only where they ran (DEVICE_CHECK_TESTS=0 leaves them out).
for k in env smoke bench ${STATUS[pytest]+pytest}; do [ "${STATUS[$k]:-1}" = 0 ] || fail=1; done
exit $fail
