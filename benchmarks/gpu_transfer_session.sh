#!/usr/bin/env bash
# One call on a 2-GPU machine: end-to-end tests (CUDA IPC; NCCL over NVLink and forced onto its socket
# transport), then the transfer benchmark on W1 for each kvlink transport.
# Usage (repo root): bash benchmarks/gpu_transfer_session.sh OUTDIR
#   KVLINK_TESTS="kernels ipc nccl nccl_socket" (the default; also "faults", "soak"; "" skips the tests)
#   KVLINK_BENCH_TRANSPORTS="auto nccl" (kvlink's --transport per bench run; "" skips the bench)
#   KVLINK_BENCH_ARGS="..." extra bench flags; KVLINK_PROFILE_PROGRESS_RUN=1 adds progress-thread profiles
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
# how fast this machine runs kvlink's host-side Python (compare with other machines' figures)
timeout 60 python3 benchmarks/host_overhead.py > "$out/host_overhead.log" 2>&1 || status=1
cat "$out/host_overhead.log"
if [ "${KVLINK_SWEEP:-0}" = 1 ]; then  # the copy kernel's grid and unroll across NVLink
  for unroll in ${KVLINK_SWEEP_UNROLLS:-4 8}; do
    KVLINK_NVRTC_OPTIONS="-DKVLINK_UNROLL=$unroll" timeout 120 python3 benchmarks/ipc_copy_sweep.py \
      > "$out/sweep-unroll$unroll.log" 2>&1 || status=1
    cat "$out/sweep-unroll$unroll.log"
  done
fi
for t in ${KVLINK_TESTS-kernels ipc nccl nccl_socket}; do
  case $t in
    kernels) run_tests kernels tests/test_gpu_kernels.py tests/test_kernel_model.py ;;
    ipc) run_tests ipc tests/test_transfer_ipc.py ;;
    nccl) run_tests nccl tests/test_transfer_nccl.py ;;
    nccl_socket) NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 run_tests nccl_socket tests/test_transfer_nccl.py ;;
    faults) run_tests faults tests/test_faults_gpu.py ;;
    soak) KVLINK_SOAK_TRANSFERS=${KVLINK_SOAK_TRANSFERS:-2000} run_tests soak tests/test_soak.py ;;
  esac
done
for transport in ${KVLINK_BENCH_TRANSPORTS-auto nccl}; do
  b="$out/bench-$transport"
  timeout 330 python3 -m kvlink.bench --backend nccl --transport "$transport" ${KVLINK_BENCH_ARGS:-} \
    --json "$b.json" --plot "$b.png" --profile "$out/prof-$transport" > "$b.log" 2> "$b.err" || status=1
  echo "== bench --transport $transport"
  tail -n 14 "$b.log"
  grep -E "transport|Error|error|FAILED" "$b.err" | head -n 6
done
if [ "${KVLINK_PROFILE_PROGRESS_RUN:-0}" = 1 ]; then  # where the progress threads' host time goes
  KVLINK_PROFILE_PROGRESS="$out/prof" timeout 200 python3 -m kvlink.bench --backend nccl --tokens 4096 --iters 6 \
    --methods kvlink --no-layerwise --concurrent 0 > /dev/null 2>&1 || status=1
  for f in "$out"/prof/progress-*.prof; do
    python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(15)" "$f" \
      > "${f%.prof}.txt" 2>&1
  done
fi
exit $status
