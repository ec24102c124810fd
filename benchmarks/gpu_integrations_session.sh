#!/usr/bin/env bash
# One call on a 2-GPU machine: the engine adapters' call-sequence tests over NCCL and CUDA IPC, the
# example's test, then examples/disagg_serving.py at its GPU defaults (its summary JSON under OUTDIR).
# Usage (repo root): bash benchmarks/gpu_integrations_session.sh OUTDIR
set -u -o pipefail
out=${1:-${OUT:-/tmp/kvlink-gpu}}
mkdir -p "$out"
status=0
source benchmarks/gpu_env.sh
run_tests integrations tests/test_vllm_connector.py tests/test_sglang_backend.py tests/test_example.py
grep -E "^(FAILED|E  )" "$out/tests_integrations.log" | head -n 20
timeout 400 python3 examples/disagg_serving.py --json "$out/disagg_serving.json" > "$out/example.log" 2> "$out/example.err" || status=1
cat "$out/example.log"; grep -E "FAILED|Error" "$out/example.err" | head -n 5
exit $status
