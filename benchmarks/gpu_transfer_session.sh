#!/usr/bin/env bash
# One call on a 2-GPU machine: NCCL end-to-end tests (NVLink and forced socket transport), then the
# transfer benchmark on W1. Usage (repo root): bash benchmarks/gpu_transfer_session.sh OUTDIR
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
status=0
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$out/device.txt"
nvidia-smi topo -m >> "$out/device.txt" 2>&1
if [ "${KVLINK_SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_transfer_nccl.py > "$out/tests_nccl.log" 2>&1 || status=1
  tail -n 2 "$out/tests_nccl.log"
  NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_transfer_nccl.py \
    > "$out/tests_nccl_socket.log" 2>&1 || status=1
  tail -n 2 "$out/tests_nccl_socket.log"
fi
timeout 330 python3 -m kvlink.bench --backend nccl ${KVLINK_BENCH_ARGS:-} --json "$out/bench.json" --plot "$out/bench.png" --profile "$out/prof" \
  > "$out/bench.log" 2> "$out/bench.err" || status=1
tail -n 25 "$out/bench.log"
if [ "${KVLINK_PROFILE_PROGRESS_RUN:-0}" = 1 ]; then  # where the progress threads' host time goes
  KVLINK_PROFILE_PROGRESS="$out/prof" timeout 200 python3 -m kvlink.bench --backend nccl --tokens 4096 --iters 6 \
    --methods kvlink --no-layerwise --concurrent 0 > /dev/null 2>&1 || status=1
  for f in "$out"/prof/progress-*.prof; do
    python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(15)" "$f" \
      > "${f%.prof}.txt" 2>&1
  done
fi
grep -E "kvlink .*transport|Error|error|FAILED" "$out/bench.err" | head -n 8
exit $status
