#!/usr/bin/env bash
# One call on a one-GPU machine: every GPU test that runs on one GPU (two processes share it over
# CUDA IPC), then the measurements named in KVLINK_MEASURE. Logs under OUTDIR; a table last.
# Usage (repo root): bash benchmarks/gpu_one_gpu_session.sh OUTDIR
#   KVLINK_TESTS="kernels ipc adapters example faults soak" (default: all of them; "" skips the tests)
#   KVLINK_MEASURE="bench host_costs" (default: none)
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
python3 -c "import torch, cupy, zmq; print('torch', torch.__version__, '| cupy', cupy.__version__, '| zmq', zmq.__version__)" \
  | tee -a "$out/device.txt"
summary=()
for t in ${KVLINK_TESTS-kernels ipc adapters example faults soak}; do
  case $t in
    kernels) line=$(run_tests kernels tests/test_gpu_kernels.py tests/test_kernel_model.py tests/test_fp8_wire.py \
                    tests/test_checksums.py tests/test_kernels_compile.py) ;;
    ipc) line=$(run_tests ipc tests/test_transfer_ipc.py) ;;
    adapters) line=$(run_tests adapters tests/test_vllm_connector.py tests/test_sglang_backend.py) ;;
    example) line=$(run_tests example tests/test_example.py) ;;
    faults) line=$(run_tests faults tests/test_faults_gpu.py) ;;
    soak) line=$(KVLINK_SOAK_TRANSFERS=${KVLINK_SOAK_TRANSFERS:-2000} run_tests soak tests/test_soak.py) ;;
    *) line=$(run_tests "$t" $(ls tests/test_"$t"*.py 2>/dev/null)) ;;
  esac
  grep -qE "failed|error" <<<"$line" && status=1
  summary+=("$line")
done
for m in ${KVLINK_MEASURE-}; do
  case $m in
    bench) timeout 300 python3 -m kvlink.bench --json "$out/bench.json" --plot "$out/bench.png" \
             > "$out/bench.log" 2> "$out/bench.err" || status=1
           summary+=("bench: $(grep -E '^# [0-9]+ cases' "$out/bench.log")")
           cat "$out/bench.log" ;;
    host_costs) timeout 300 python3 benchmarks/host_costs.py --json "$out/host_costs.json" \
                  > "$out/host_costs.log" 2>&1 || status=1
                cat "$out/host_costs.log"
                summary+=("host_costs: exit $?") ;;
  esac
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
