"""`python -m kvlink.bench --backend host` runs end to end on the CPU, verifies every byte, and fails on a wrong one."""

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--backend", "host", "--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--num-blocks", "128",
         "--tokens", "16", "100", "--iters", "2", "--warmup", "1", "--concurrent", "4", "--concurrent-tokens", "32"]


def run_bench(tmp_path, *extra, env=None):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "kvlink.bench", *SMALL, "--json", str(out), *extra],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_host_bench_verifies_every_case(tmp_path):
    result, report = run_bench(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    methods = {(r["method"], r["tokens"]) for r in report["records"]}
    assert {("kvlink", 16), ("kvlink", 100), ("raw", 16), ("raw", 100), ("naive", 16), ("naive", 100),
            ("kvlink x4", 32), ("kvlink layerwise", 100)} <= methods
    for record in report["records"]:
        assert record["verified"] and record["wrong_bytes"] == 0, record
        assert record["time_us"] > 0 and set(record) >= {"method", "tokens", "bytes", "time_us", "GBps", "verified"}
    assert report["backend"] == "host"
    assert "method" in result.stdout and "# " in result.stdout  # the table


def test_host_bench_exits_non_zero_on_a_wrong_byte(tmp_path):
    result, report = run_bench(tmp_path, "--methods", "kvlink", "--no-layerwise", "--concurrent", "0",
                               env={"KVLINK_BENCH_INJECT_CORRUPTION": "1"})
    assert result.returncode == 1
    assert "wrong bytes" in result.stderr
    assert any(r["wrong_bytes"] > 0 for r in report["records"])


def test_bench_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "kvlink.bench", "--backend", "host", "--tokens", "100000"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs more than --num-blocks" in result.stderr


def test_profile_writes_a_trace_per_side(tmp_path):
    result, _ = run_bench(tmp_path, "--methods", "kvlink", "--no-layerwise", "--concurrent", "0",
                          "--profile", str(tmp_path / "prof"))
    assert result.returncode == 0, result.stderr[-2000:]
    for side in ("decode", "prefill"):
        trace = json.loads((tmp_path / "prof" / f"{side}.json").read_text())
        assert trace["traceEvents"], side


def test_gpu_transports_are_refused_on_the_host_path():
    from kvlink.bench import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--backend", "host", "--transport", "ipc"])
    assert parse_args(["--backend", "host"]).kvlink_transport == "host"


def test_layout_block_size_and_fp8_flags_convert_and_verify(tmp_path):
    result, report = run_bench(tmp_path, "--methods", "kvlink,raw", "--src-layout", "sglang_mha", "--dst-layout",
                               "flashinfer_hnd", "--dst-block-size", "32", "--wire-dtype", "fp8")
    assert result.returncode == 0, result.stderr[-3000:]
    kvlink_records = [r for r in report["records"] if r["method"] == "kvlink"]
    assert kvlink_records and all(r["wrong_bytes"] == 0 for r in report["records"])
    for r in kvlink_records:  # head_dim 32: 36 bytes a row on the wire against 64 in the cache
        assert r["wire_bytes"] * 64 == r["bytes"] * 36 and r["wire_dtype"] == "fp8"


def test_fp8_bench_exits_non_zero_on_a_wrong_byte(tmp_path):
    result, _ = run_bench(tmp_path, "--methods", "kvlink", "--no-layerwise", "--concurrent", "0", "--wire-dtype",
                          "fp8", env={"KVLINK_BENCH_INJECT_CORRUPTION": "1"})
    assert result.returncode == 1 and "wrong bytes" in result.stderr


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_tensor_parallel_topology_runs_one_process_per_rank_against_the_homogeneous_share(
        tmp_path, prefill_tp, decode_tp):
    result, report = run_bench(tmp_path, "--prefill-tp", str(prefill_tp), "--decode-tp", str(decode_tp))
    assert result.returncode == 0, result.stderr[-3000:]
    labels = {r["method"] for r in report["records"]}
    assert labels == {f"tp {prefill_tp}->{decode_tp}", "homogeneous"}
    for r in report["records"]:
        assert r["wrong_bytes"] == 0
        if r["method"] != "homogeneous":
            assert r["links"] == 2 and r["bytes"] == r["tokens"] * 2 * 2 * 2 * 32 * 2  # layers*kv*heads*dim*bf16
    assert "vs homog" in result.stdout


def test_tensor_parallel_bench_exits_non_zero_on_a_wrong_byte(tmp_path):
    result, _ = run_bench(tmp_path, "--prefill-tp", "2", "--decode-tp", "1",
                          env={"KVLINK_BENCH_INJECT_CORRUPTION": "1"})
    assert result.returncode == 1 and "wrong bytes" in result.stderr


def test_tensor_parallel_sizes_must_split_the_heads():
    result = subprocess.run([sys.executable, "-m", "kvlink.bench", *SMALL, "--prefill-tp", "3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "prefill_tp=3 is not a multiple of 2 KV heads" in result.stderr
