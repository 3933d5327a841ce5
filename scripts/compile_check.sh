#!/usr/bin/env bash
# Compile every CUDA kernel variant flashllm can launch, with nvcc, for sm_80 (A100) and sm_90a
# (H100/H200), and fail on any error, warning, register spill or stack use. Needs nvcc (no GPU):
# NVCC=/usr/local/cuda-13.0/bin/nvcc on the build machines; without a toolkit, PyPI's wheels give
# one (with a host g++):
#   pip install --target /tmp/cuda13 "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
#       "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*"
#   PATH=/tmp/cuda13/nvidia/cu13/bin:$PATH scripts/compile_check.sh
# Where NVRTC is found, the NVRTC builds the launcher makes (sm_80, sm_90) are checked too.
#
#   scripts/compile_check.sh            # one variant per code shape (format, NROWS, STRIPS): ~1 min on 2 cores
#   FULL=1 scripts/compile_check.sh     # every checked variant (kernels/configs.py), both dtypes, both archs
#   JOBS=8 scripts/compile_check.sh     # parallel compiles
#   VERBOSE=1 scripts/compile_check.sh  # print every -Xptxas -v report
#
# The variants come from `python -m flashllm.kernels.configs`, which also passes
# FLASHLLM_SMEM_BYTES: the kernels static_assert that the shared memory the launcher will provide is
# exactly their layout, so this script also checks configs.py against the .cu files.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/src/flashllm/kernels/cuda"
PY="${PYTHON:-python3}"
[ -x "$ROOT/../venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/../venv/bin/python"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "compile_check: nvcc not found" >&2; exit 2; }
"$NVCC" --version | tail -n 2

ARCHES=("-gencode=arch=compute_80,code=sm_80" "-gencode=arch=compute_90a,code=sm_90a")
LIST="$OUT/variants.txt"
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m flashllm.kernels.configs > "$LIST.all"
if [ "${FULL:-0}" = "1" ]; then
  cp "$LIST.all" "$LIST"
else
  # The pipeline depth and stage size change constants, not code: keep the first variant of each
  # (source, NROWS, STRIPS, DECODE, WARPS, VALCAP, DENSE_TILES, PREFETCH, FIXUP, PERSISTENT, OFFSET_RING, BULK, TPS,
  # CORES, WGMMA, PDL).
  awk '{ key = $1; for (i = 2; i <= NF; i++) if ($i ~ /NROWS|STRIPS|DECODE|WARPS|VALCAP|DENSE_TILES|PREFETCH|FIXUP|PERSISTENT|OFFSET_RING|BULK|TPS|CORES|WGMMA|PDL|XROWS/) key = key " " $i;
         if (!(key in seen)) { seen[key] = 1; print } }' "$LIST.all" > "$LIST"
fi
# The split-K epilogue and the expansion kernels (prefill) have no tile parameters.
echo "splitk_finalize.cu" >> "$LIST"
echo "splitk_finalize.cu -DFLASHLLM_REZERO=1" >> "$LIST"
echo "splitk_finalize.cu -DFLASHLLM_PDL=1 -DFLASHLLM_REZERO=1" >> "$LIST"
echo "bitmap_expand.cu" >> "$LIST"
echo "tiled_csl_expand.cu" >> "$LIST"
echo "tiled_csl16_expand.cu" >> "$LIST"
# The diagnostic probe builds (FLASHLLM_PROBE, python -m flashllm.bench.probes), one code shape each.
for p in 1 2 3; do for d in 0 1; do
  echo "bitmap_spmm.cu -DFLASHLLM_NROWS=16 -DFLASHLLM_STAGES=3 -DFLASHLLM_STRIPS=1 -DFLASHLLM_DECODE=$d -DFLASHLLM_PROBE=$p"
done; done >> "$LIST"
for p in 1 2; do for t in 1 2; do
  echo "tiled_csl_spmm.cu -DFLASHLLM_NROWS=16 -DFLASHLLM_STAGES=3 -DFLASHLLM_CAPW=2048 -DFLASHLLM_DENSE_TILES=$t -DFLASHLLM_PROBE=$p"
done; done >> "$LIST"

i=0
: > "$OUT/jobs.txt"
while read -r src defs; do
  for arch in "${ARCHES[@]}"; do
    for dtype in 1 2; do
      # Quick mode: bf16 (a different mma type string) on sm_90a only.
      if [ "${FULL:-0}" != "1" ] && [ "$dtype" = 2 ] && [[ "$arch" != *sm_90a ]]; then continue; fi
      # The warpgroup MMA (wgmma) exists on sm_90a alone.
      if [[ "$defs" == *FLASHLLM_WGMMA=1* ]] && [[ "$arch" != *sm_90a ]]; then continue; fi
      # Programmatic dependent launch from sm_90 on (the launcher builds it for no older GPU).
      if [[ "$defs" == *FLASHLLM_PDL=1* ]] && [[ "$arch" != *sm_90a ]]; then continue; fi
      i=$((i + 1))
      echo "$i|$arch|$dtype|$src|$defs" >> "$OUT/jobs.txt"
    done
  done
done < "$LIST"

compile_one() {
  IFS='|' read -r i arch dtype src defs <<< "$1"
  log="$OUT/$i.log"
  # shellcheck disable=SC2086
  if ! "$NVCC" -cubin "$arch" -std=c++17 -Xptxas -v -Xptxas -warn-spills -Xptxas -warn-lmem-usage \
      -Werror all-warnings -I"$SRC" -DFLASHLLM_DTYPE="$dtype" $defs "$SRC/$src" -o "$OUT/$i.cubin" > "$log" 2>&1; then
    echo "FAIL $src $arch dtype=$dtype $defs"; cat "$log"; return 1
  fi
  regs=$(grep -o "Used [0-9]* registers" "$log" | head -n1)
  stack=$(grep -o "[0-9]* bytes stack frame" "$log" | head -n1)
  spill=$(grep -o "[0-9]* bytes spill stores" "$log" | head -n1)
  if [ "${stack%% *}" != "0" ] || [ "${spill%% *}" != "0" ]; then
    echo "FAIL (stack/spill) $src $arch dtype=$dtype $defs: $stack, $spill"; return 1
  fi
  echo "ok   ${src%.cu} ${arch##*code=} dtype=$dtype ${defs//-DFLASHLLM_/} : $regs, $stack"
  [ "${VERBOSE:-0}" = "1" ] && cat "$log"
  return 0
}
export -f compile_one
export OUT NVCC SRC

status=0
xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {} < "$OUT/jobs.txt" > "$OUT/summary.txt" || status=1
sort -k2,2 -k3,3 "$OUT/summary.txt"
n_ok=$(grep -c '^ok' "$OUT/summary.txt" || true)
n_all=$(wc -l < "$OUT/jobs.txt")
echo "compile_check: $n_ok / $n_all variants compiled cleanly"

# The NVRTC builds the launcher makes, checked the same way (scripts/nvrtc_check.py; skipped where
# no NVRTC is found).
nvrtc_ok=1
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/scripts/nvrtc_check.py" || nvrtc_ok=0
[ "$status" = 0 ] && [ "$n_ok" = "$n_all" ] && [ "$nvrtc_ok" = 1 ]
