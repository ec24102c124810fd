"""`python -m kvlink.bench --backend host` runs end to end on the CPU, verifies every byte, and fails on a wrong one."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from kvlink.bench import build_parser, make_record

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
        assert record["time_us"] > 0 and set(record) >= {"method", "tokens", "bytes", "time_us", "GBps", "verified",
                                                         "time_min_us", "time_p10_us", "time_p90_us", "time_max_us",
                                                         "iters", "warmup", "samples_us"}
        # every case: a median of --iters 2 timed iterations after --warmup 1, with its spread
        assert record["iters"] == 2 and record["warmup"] == 1 and len(record["samples_us"]) == 2, record
        assert record["time_min_us"] <= record["time_p10_us"] <= record["time_us"] <= record["time_p90_us"] \
            <= record["time_max_us"], record
        if record["method"] == "kvlink layerwise":  # a tail after the last layer_ready(), not a transfer rate
            assert record["GBps"] is None and "layer_ready" in record["note"], record
        else:
            assert record["GBps_min"] <= record["GBps"] <= record["GBps_max"] and record["GBps"] > 0, record
    assert report["backend"] == "host" and report["verified"] is True
    assert set(report["methods"]) == {r["method"] for r in report["records"]}  # what each method measures
    assert "method" in result.stdout and "# " in result.stdout  # the table
    for column in ("time(us)", "min(us)", "max(us)", "GB/s", "vs raw", "#wrong"):
        assert column in result.stdout.splitlines()[0], column
    legend = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    for method in ("raw", "naive", "kvlink", "kvlink x4", "kvlink layerwise"):
        assert any(re.match(rf"# {re.escape(method)} +=", line) for line in legend), (method, legend)
    assert "median of 2 timed iterations after 1 untimed warm-up" in result.stdout
    layerwise_row = next(line for line in result.stdout.splitlines() if line.startswith("kvlink layerwise "))
    assert layerwise_row.split()[7:9] == ["-", "-"], layerwise_row  # GB/s and vs raw: none for a tail time
    # progress: one line per case on stderr as it finishes, counted against the cases planned
    progress = re.findall(r"^\s+\[(\d+)/(\d+)\] ", result.stderr, re.M)
    assert len(progress) == len(report["records"]) and {int(n) for _, n in progress} == {len(report["records"])}


def test_host_bench_exits_non_zero_on_a_wrong_byte(tmp_path):
    result, report = run_bench(tmp_path, "--methods", "kvlink", "--no-layerwise", "--concurrent", "0",
                               env={"KVLINK_BENCH_INJECT_CORRUPTION": "1"})
    assert result.returncode == 1
    assert "wrong bytes" in result.stderr
    assert any(r["wrong_bytes"] > 0 and r["verified"] is False for r in report["records"])
    assert report["verified"] is False


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


def test_plot_without_matplotlib_fails_before_the_benchmark_runs(tmp_path):
    png = tmp_path / "bench.png"
    code = ("import sys; sys.modules['matplotlib'] = None; from kvlink.bench import main; "
            f"sys.exit(main(sys.argv[1:]))")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code, *SMALL, "--plot", str(png)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--plot needs matplotlib" in result.stderr and "kvlink[plot]" in result.stderr
    assert "phase:" not in result.stderr and not result.stdout  # refused at argument parsing: nothing ran
    assert not png.exists() and time.monotonic() - start < 60


def test_help_explains_every_flag_once():
    parser = build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.help.count("default") <= 1, (action.option_strings, action.help)
    text = parser.format_help()
    assert "(default: " not in text and "%(default)" not in text  # no argparse-added default next to ours
    transport = next(a for a in parser._actions if "--transport" in a.option_strings).help
    assert "host path" in transport and "IPC" in transport  # right on a GPU box and on a CPU-only one


def test_record_is_verified_only_when_complete_and_every_byte_right():
    ok = make_record("raw", 16, 4096, [1e-3, 2e-3, 3e-3], 0, warmup=1)
    assert ok["verified"] is True and ok["time_us"] == pytest.approx(2000) and ok["iters"] == 3
    assert ok["time_min_us"] == pytest.approx(1000) and ok["time_max_us"] == pytest.approx(3000)
    assert ok["GBps"] == pytest.approx(4096 / 2e-3 / 1e9) and ok["GBps_min"] < ok["GBps"] < ok["GBps_max"]
    assert make_record("raw", 16, 4096, [1e-3], 1, warmup=0)["verified"] is False
    assert make_record("raw", 16, 4096, [1e-3], 0, warmup=0, completed=False)["verified"] is False
    tail = make_record("kvlink layerwise", 16, 4096, [1e-3], 0, warmup=0, rate=False)
    assert tail["GBps"] is None and tail["verified"] is True


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
    assert report["verified"] is True
    for r in report["records"]:
        assert r["wrong_bytes"] == 0 and r["verified"] is True, r
        assert r["time_min_us"] <= r["time_us"] <= r["time_max_us"] and r["iters"] == 2, r
        if r["method"] != "homogeneous":
            assert r["links"] == 2 and r["bytes"] == r["tokens"] * 2 * 2 * 2 * 32 * 2  # layers*kv*heads*dim*bf16
    assert "vs homog" in result.stdout


def test_tensor_parallel_bench_exits_non_zero_on_a_wrong_byte(tmp_path):
    result, report = run_bench(tmp_path, "--prefill-tp", "2", "--decode-tp", "1",
                               env={"KVLINK_BENCH_INJECT_CORRUPTION": "1"})
    assert result.returncode == 1 and "wrong bytes" in result.stderr
    assert any(r["wrong_bytes"] > 0 and r["verified"] is False for r in report["records"])


def test_tensor_parallel_sizes_must_split_the_heads():
    result = subprocess.run([sys.executable, "-m", "kvlink.bench", *SMALL, "--prefill-tp", "3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "prefill_tp=3 is not a multiple of 2 KV heads" in result.stderr
