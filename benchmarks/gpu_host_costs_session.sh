#!/usr/bin/env bash
# One call on a one-GPU machine: the host-time figures (docs/design.md "Host time per request"), then
# the GPU tests of the paths they changed. Typically 3-4 minutes on an H200; each step has a time limit
# (7 minutes in all at the most).
# Usage (repo root): bash benchmarks/gpu_host_costs_session.sh OUTDIR       logs and JSON go to OUTDIR
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/device.txt"
timeout 20 python3 benchmarks/host_overhead.py > "$out/host_overhead.log" 2>&1 || status=1
cat "$out/host_overhead.log"
# compile once: CuPy's disk cache serves every later process
timeout 90 python3 -c "
import time, torch, kvlink
t = time.time()
_, layout = kvlink.presets.allocate('vllm_flash_attn_nhd', num_layers=1, num_blocks=2, block_size=16, num_heads=8,
                                    head_dim=128, device='cuda')
kvlink.prepare(layout)
print(f'kernels compiled in {time.time() - t:.1f} s')" 2>&1 | tee "$out/compile.log" || status=1
echo "== host_costs"
timeout 140 python3 benchmarks/host_costs.py --json "$out/host_costs.json" > "$out/host_costs.txt" 2>&1 || status=1
sed -n '/^targets/,$p' "$out/host_costs.txt"
grep -E "PART FAILED|WRONG" "$out/host_costs.txt"
echo "== kvlink.bench on one GPU (ipc against a device copy)"
plot=""
python3 -c "import matplotlib" 2>/dev/null && plot="--plot $out/bench.png"
timeout 90 python3 -m kvlink.bench --backend gpu --iters 10 --json "$out/bench.json" $plot \
  > "$out/bench.txt" 2> "$out/bench.err" || status=1
cat "$out/bench.txt"
grep -E "Error|error|FAILED" "$out/bench.err" | head -n 6
echo "== GPU tests of the changed paths"
KVLINK_TEST_TIMEOUT=90 run_tests changed tests/test_gpu_kernels.py tests/test_nccl_pipeline_loopback.py \
  tests/test_kernel_model.py tests/test_host_path.py
exit $status
