#!/usr/bin/env bash
# One call on a GPU machine: compile-check, GPU tests, W1 benchmarks (and tuning variants).
# Usage (repo root): bash benchmarks/gpu_session.sh [OUTDIR]      logs and JSON go to OUTDIR
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
python3 -m kvlink.compile_check sm_90 > "$out/compile.log" 2>&1 || status=1
python3 -m pytest -q -p no:cacheprovider tests/ > "$out/tests.log" 2>&1 || status=1
tail -n 3 "$out/tests.log"
PYTHONPATH=. python3 benchmarks/profile_host.py > "$out/profile.log" 2>&1 || status=1
grep "host time per" "$out/profile.log"
KVLINK_BENCH_JSON="$out/bench.json" python3 -m pytest -q -s -p no:cacheprovider benchmarks/ > "$out/bench.log" 2>&1 || status=1
# KVLINK_TUNE_VARIANTS: ';'-separated env settings to re-run the W1 benchmarks under, e.g.
# "KVLINK_NVRTC_OPTIONS=-DKVLINK_UNROLL=8;KVLINK_CTAS_PER_SM=4"
IFS=';' read -r -a variants <<< "${KVLINK_TUNE_VARIANTS:-}"
for variant in "${variants[@]}"; do
  [ -n "$variant" ] || continue
  echo "== variant: $variant" >> "$out/tune.log"
  env $variant python3 -m pytest -q -s -p no:cacheprovider benchmarks/ -k "copy or kvlink" >> "$out/tune.log" 2>&1 || status=1
done
[ -f "$out/tune.log" ] && grep -E "== variant|kvlink (pack|unpack) |d2d" "$out/tune.log"
sed -n '/kvlink benchmark summary/,$p' "$out/bench.log"
exit $status
