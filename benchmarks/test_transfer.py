"""End-to-end transfer microbenchmarks: kvlink.bench's two-process run, on two GPUs (NCCL) or the host path.

The host twin runs everywhere (CI included) on a small shape; the NCCL case needs two GPUs.
Figures land in the session summary table; every byte is verified by the benchmark itself.
"""

import json

import pytest
import torch

from kvlink import bench, nccl

HOST_ARGS = ["--backend", "host", "--layers", "4", "--kv-heads", "4", "--head-dim", "64", "--num-blocks", "512",
             "--tokens", "16", "512", "--iters", "3", "--concurrent", "8", "--concurrent-tokens", "128"]
NCCL_ARGS = ["--backend", "nccl", "--tokens", "16", "512", "4096", "--iters", "10"]


def run(benchmark, record, args, tmp_path):
    out = tmp_path / "bench.json"
    rc = benchmark.pedantic(lambda: bench.main([*args, "--json", str(out)]), rounds=1, iterations=1)
    report = json.loads(out.read_text())
    raw = {r["tokens"]: r["GBps"] for r in report["records"] if r["method"] == "raw"}
    for r in report["records"]:
        base = raw.get(r["tokens"] * r.get("concurrent", 1))
        rate = r["GBps"]  # None for the layer-wise case: its time is the tail after the last layer_ready()
        record(case=f"{report['backend']}: {r['method']} {r['tokens']} tok", bytes=r["bytes"], time_us=r["time_us"],
               GBps=float("nan") if rate is None else rate,
               vs_copy=rate / base if base and r["method"] != "raw" and rate else float("nan"),
               verified=r["verified"])
    benchmark.extra_info.update(records=report["records"], memory=report["memory"])
    assert rc == 0, "the transfer benchmark failed or received wrong bytes"
    assert report["verified"] and all(r["verified"] for r in report["records"])


def test_transfer_host(benchmark, record, tmp_path):
    run(benchmark, record, HOST_ARGS, tmp_path)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and nccl.available()),
                    reason="needs two CUDA GPUs and CuPy's NCCL")
def test_transfer_nccl(benchmark, record, tmp_path):
    run(benchmark, record, NCCL_ARGS, tmp_path)
