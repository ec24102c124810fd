# Sourced by the benchmarks/gpu_*_session.sh scripts (after setting $out and status=0): the lent GPU
# hosts' environment, the card record in $out/device.txt, and run_tests.
# NVLink multicast stays off there; pyzmq (and any wheel under .whl/) travels with the checkout.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# The card(s) and their links, into $out/device.txt (callers set $out and status=0 first).
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$out/device.txt"
nvidia-smi topo -m >> "$out/device.txt" 2>&1

run_tests() {  # name, then pytest arguments: log to $out/tests_NAME.log, one summary line, status=1 on failure
  local name=$1; shift
  timeout "${KVLINK_TEST_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=90 "$@" \
    > "$out/tests_$name.log" 2>&1 || status=1
  echo "tests $name: $(tail -n 1 "$out/tests_$name.log")"
}
