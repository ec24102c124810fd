"""Resharded transfers across GPUs of one host: prefill ranks in their own processes, decode ranks here.

Needs prefill_tp + decode_tp GPUs (four for (2, 2)); skipped otherwise. Over CUDA IPC (the
default on one host) and over NCCL, with fp8 on the wire for NCCL.
"""

import pytest
import torch

from kvlink import kernels, nccl
from resharding_cases import run_resharded

GPUS = torch.cuda.device_count() if kernels.cuda_available() else 0


def devices(prefill_tp, decode_tp):
    if GPUS < prefill_tp + decode_tp:
        pytest.skip(f"needs {prefill_tp + decode_tp} GPUs, {GPUS} visible")
    return ([f"cuda:{r}" for r in range(prefill_tp)],
            [f"cuda:{prefill_tp + r}" for r in range(decode_tp)])


@pytest.mark.parametrize("transport", ["auto", "nccl"])
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1), (2, 2)])
def test_resharded_transfer_across_gpus_is_byte_exact(prefill_tp, decode_tp, transport, generator):
    if transport == "nccl" and not nccl.available():
        pytest.skip("needs CuPy's NCCL")
    prefill_devices, decode_devices = devices(prefill_tp, decode_tp)
    facts = run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=8, seed=int(generator.initial_seed()),
                          num_layers=4, head_dim=128, num_blocks=256, src_block_size=16, dst_block_size=32,
                          requests=4, prefill_devices=prefill_devices, decode_devices=decode_devices,
                          transport=transport, timeout=30)
    assert all(facts["pulled_bytes"])


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_mla_and_layerwise_resharding_across_gpus(prefill_tp, decode_tp, generator):
    prefill_devices, decode_devices = devices(prefill_tp, decode_tp)
    seed = int(generator.initial_seed())
    run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=1, mla=True, head_dim=576,
                  src_preset="vllm_mla", dst_preset="sglang_mla", seed=seed, num_blocks=128,
                  prefill_devices=prefill_devices, decode_devices=decode_devices, transport="auto", timeout=30)
    run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=8, layerwise=True, seed=seed + 1,
                  num_blocks=128, head_dim=128, prefill_devices=prefill_devices, decode_devices=decode_devices,
                  transport="auto", timeout=30)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_fp8_wire_over_nccl_with_resharding(prefill_tp, decode_tp, generator):
    if not nccl.available():
        pytest.skip("needs CuPy's NCCL")
    prefill_devices, decode_devices = devices(prefill_tp, decode_tp)
    run_resharded(prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=8, wire_dtype="fp8",
                  seed=int(generator.initial_seed()), num_blocks=128, head_dim=128,
                  prefill_devices=prefill_devices, decode_devices=decode_devices, transport="nccl", timeout=30)
