#!/usr/bin/env bash
# One call on a 4-GPU machine: the GPU tests of heterogeneous transfers (fp8 kernels, resharding
# across GPUs, and the transfer suites again), then the issue's three measurements on W1, each
# with its baseline in the same run:
#   resharding 2 -> 1 and 1 -> 2 against the homogeneous transfer of one link's share,
#   layout + block-size conversion against the same transfer without it (CUDA IPC and NCCL),
#   fp8 on the wire against bf16 on the wire (NCCL).
# Usage (repo root): bash benchmarks/gpu_resharding_session.sh OUTDIR   (KVLINK_TESTS="" skips the tests,
#   KVLINK_BENCHES="tp conv fp8" picks benchmarks, KVLINK_BENCH_ARGS adds flags to every run)
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
for t in ${KVLINK_TESTS-fp8 resharding kernels transfers}; do
  case $t in
    fp8) run_tests fp8 tests/test_fp8_wire.py; grep -E "^(FAILED|E  )" "$out/tests_fp8.log" | head -n 20 ;;
    resharding) run_tests resharding tests/test_resharding_gpu.py ;;
    kernels) run_tests kernels tests/test_gpu_kernels.py tests/test_kernel_model.py ;;
    transfers) run_tests transfers tests/test_transfer_ipc.py tests/test_transfer_nccl.py ;;
  esac
done
bench() {  # name, then bench flags
  local name=$1; shift
  timeout 300 python3 -m kvlink.bench --backend nccl --methods kvlink --no-layerwise --concurrent 0 \
    --tokens 512 4096 --iters 10 ${KVLINK_BENCH_ARGS:-} --json "$out/bench-$name.json" "$@" \
    > "$out/bench-$name.log" 2> "$out/bench-$name.err" || { status=1; echo "bench $name FAILED: $(tail -n 2 "$out/bench-$name.err")"; }
}
for b in ${KVLINK_BENCHES-tp conv fp8}; do
  case $b in
    tp) bench tp21-ipc --prefill-tp 2 --decode-tp 1; bench tp12-ipc --prefill-tp 1 --decode-tp 2
        bench tp21-nccl --prefill-tp 2 --decode-tp 1 --transport nccl ;;
    conv) for round in 1 2; do
            bench plain-ipc-$round; bench conv-ipc-$round --dst-layout flashinfer_hnd --dst-block-size 32
          done
          bench plain-nccl --transport nccl; bench conv-nccl --transport nccl --dst-layout flashinfer_hnd --dst-block-size 32 ;;
    fp8) bench bf16-nccl-wire --transport nccl; bench fp8-nccl-wire --transport nccl --wire-dtype fp8 ;;
  esac
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
print(f"{'run':<18} {'method':<12} {'tokens':>6} {'time(us)':>10} {'GB/s':>8} {'GB/s/link':>9} {'wire MiB':>9} {'wrong':>6}")
for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    run = os.path.basename(path)[6:-5]
    for r in json.load(open(path))["records"]:
        wire = r.get("wire_bytes") or r["bytes"]
        print(f"{run:<18} {r['method']:<12} {r['tokens']:>6} {r['time_us']:>10.1f} {r['GBps']:>8.2f} "
              f"{r.get('link_GBps', r['GBps']):>9.2f} {wire / 2**20:>9.1f} {r['wrong_bytes']:>6}")
PY
# few files come back from a lent machine: pack the logs into one (built outside $out, then moved in)
tar -czf /tmp/kvlink-logs.tgz -C "$out" . && find "$out" -type f ! -name device.txt -delete && mv /tmp/kvlink-logs.tgz "$out/logs.tgz"
exit $status
