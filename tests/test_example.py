"""examples/disagg_serving.py runs end to end: colocated and disaggregated serving generate the same tokens."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "disagg_serving.py"
SMALL = ["--requests", "5", "--rate", "20", "--prompt-min", "8", "--prompt-max", "40", "--output-min", "2",
         "--output-max", "6", "--layers", "2", "--d-model", "128", "--vocab", "512", "--threads", "1"]


def run(tmp_path, *extra):
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(EXAMPLE), *SMALL, "--json", str(out), *extra],
                            capture_output=True, text=True, timeout=400)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_cpu_colocated_and_disaggregated_tokens_are_identical(tmp_path):
    result, summary = run(tmp_path, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens identical in both modes for 5 of 5 requests" in result.stdout
    assert summary["mismatched"] == [] and summary["transport"] == "host"
    modes = {s["mode"]: s for s in summary["summaries"]}
    assert set(modes) == {"colocated", "disaggregated"}
    for s in modes.values():
        assert s["requests"] == 5 and s["goodput_rps"] <= s["throughput_rps"] and 0 < s["ttft_ms_p50"]


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs two GPUs")
def test_two_gpus_colocated_and_disaggregated_tokens_are_identical(tmp_path):
    result, summary = run(tmp_path, "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["mismatched"] == [] and summary["transport"] in ("ipc", "nccl")


TWO_PROCESS = EXAMPLE.parent / "two_process_transfer.py"


def run_two_process(device: str):
    return subprocess.run([sys.executable, str(TWO_PROCESS), "--device", device], capture_output=True, text=True,
                          timeout=300)


def test_two_process_example_on_the_cpu():
    """The README's endpoint example, as a program: two processes, the address handed over, every
    token checked against the prefill's cache, the transport named in the link log."""
    result = run_two_process("cpu")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "300 tokens x 4 layers checked, 0 wrong elements" in result.stdout
    assert "prefill: decode has req-42 (ok=True)" in result.stdout
    assert "transport host" in result.stderr  # logging is configured: the link says what it uses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_two_process_example_on_one_gpu():
    """Two processes on one GPU link over CUDA IPC."""
    result = run_two_process("cuda:0")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "0 wrong elements" in result.stdout and "transport ipc" in result.stderr
