#!/usr/bin/env bash
# One call on a one-GPU machine: the GPU tests that run on one GPU (two processes share it over
# CUDA IPC), the host-time figures and the one-GPU bench, as the steps named in KVLINK_STEPS
# (default: all), each under its own time limit; a hang dumps every thread's stack and ends only
# its step. Logs under OUTDIR; a table last.
# Usage (repo root): KVLINK_STEPS="kernels ipc chaos ..." bash benchmarks/gpu_one_gpu_session.sh OUTDIR
#   steps: kernels ipc adapters rest soak chaos loopback loopback_each host_costs bench bench_ctas
#          profile_e (cProfile of the stand-in's progress threads) copy_sweep (the copy kernel on one
#          GPU's memory against a device copy, over grids and NVRTC unroll/thread options)
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
python3 -c "import torch, cupy, zmq; print('torch', torch.__version__, '| cupy', cupy.__version__, '| zmq', zmq.__version__)" \
  | tee -a "$out/device.txt"
summary=()
step_test() {  # name, seconds for the step, seconds per test, pytest arguments
  local name=$1 limit=$2 per=$3; shift 3
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider --timeout="$per" --timeout-method=thread "$@" \
    > "$out/tests_$name.log" 2>&1 || status=1
  summary+=("tests $name: $(tail -n 1 "$out/tests_$name.log")")
  echo "${summary[-1]}"
  # failures' and hangs' details into the call's output too (a log may not come back)
  grep -qE "failed|error|Timeout" <<<"${summary[-1]}" && grep -vE "^\s*$" "$out/tests_$name.log" | tail -n "${KVLINK_LOG_TAIL:-60}" | cut -c1-300
}
t0=$SECONDS
for step in ${KVLINK_STEPS:-kernels ipc adapters rest soak chaos loopback_each host_costs bench}; do
  started=$SECONDS
  case $step in
    host_costs) timeout 150 python3 benchmarks/host_costs.py --json "$out/host_costs.json" > "$out/host_costs.txt" 2>&1 || status=1
                grep -E "baseline|reference|, step " "$out/host_costs.txt" | cut -c1-110
                sed -n '/^targets/,$p' "$out/host_costs.txt"; grep -E "PART FAILED|WRONG|Traceback" "$out/host_costs.txt"
                summary+=("host_costs: $(grep -cE 'MISSED' "$out/host_costs.txt") targets missed") ;;
    bench_ctas) KVLINK_IPC_MAX_CTAS=0 timeout 120 python3 -m kvlink.bench --iters 10 --json "$out/bench_ctas.json" \
                  > "$out/bench_ctas.txt" 2> "$out/bench_ctas.err" || status=1
                grep -E "^kvlink|^copy" "$out/bench_ctas.txt" ;;
    bench) timeout 120 python3 -m kvlink.bench --iters 10 --json "$out/bench.json" --plot "$out/bench.png" \
             > "$out/bench.txt" 2> "$out/bench.err" || status=1
           cat "$out/bench.txt"; grep -E "Error|error|FAILED" "$out/bench.err" | head -n 6
           summary+=("bench: $(grep -E '^# [0-9]+ cases' "$out/bench.txt")") ;;
    profile_e) rm -rf "$out/prof"  # a hang: every thread's stack (faulthandler, on the timeout's SIGABRT)
               PYTHONFAULTHANDLER=1 KVLINK_PROFILE_PROGRESS="$out/prof" timeout -s ABRT 60 python3 benchmarks/host_costs.py \
                 --parts E --calls 300 --warmup 50 > "$out/profile_e.txt" 2>&1 || status=1
               grep -E "stand-in|Thread|File .*(kvlink|host_costs)" "$out/profile_e.txt" | cut -c1-200 | head -n 60
               for f in "$out"/prof/*.prof; do
                 echo "-- $f"; python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(14)" "$f" \
                   | grep -E "^ +[0-9]" | cut -c1-160
               done ;;
    copy_sweep) IFS=';' read -r -a variants <<< "${KVLINK_SWEEP_OPTIONS:-;-DKVLINK_UNROLL=8;-DKVLINK_UNROLL=2;-DKVLINK_THREADS=512}"
                for opts in "${variants[@]}"; do
                  KVLINK_NVRTC_OPTIONS="$opts" timeout 100 python3 benchmarks/ipc_copy_sweep.py --ctas 0 264 1056 \
                    --tokens 4096 --iters 10 2>&1 | grep -E "us|wrong|Error" | tee -a "$out/copy_sweep.txt"
                done ;;
    kernels) step_test kernels 200 60 tests/test_gpu_kernels.py tests/test_kernel_model.py tests/test_fp8_wire.py \
               tests/test_checksums.py tests/test_host_path.py ;;
    loopback) step_test loopback 150 30 tests/test_nccl_pipeline_loopback.py ;;
    loopback_each)  # one process per test: a hang ends only its own test
      n=0
      for id in $(python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_nccl_pipeline_loopback.py | grep "::"); do
        n=$((n + 1))
        KVLINK_LOG_TAIL=12 step_test "loopback_$n" 45 25 "$id"
        if grep -q "Timeout" "$out/tests_loopback_$n.log"; then  # where kvlink's own threads were at the hang
          echo "  $id: kvlink threads at the hang:"
          grep -A40 "Stack of kvlink" "$out/tests_loopback_$n.log" | grep -E "Stack of|File .*kvlink/" | cut -c1-200 | head -n 30
        elif grep -q " passed" "$out/tests_loopback_$n.log"; then
          rm "$out/tests_loopback_$n.log"  # only so many files come back from the device
        fi
      done ;;
    chaos) step_test chaos 200 100 -s tests/test_chaos.py -k cuda ;;
    ipc) step_test ipc 150 60 tests/test_transfer_ipc.py ;;
    adapters) step_test adapters 150 60 tests/test_vllm_connector.py tests/test_sglang_backend.py ;;
    rest) step_test rest 240 60 tests/test_example.py tests/test_faults_gpu.py tests/test_api.py \
            tests/test_progress_engine.py tests/test_resharding.py tests/test_resharding_gpu.py ;;
    soak) KVLINK_SOAK_TRANSFERS=2000 step_test soak 120 100 tests/test_soak.py ;;
  esac
  echo "== $step: $((SECONDS - started)) s"
done
echo "== summary ($((SECONDS - t0)) s)"
printf '%s\n' "${summary[@]}"
exit $status
